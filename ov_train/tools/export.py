"""Write a Hugging Face directory (model, tokenizer, processor settings) that stock transformers loads."""
from __future__ import annotations

import io
import json
from contextlib import contextmanager
from pathlib import Path

from transformers import LlavaOnevisionImageProcessorPil

from ov_train.text.chat_template import chat_template, stop_token_ids
from ov_train.text.template import TEMPLATES
from ov_train.tools.model_card import card_facts, model_card
from ov_train.utils.safe_load import TRUST_HINT, CheckpointError, load_dcp_metadata, load_file, load_source
from ov_train.vision.geometry import VisionGeometry


def processor_settings(geometry: VisionGeometry) -> dict:
    size = {"height": geometry.image_size, "width": geometry.image_size}
    return {
        "size": size,
        "image_grid_pinpoints": [list(p) for p in geometry.grid_pinpoints],
        "image_mean": list(geometry.image_mean),
        "image_std": list(geometry.image_std),
    }


def export_pretrained(model, tokenizer, out_dir: str | Path, template: str = "qwen_1_5", card: dict | None = None) -> Path:
    """save_pretrained of model and tokenizer, plus image, video and processor settings of the same geometry.

    `template` is the stage's chat template: the export's chat template renders it for the stock processor,
    and its config and generation config stop generation where training's replies end. `card` holds the
    facts of the model card (README.md; tools/model_card.py: card_facts).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _generation_ids(model, tokenizer, template):
        model.save_pretrained(out)
    _save_tokenizer(tokenizer, chat_template(template), out)
    geometry = VisionGeometry.from_model_config(model.config)
    settings = processor_settings(geometry)
    LlavaOnevisionImageProcessorPil(**settings).save_pretrained(out)
    # The video processor needs torchvision to be built; its settings are plain data, written as such.
    video = {
        "video_processor_type": "LlavaOnevisionVideoProcessor",
        "size": settings["size"],
        "image_mean": settings["image_mean"],
        "image_std": settings["image_std"],
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    processor = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": geometry.side * geometry.side,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
        "vision_aspect_ratio": model.config.vision_aspect_ratio,
        "image_token": "<image>",
        "video_token": "<video>",
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    (out / "README.md").write_text(model_card(out.name, template, card or {}, path=out))
    return out


@contextmanager
def _generation_ids(model, tokenizer, template: str):
    """End-of-reply and padding ids in the model config and the generation config while the model is saved, so
    that `generate` stops where training's replies stop and pads batches with the tokenizer's pad token; the
    caller's model keeps its own."""
    stop = stop_token_ids(tokenizer, template)
    eos = stop[0] if len(stop) == 1 else stop
    configs = (model.config, model.config.text_config, model.generation_config)  # tools read any of them
    keys = ("eos_token_id", "pad_token_id")
    own = [{k: getattr(c, k) for k in keys if hasattr(c, k)} for c in configs]
    for config in configs:
        config.eos_token_id, config.pad_token_id = eos, tokenizer.pad_token_id
    try:
        yield
    finally:
        for config, values in zip(configs, own):
            for key in keys:
                if key in values:
                    setattr(config, key, values[key])
                else:
                    delattr(config, key)


def _save_tokenizer(tokenizer, template_text: str, out: Path) -> None:
    """save_pretrained with the export's chat template (written as chat_template.jinja, which the processor
    reads too); the caller's tokenizer keeps its own."""
    own = tokenizer.chat_template
    tokenizer.chat_template = template_text
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = own


def checkpoint_format(path: str | Path) -> str:
    """`file` (a Lightning checkpoint), `deepspeed` (a ZeRO checkpoint directory) or `fsdp2` (a distributed one)."""
    path = Path(path)
    if path.is_file():
        return "file"
    if (path / "latest").is_file():
        return "deepspeed"
    if (path / ".metadata").is_file():
        return "fsdp2"
    raise CheckpointError(
        f"{path}: not a checkpoint (neither a file, nor a DeepSpeed directory with 'latest',"
        " nor a torch.distributed.checkpoint directory with '.metadata')"
    )


