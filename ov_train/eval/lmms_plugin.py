"""lmms-eval's entry point (`lmms_eval.models` in pyproject.toml): registers `--model ov_train` without importing
lmms-eval or the model until lmms-eval asks for it."""
from __future__ import annotations


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="ov_train", simple_class_path="ov_train.eval.lmms_model.OvTrain")
