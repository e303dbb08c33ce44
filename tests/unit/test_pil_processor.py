"""Without torchvision (`pip install .`), ov-chat and ov-eval run the stock LlavaOnevisionProcessor with PIL image and
video processors: its inputs equal the torchvision-backed processor's, and the tools answer the same."""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from ov_train.checkpoints.export import export_pretrained
from ov_train.cli.chat import main as ov_chat
from ov_train.eval.inference import load_processor, training_frames
from ov_train.eval.pil_processor import PilVideoProcessor, pil_processor
from tests.conftest import REPO
from tests.fixtures_data import video_bytes
from tests.helpers import noise_png

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                reason="the reference is the torchvision-backed processor")
HIDE_TORCHVISION = "import sys; sys.modules['torchvision'] = None; "  # find_spec says None, imports fail


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_and_tokenizer):
    """ov-export's layout and transformers 5's (save_pretrained of the processor: processor_config.json only)."""
    model, tokenizer = tiny_model_and_tokenizer
    ours = export_pretrained(model, tokenizer, tmp_path_factory.mktemp("export") / "export")
    stock = tmp_path_factory.mktemp("stock")
    model.save_pretrained(stock)
    AutoProcessor.from_pretrained(ours).save_pretrained(stock)
    return ours, stock


def test_pil_processor_inputs_equal_the_stock_processors(exports, tiny_model_and_tokenizer):
    from PIL import Image

    model, _ = tiny_model_and_tokenizer
    frames = training_frames(np.random.default_rng(0).integers(0, 255, (5, 40, 56, 3), dtype=np.uint8), model)
    image = Image.open(__import__("io").BytesIO(noise_png(48, 40, 1))).convert("RGB")
    for export in exports:
        reference, pil = load_processor(export), pil_processor(export)
        assert isinstance(pil.video_processor, PilVideoProcessor)
        prompt = reference.apply_chat_template([{"role": "user", "content": "<video>\n<image>\nWhat?"}],
                                               add_generation_prompt=True)
        assert pil.apply_chat_template([{"role": "user", "content": "<video>\n<image>\nWhat?"}],
                                       add_generation_prompt=True) == prompt
        want = reference(text=[prompt], images=[[image]], videos=[frames], return_tensors="pt")
        got = pil(text=[prompt], images=[[image]], videos=[frames], return_tensors="pt")
        assert set(got) == set(want)
        for key in want:
            if want[key].is_floating_point():
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
            else:
                assert torch.equal(got[key], want[key]), key


@pytest.mark.slow
def test_ov_chat_answers_the_same_without_torchvision(exports, tmp_path, capsys):
    ours, _ = exports
    (tmp_path / "a.png").write_bytes(noise_png(48, 40, 2))
    (tmp_path / "clip.mp4").write_bytes(video_bytes(6, fps=2))
    for media in (["--image", str(tmp_path / "a.png")], ["--video", str(tmp_path / "clip.mp4")]):
        argv = [str(ours), *media, "--max-new-tokens", "4", "What is it?"]
        assert ov_chat(argv) == 0
        expected = capsys.readouterr().out
        code = HIDE_TORCHVISION + f"from ov_train.cli.chat import main; sys.exit(main({argv!r}))"
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout == expected and expected.strip()