def _inside(root: Path, name: str) -> Path:
    """root/name, refusing names (read from the checkpoint itself) that lead out of root."""
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise CheckpointError(f"{root}: names {name!r}, outside the checkpoint directory")
    return target


def _deepspeed_files(path: Path) -> list[Path]:
    """The tag directory's files, rank 0's model states (the Lightning checkpoint minus weights and optimizer) first."""
    tag_dir = _inside(path, (path / "latest").read_text().strip())
    files = sorted(tag_dir.glob("*.pt"), key=lambda f: (not f.name.endswith("model_states.pt"), f.name))
    if not files or not files[0].name.endswith("model_states.pt"):
        raise CheckpointError(f"{tag_dir}: a DeepSpeed checkpoint directory without *model_states.pt")
    return files


def _check_dcp(path: Path, trust: bool) -> None:
    """A torch.distributed.checkpoint directory's pickles: `.metadata`, and its non-tensor entries (torch.save
    records inside the .distcp files), which torch's default load planner unpickles with weights_only=False."""
    metadata = load_dcp_metadata(path / ".metadata", trust=trust)
    if trust:
        return
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, BytesStorageMetadata):
            continue  # tensors are read as raw storage, with weights_only=True
        info = metadata.storage_data[MetadataIndex(fqn)]
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{path}: entry {fqn} is stored transformed, so it cannot be checked; {TRUST_HINT}")
        with open(_inside(path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            load_source(io.BytesIO(f.read(info.length)), f"{path / info.relative_path} (entry {fqn})")


def checkpoint_metadata(path: str | Path, trust: bool = False) -> dict:
    """The Lightning checkpoint's entries other than weights and optimizer state (global_step, ov_train, ...).

    Every pickle of the checkpoint is read here with weights_only (unless `trust`), so what Lightning, DeepSpeed
    and torch.distributed.checkpoint unpickle afterwards, some of it with weights_only=False, was checked first.
    """
    path = Path(path)
    kind = checkpoint_format(path)
    if kind == "deepspeed":
        model_states, *others = _deepspeed_files(path)
        for f in others:
            load_file(f, trust=trust, deepspeed=True)
        meta = load_file(model_states, trust=trust, deepspeed=True)
    elif kind == "fsdp2":
        _check_dcp(path, trust)
        meta = load_file(path / "meta.pt", trust=trust)  # Lightning's name (lightning.fabric.utilities.load)
    else:
        meta = load_file(path, trust=trust)
    if not isinstance(meta, dict) or (kind == "file" and "state_dict" not in meta):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return meta


def _load_weights(path: Path, kind: str, model, trust: bool = False, trainable_only: bool = False) -> None:
    """Fill `model` with the checkpoint's fp32 weights: every tensor must be there, and nothing else; with
    `trainable_only` (an adapter checkpoint), exactly the tensors that train (requires_grad), the rest staying as
    the model was built (its base). The checkpoint's pickles were checked by checkpoint_metadata."""
    wanted = {k for k, p in model.named_parameters() if p.requires_grad} if trainable_only else set(model.state_dict())
    if kind == "fsdp2":
        import torch.distributed.checkpoint as dcp

        # Read in place into full tensors, without a process group: no_dist reassembles every shard here.
        current = model.state_dict(keep_vars=True)
        target = {"state_dict": {f"model.{k}": current[k].data for k in wanted}}
        stored = {k for k in load_dcp_metadata(path / ".metadata", trust=trust).state_dict_metadata if k.startswith("state_dict.")}
        expected = {f"state_dict.{k}" for k in target["state_dict"]}
        if stored != expected:
            missing, unexpected = sorted(expected - stored)[:5], sorted(stored - expected)[:5]
            raise CheckpointError(f"{path}: weights do not fit the model: missing {missing}, unexpected {unexpected}")
        dcp.load(target, checkpoint_id=path, no_dist=True)
        return
    if kind == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The fp32 master weights, gathered from every rank's optimizer partition (ZeRO-2 and ZeRO-3 alike).
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), exclude_frozen_parameters=trainable_only)
    else:
        state = load_file(path, trust=trust)["state_dict"]
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if trainable_only and set(state) != wanted:
        missing, unexpected = sorted(wanted - set(state))[:5], sorted(set(state) - wanted)[:5]
        raise CheckpointError(f"{path}: its trainable tensors do not fit its adapters: missing {missing}, unexpected"
                              f" {unexpected}")
    try:
        model.load_state_dict(state, strict=not trainable_only)
    except RuntimeError as err:  # missing, unexpected or differently sized tensors, all listed
        raise CheckpointError(f"{path}: weights do not fit the model recorded in it: {err}") from None


