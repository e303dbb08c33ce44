"""The GPU-only paths, run on a CUDA machine (scripts/gpu_check.sh) and skipped elsewhere: torch's varlen
attention kernel, Liger's fused linear cross-entropy, bf16 weights with fp32 masters, per-layer compile, QLoRA."""
import copy
import json

import pytest
import torch

import ov_train.model.forward as forward
from ov_train.config.schema import ModelConfig
from ov_train.constants import VARLEN
from ov_train.data.samples import collate
from ov_train.model.forward import (
    forward_logits,
    prepare_model,
    sample_losses,
    token_losses,
)
from ov_train.model.loss import fused_available
from ov_train.run import train
from tests.conftest import SMALL_DATA, compose_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _to(batch, device, dtype=None):
    return {
        k: v.to(device, dtype=dtype if dtype is not None and v.is_floating_point() else None) if torch.is_tensor(v) else v
        for k, v in batch.items()
    }


def _grads(model):
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def reference(mixed_batch):
    """fp32 on the GPU, each sample alone through the plain forward: loss sums and gradients."""
    base, examples, _ = mixed_batch
    model = copy.deepcopy(base).cuda().train()
    sums = []
    for e in examples:
        batch = _to(collate([e], pad_id=0), "cuda")
        losses, _ = token_losses(forward_logits(model, batch), batch["labels"])
        sums.append(losses.sum())
    sums = torch.stack(sums)
    supervised = sum(int((e["labels"][1:] != -100).sum()) for e in examples)
    (sums.sum() / supervised).backward()
    return sums.detach(), _grads(model)


@pytest.mark.parametrize("max_tokens", [100_000, 100], ids=["one_row", "several_rows"])
def test_varlen_bf16_packed_matches_each_sample_alone(mixed_batch, reference, max_tokens):
    base, _, batch = mixed_batch
    model = copy.deepcopy(base).cuda().to(torch.bfloat16).train()
    options = ModelConfig.stock(packing=True, max_tokens=max_tokens, loss="chunked", loss_chunk=64, attn_implementation="auto")
    assert options.attention() == VARLEN
    prepare_model(model, options)
    sums, counts, _ = sample_losses(model, _to(batch, "cuda", torch.bfloat16), options)
    (sums.sum() / counts.sum()).backward()
    ref_sums, ref_grads = reference
    assert torch.allclose(sums.float(), ref_sums, rtol=3e-2, atol=1e-1)
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    worst = max(_relative(grads[n], ref_grads[n]) for n in grads if ref_grads[n].norm() > 1e-6)
    assert worst < 0.1, worst  # bf16 compute against fp32: a few percent per tensor


def test_sdpa_packed_fp32_on_cuda_is_exact(mixed_batch, reference):
    base, _, batch = mixed_batch
    model = copy.deepcopy(base).cuda().train()
    options = ModelConfig.stock(packing=True, max_tokens=100, loss="chunked", loss_chunk=3, attn_implementation="sdpa")
    prepare_model(model, options)
    sums, counts, _ = sample_losses(model, _to(batch, "cuda"), options)
    (sums.sum() / counts.sum()).backward()
    ref_sums, ref_grads = reference
    assert torch.allclose(sums, ref_sums, atol=1e-3, rtol=1e-3)
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-4, rtol=1e-2), name


@pytest.mark.skipif(not fused_available(torch.device("cuda")), reason="liger-kernel is not installed")
def test_liger_fused_loss_matches_chunked(mixed_batch, monkeypatch):
    base, _, batch = mixed_batch
    batch = _to(batch, "cuda")
    options = ModelConfig.stock(packing=True, max_tokens=100, loss="chunked", loss_chunk=3, attn_implementation="sdpa")
    results = []
    for fused in (True, False):
        monkeypatch.setattr(forward, "fused_available", lambda device, fused=fused: fused)
        model = copy.deepcopy(base).cuda().train()
        prepare_model(model, options)
        sums, counts, _ = sample_losses(model, batch, options)
        (sums.sum() / counts.sum()).backward()
        results.append((sums.detach(), _grads(model)))
    (fused_sums, fused_grads), (sums, grads) = results
    assert torch.allclose(fused_sums, sums, atol=1e-3, rtol=1e-4)
    for name in grads:
        assert torch.allclose(fused_grads[name], grads[name], atol=1e-5, rtol=1e-3), name


@pytest.mark.parametrize("extra", [[], ["model.compile=true", "model.activation_checkpointing=[llm]"]], ids=["eager", "compiled"])
def test_training_on_one_gpu_uses_bf16_weights_with_fp32_masters(tmp_path, small_data_root, extra):
    run_dir = tmp_path / "run"
    overrides = [f"data.root={small_data_root}", *SMALL_DATA, "trainer.max_steps=20", *extra]
    cfg = compose_config(overrides, run_dir=run_dir)
    summary = train(cfg)
    assert cfg.trainer.precision == "bf16-true"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.bfloat16}
    masters = [s["master"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert summary["steps"] == 20 and summary["val_loss"] is not None
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] < 7.0  # ln(vocab 1,033) = 6.94 at chance


def test_qlora_trains_adapters_on_4bit_llm_weights(tmp_path, small_data_root):
    """adapter=qlora: every linear layer of the LLM's layers in 4 bits (bitsandbytes), LoRA adapters on them trained
    in bf16 with fp32 masters; the checkpoint holds the adapters (and the projector's copy) only; the export merges
    them into the base rebuilt in full precision, and export/adapter/ is PEFT's format."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import LlavaOnevisionForConditionalGeneration

    from ov_train.checkpoints.adapters import build_for_training
    from ov_train.config.run_plan import resolve_plan
    from ov_train.model.layout import layers

    run_dir = tmp_path / "run"
    cfg = compose_config([f"data.root={small_data_root}", *SMALL_DATA, "trainer.max_steps=4", "adapter=qlora"],
                         run_dir=run_dir)
    model, _, _ = build_for_training(resolve_plan(cfg))
    quantized = [m for m in layers(model, "llm").modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * cfg.model.text.num_hidden_layers
    assert all(m.weight.dtype == torch.uint8 and m.weight.device.type == "cuda" for m in quantized)
    del model
    summary = train(cfg)
    assert summary["steps"] == 4 and summary["val_loss"] is not None
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(".lora_" in k or ".modules_to_save." in k for k in ckpt["state_dict"])
    masters = [s["master"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert len(masters) == len(ckpt["state_dict"]) and all(m.dtype == torch.float32 for m in masters)
    _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(run_dir / "export", output_loading_info=True)
    assert not any(info.values())
    assert (run_dir / "export" / "adapter" / "adapter_model.safetensors").is_file()
