"""Activation memory from tracing the real training step with fake tensors: no GPU, no weights.

The model is built on the meta device at the configured geometry and materialised with `to_empty` inside a
`FakeTensorMode` on the CPU device, so every tensor has a shape, a dtype and a size but no storage. The step is
ov_train's own: `sample_losses` with the run's model config (packing, attention, loss, checkpointing), the
loss as training_step forms it, and its backward; or, for `path=stock`, the stock forward with full logits and
its loss. torch's `MemTracker` follows every tensor the step creates and frees.

Integer bookkeeping (packing, placeholder masks, supervised positions, per-sample counts) reads tensor values,
which fake tensors do not have: `_RealIntegers` runs every op whose tensor inputs are all real, and integer and
boolean factories, on real CPU tensors. They are small and the GPU holds them too.

Where the GPU runs other kernels than this CPU trace, the trace runs the GPU path's code with a stand-in that
allocates what the GPU kernel allocates:
- attention: `ov_varlen` (torch's varlen kernel) has a fake kernel of its own: output and log-sum-exp, O(n)
  per row, no n x n matrix. The stock path's sdpa picks the CPU flash kernel, which keeps the same.
- loss: Liger's fused linear cross-entropy computes the gradients inside its forward; `stand_in_liger` puts
  a module with its allocations (per call: a [chunk, vocab] logits chunk; grad_input [n, d] and, when the
  head trains, grad_weight [vocab, d], both kept until backward) where `import liger_kernel.transformers`
  finds it, and ov_train's own `fused_cross_entropy_sums` runs on it.
"""
from __future__ import annotations

import sys
import time
import types
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ov_train.model.forward as forward_module
from ov_train.config.schema import ModelConfig
from ov_train.model import layout
from ov_train.model.forward import prepare_model, sample_losses
from ov_train.model.parts import apply_stage
from ov_train.planner.workload import Sample, collated

GRAD, PARAM = _MemRefType.GRAD, _MemRefType.PARAM
COMPUTE = {"bf16": (torch.bfloat16, None), "mixed": (torch.float32, torch.bfloat16), "fp32": (torch.float32, None)}


@dataclass(frozen=True)
class Trace:
    """What one traced step held, in bytes."""

    weights: int  # parameters as traced
    gradients: int  # parameter gradients at the end of backward
    activations: int  # peak of everything else (activations, temporaries, the batch), whatever the gradients
    activations_with_gradients: int  # peak of that plus the gradients allocated so far
    loss: int  # the loss's working set: the most the LM head + loss added above what was held when it started
    seconds: float
    rows: int  # packed rows (1 for the stock path's one sample)
    row_tokens: int  # tokens per row, padding tails included

    def to_dict(self) -> dict:
        return asdict(self)


def _is_float_factory(func, args, kwargs) -> bool:
    dtype = kwargs.get("dtype")
    if dtype is not None:
        return dtype.is_floating_point or dtype.is_complex
    if func in (torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step):
        return any(isinstance(a, float) for a in args)
    if func is torch.ops.aten.full.default:
        return isinstance(args[1], float)
    return True  # empty / zeros / ones / rand without a dtype: the default float dtype