def _ov_train_metadata(path: Path, trust: bool) -> dict:
    meta = checkpoint_metadata(path, trust).get("ov_train")
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{path}: not an ov_train checkpoint (no 'ov_train' metadata with the model config)")
    return meta


def adapter_record(ckpt_path: str | Path, trust: bool = False):
    """The AdapterRun an adapter checkpoint records (settings, modes, base), or None for a full checkpoint."""
    from ov_train.model.adapters import AdapterRun

    record = _ov_train_metadata(Path(ckpt_path), trust).get("adapter")
    return AdapterRun.from_dict(record) if record else None


def rebuild_base(record, trust: bool = False, base_dir: str | Path | None = None, tokenizer_dir: str | None = None):
    """The base model an adapter run trained on, rebuilt from what its checkpoint records (model.* routes and
    the seed, which also decides random weights and rows added for new tokens), or from `base_dir`, a Hugging Face
    directory of that base."""
    from omegaconf import OmegaConf

    from ov_train.model.build import build_model
    from ov_train.utils.paths import cache_dir

    node = dict(record.base["model"])
    if base_dir is not None:
        node.update(pretrained=str(base_dir), init_from=None, vision_tower=None, llm=None, random_init=False,
                    tokenizer=tokenizer_dir or node.get("tokenizer"))
    model, _ = build_model(OmegaConf.create(node), cache_dir(), trust_checkpoint=trust, seed=record.base["seed"])
    return model


def adapted_from_checkpoint(ckpt_path: str | Path, trust: bool = False, base_dir: str | Path | None = None,
                            quantize: bool = False):
    """An adapter checkpoint on its base: (PeftModel with the trained tensors loaded, tokenizer_dir, AdapterRun).
    With `quantize` (QLoRA runs going on), the base LLM is quantized as in training."""
    from ov_train.model.adapters import adapted_parts, stage_lrs, wrap
    from ov_train.model.parts import apply_stage

    path = Path(ckpt_path)
    meta = _ov_train_metadata(path, trust)
    record = adapter_record(path, trust)
    model = rebuild_base(record, trust, base_dir, meta.get("tokenizer_dir"))
    peft_model = wrap(model, record.settings, record.modes, _base_path(record, base_dir), quantize=quantize)
    # What trained is what the checkpoint holds: the same rule as training's (ov_train.model.parts).
    apply_stage(model, stage_lrs({p: 1.0 for p in record.modes}, record.modes), adapted=adapted_parts(record.modes))
    _load_weights(path, checkpoint_format(path), model, trust, trainable_only=True)
    return peft_model, meta.get("tokenizer_dir"), record


def _base_path(record, base_dir) -> str | None:
    node = record.base["model"]
    return str(base_dir) if base_dir else node.get("pretrained") or node.get("init_from")


