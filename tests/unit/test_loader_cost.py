"""bench --loader DIR on realistic media (kept small here): every path's CPU cost per sample and modality, the cores
per GPU they imply, and the fast decode's pixel difference."""
import pytest

from ov_train.bench.media import write_media_shards
from ov_train.cli.bench import main
from ov_train.planner.workload import ONEVISION_MIX
from ov_train.vision import pixels


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    made = write_media_shards(root, photos=6, clips=1, clip_seconds=2.0, clip_size=(96, 128), image_scale=0.15,
                              per_shard=4)
    assert made["clips"] == 1 and made["samples"]["video"] == 1
    return root


def test_loader_dir_prints_cores_per_gpu_against_the_reference(media, capsys):
    results = {r["name"]: r for r in main(["--loader", str(media), "--tiny", "--loader-samples", "2", "--mfu", "0.5"])}
    paths = ["extraction_ov_train_exact", "extraction_ov_train_fast", "extraction_reference"]
    if pixels.TORCHVISION:  # fast with torchvision's decoder and resizes, and fast with PIL's alone
        paths.append("extraction_ov_train_fast_PIL")
    assert set(paths) <= set(results)
    for name in paths:
        r = results[name]
        assert set(r["cpu_s"]) == {"single_image", "multi_image", "video"} and all(v > 0 for v in r["cpu_s"].values())
        seconds = sum(share * r["cpu_s"][m] for m, share in ONEVISION_MIX.items())
        assert r["cpu_s_per_sample"] == pytest.approx(seconds)
        assert r["cores_per_gpu_with_margin"] == pytest.approx(1.5 * r["cores_per_gpu"])
        assert r["device"] == "h100" and r["mfu"] == 0.5
    # One GPU's appetite for all paths: cores per GPU scale with CPU seconds per sample.
    exact, reference = results["extraction_ov_train_exact"], results["extraction_reference"]
    assert exact["cores_per_gpu"] / reference["cores_per_gpu"] == pytest.approx(
        exact["cpu_s_per_sample"] / reference["cpu_s_per_sample"])
    assert 0 <= results["decode_fast_pixel_diff"]["mean"] < 0.05
    # Frames: the same decode, only the resize differs (torchvision's; PIL's without it: no difference at all).
    frames = results["decode_fast_pixel_diff_frames"]
    assert frames["mean"] < 0.01 and (frames["max"] > 0) == pixels.TORCHVISION
    out = capsys.readouterr().out
    assert "cores/GPU" in out and "reference" in out