class _RealIntegers(TorchDispatchMode):
    """Ops whose tensor inputs are all real (and integer or boolean factories) run for real; the rest go on to
    the fake mode below, which takes real inputs as fake ones."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fake = [t for t in tensors if isinstance(t, FakeTensor)]
        real = not fake if tensors else not _is_float_factory(func, args, kwargs)
        if real:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func._schema.is_mutable and any(not isinstance(t, FakeTensor) for t in tensors[:1]):
            raise RuntimeError(f"planner trace: {func} would write fake values into a real tensor")
        return func(*args, **kwargs)


class _StepTracker(MemTracker):
    """MemTracker keeping only what the planner reads, per op: the peak of non-parameter memory with and without
    the gradients, and the loss's working set (between `loss_begin` and `loss_end`). Module-wise snapshots,
    which cost a pass over every module per op, are skipped; gradients are hooked on trainable parameters only
    (MemTracker's own hooks refuse frozen ones)."""

    def __init__(self, model):
        super().__init__()
        self.peak_other = 0
        self.peak_other_grads = 0
        self.loss_base: int | None = None
        self.loss_peak = 0
        self.track_external(model)
        self.handles = []
        for param in model.parameters():
            if param.requires_grad:
                self.handles.append(param.register_hook(self._mark_grad))
                self.handles.append(param.register_post_accumulate_grad_hook(lambda p: self._mark_grad(p.grad)))

    def _mark_grad(self, grad) -> None:
        self._update_and_maybe_create_winfos(grad, GRAD)

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    def _update_peak_stats(self, peak_state) -> None:
        total = params = grads = 0
        for snap in self._curr_mem_snap.values():
            total += snap["Total"]
            params += snap.get(PARAM, 0)
            grads += snap.get(GRAD, 0)
        self.peak_other = max(self.peak_other, total - params - grads)
        self.peak_other_grads = max(self.peak_other_grads, total - params)
        if self.loss_base is not None:
            self.loss_peak = max(self.loss_peak, total - self.loss_base)

    def current(self, kind=None) -> int:
        return sum(s.get(kind or "Total", 0) for s in self._curr_mem_snap.values())

    def loss_begin(self, *_):
        self.loss_base = self.current()

    def loss_end(self, *_):
        self.loss_base = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _FusedCrossEntropyStandIn(torch.autograd.Function):
    """Liger's LigerFusedLinearCrossEntropyFunction as memory: the same tensors allocated and kept, no arithmetic."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, reduction):
        rows, width = hidden.shape
        vocab = weight.shape[0]
        # Liger bounds each chunk's logits to about rows x width elements: chunk = next_pow2(rows / ceil(vocab / width)).
        chunk = min(rows, 1 << (_cdiv(rows, _cdiv(vocab, width)) - 1).bit_length())
        grad_input = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        losses = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        logits = torch.empty((chunk, vocab), dtype=hidden.dtype, device=hidden.device)
        del logits
        ctx.save_for_backward(grad_input, grad_weight)
        return losses if reduction == "none" else losses.sum()

    @staticmethod
    def backward(ctx, grad):
        grad_input, grad_weight = ctx.saved_tensors
        return grad_input, grad_weight, None, None


class _FusedLinearCrossEntropyLoss(torch.nn.Module):
    def __init__(self, reduction: str = "mean", **_):
        super().__init__()
        self.reduction = reduction

    def forward(self, weight, hidden, targets):
        return _FusedCrossEntropyStandIn.apply(hidden, weight, targets, self.reduction)


@contextmanager
def stand_in_liger():
    """`from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss` finds the stand-in, and
    ov_train's loss takes the fused path on the CPU device."""
    module = types.ModuleType("liger_kernel.transformers")
    module.LigerFusedLinearCrossEntropyLoss = _FusedLinearCrossEntropyLoss
    saved = {name: sys.modules.get(name) for name in ("liger_kernel", "liger_kernel.transformers")}
    available = forward_module.fused_available
    sys.modules["liger_kernel"] = types.ModuleType("liger_kernel")
    sys.modules["liger_kernel.transformers"] = module
    forward_module.fused_available = lambda device: True
    try:
        yield
    finally:
        forward_module.fused_available = available
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _stock_step(model, batch):
    from ov_train.data.samples import stock_inputs  # the public recipe's call, as the benchmark makes it

    out = model(**stock_inputs(batch), labels=batch["labels"])
    return out.loss


def _ours_step(model, batch, options):
    sums, counts, _ = sample_losses(model, batch, options)
    return sums.sum() / counts.sum().clamp_min(1)  # OneVisionModule.training_step's loss


def trace_step(
    meta_model, parts: dict, samples: list[Sample], options: ModelConfig, compute: str, path: str, fused_loss: bool
) -> Trace:
    """Trace one training step of `meta_model` (built on the meta device; it is materialised fake here).

    compute: `bf16` (bf16 weights, as bf16-true, DeepSpeed bf16 and FSDP2's bf16 compute), `mixed` (fp32
    weights under bf16 autocast: DDP's bf16-mixed and the public recipe) or `fp32`.
    """
    start = time.perf_counter()
    weight_dtype, autocast_dtype = COMPUTE[compute]
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = meta_model.to(weight_dtype)
    with fake_mode:
        model.to_empty(device="cpu")
    model.train()
    apply_stage(model, parts)
    prepare_model(model, options)  # attention and checkpointing (the stock path's options say sdpa and full logits)
    input_dtype = torch.float32 if autocast_dtype else weight_dtype  # Lightning casts the batch under bf16-true only
    side = model.config.vision_config.image_size
    tracker = _StepTracker(model)
    # The loss's span: from the LM head's forward to the loss (the head's forward in ov_train's path, the end of
    # the model's forward in the stock one), and from the start of backward to the end of the head's backward.
    head = layout.lm_head(model)
    hooks = [head.register_forward_pre_hook(tracker.loss_begin), head.register_full_backward_hook(tracker.loss_end)]
    hooks.append((model if path == "stock" else head).register_forward_hook(tracker.loss_end))
    hooks += tracker.handles
    liger = stand_in_liger() if fused_loss else _nothing()
    rows = row_tokens = 1
    try:
        with warnings.catch_warnings(), fake_mode, liger, _RealIntegers(), tracker:
            # MemTracker warns about modules freed before backward: the loss modules made per call.
            warnings.filterwarnings("ignore", message="Module is None")
            pixels = lambda n: torch.empty((n, 3, side, side), dtype=input_dtype)  # noqa: E731
            batch = collated(samples, model.config.image_token_id, model.config.video_token_id, pixels)
            autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else _nothing()
            with autocast:
                if path == "stock":
                    loss = _stock_step(model, batch)
                    row_tokens = int(batch["attention_mask"].sum())
                else:
                    loss = _ours_step(model, batch, options)
            tracker.loss_begin()
            loss.backward()
            gradients = tracker.current(GRAD)
    finally:
        for hook in hooks:
            hook.remove()
    if path == "ov_train" and options.packing:
        from ov_train.model.packing import plan_rows

        lengths = batch["attention_mask"].sum(1).tolist()
        packed_rows = plan_rows(lengths, options.max_tokens)
        rows, row_tokens = len(packed_rows), max(sum(lengths[i] for i in row) for row in packed_rows)
    elif path == "ov_train":
        rows, row_tokens = batch["input_ids"].shape
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return Trace(
        weights=weights, gradients=gradients, activations=tracker.peak_other,
        activations_with_gradients=tracker.peak_other_grads, loss=tracker.loss_peak,
        seconds=round(time.perf_counter() - start, 1), rows=rows, row_tokens=row_tokens,
    )


@contextmanager
def _nothing():
    yield