def model_from_checkpoint(ckpt_path: str | Path, trust: bool = False, base_dir: str | Path | None = None):
    """Rebuild the trained model from any checkpoint ov_train writes (file, DeepSpeed or FSDP2 directory).

    Returns (model, tokenizer_dir). Sharded checkpoints are consolidated here, on CPU, in one process. An adapter
    checkpoint is put on its base (rebuilt from its record, or `base_dir`) and merged into it: a stock model. Nothing in
    the checkpoint is unpickled beyond tensors and plain data unless `trust`; CheckpointError says what is wrong.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    path = Path(ckpt_path)
    kind = checkpoint_format(path)
    meta = _ov_train_metadata(path, trust)
    if meta.get("adapter"):
        peft_model, tokenizer_dir, _ = adapted_from_checkpoint(path, trust, base_dir)
        return merged(peft_model), tokenizer_dir
    try:
        config = LlavaOnevisionConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{ckpt_path}: its model config does not load: {err}") from None
    model = LlavaOnevisionForConditionalGeneration(config)
    _load_weights(path, kind, model, trust)
    return model, meta.get("tokenizer_dir")


def merged(peft_model):
    """The adapters merged into their base weights (PEFT's merge_and_unload): a stock model, every tensor trainable
    again as a plain model's are."""
    model = peft_model.merge_and_unload()
    model.requires_grad_(True)
    return model


def export_checkpoint(ckpt_path, out_dir, tokenizer=None, trust: bool = False, base_dir=None,
                      adapter_only: bool = False, template: str | None = None) -> Path:
    """Write a checkpoint's export: a stock Hugging Face directory; for an adapter checkpoint merged, with the
    adapters in PEFT's format in OUT/adapter/ (`adapter_only`: OUT holds just those). `tokenizer` defaults to the
    one the checkpoint records, `template` to the chat template it records (else qwen_1_5)."""
    from ov_train.model.tokenizer import load_tokenizer

    path, out = Path(ckpt_path), Path(out_dir)
    meta = _ov_train_metadata(path, trust)
    if meta.get("adapter"):
        peft_model, tokenizer_dir, _ = adapted_from_checkpoint(path, trust, base_dir)
        if adapter_only:
            peft_model.save_pretrained(out)
            return out
        peft_model.save_pretrained(out / "adapter")
        model = merged(peft_model)
    elif adapter_only:
        raise CheckpointError(f"{path}: a full checkpoint, without adapters; drop --adapter-only")
    else:
        model, tokenizer_dir = model_from_checkpoint(path, trust)
    tokenizer = tokenizer or _tokenizer(tokenizer_dir, load_tokenizer)
    facts = card_facts(checkpoint_metadata(path, trust=trust))
    return export_pretrained(model, tokenizer, out, template=template or facts["template"] or "qwen_1_5", card=facts)


def _tokenizer(tokenizer_dir, load):
    if not tokenizer_dir or not Path(tokenizer_dir).exists():
        raise CheckpointError(f"tokenizer directory not found: {tokenizer_dir!r}; pass --tokenizer DIR")
    return load(tokenizer_dir)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ov_train.model.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="ov-export", description=__doc__)
    parser.add_argument(
        "ckpt", help="a checkpoint written by ov_train (RUN/checkpoints/last.ckpt: a file, or a DeepSpeed / FSDP2 directory)"
    )
    parser.add_argument("out", help="output directory for the Hugging Face export")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded in the checkpoint)")
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="unpickle the checkpoint fully, objects of any class included (that can run code: only for files you trust)",
    )
    parser.add_argument(
        "--template", choices=TEMPLATES,
        help="the chat template the model was trained with (default: the one recorded in the checkpoint, else qwen_1_5)",
    )
    parser.add_argument("--adapter-only", action="store_true",
                        help="an adapter checkpoint: write only its adapters, in PEFT's format (PeftModel.from_pretrained)")
    parser.add_argument("--base", help="an adapter checkpoint's base model, a Hugging Face directory (default: rebuilt"
                        " from what the checkpoint records: model.pretrained, ..., or the seed of a random init)")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).exists():
        parser.error(f"checkpoint not found: {args.ckpt}")
    if args.base and not Path(args.base).is_dir():
        parser.error(f"--base {args.base}: not a directory")
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        export_checkpoint(args.ckpt, args.out, tokenizer, args.trust_checkpoint, args.base, args.adapter_only,
                          args.template)
    except (CheckpointError, OSError) as err:
        parser.error(str(err))
    print(f"exported {args.ckpt} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
