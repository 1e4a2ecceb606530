"""lmms-eval plugin: the `apt_llava` model, found by lmms-eval through the `lmms_eval.models` entry point.

pyproject.toml declares `apt_llava = "apt_hf.lmms_eval_plugin:manifest"`; lmms-eval calls `manifest()` when it
builds its model registry, so `lmms-eval --model apt_llava ...` works without editing lmms-eval. The model
classes live in `apt_llava.py` and are imported only when that model is asked for; `results.py` reads
lmms-eval's results files and needs no lmms-eval at all.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "apt_llava"
CHAT_CLASS_PATH = "apt_hf.lmms_eval_plugin.apt_llava.AptLlava"
SIMPLE_CLASS_PATH = "apt_hf.lmms_eval_plugin.apt_llava.AptLlavaSimple"


def manifest() -> Any:
    """lmms-eval's `ModelManifest` for `apt_llava`: the chat class by default, the simple one with --force_simple."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=SIMPLE_CLASS_PATH, chat_class_path=CHAT_CLASS_PATH)


__all__ = ["MODEL_ID", "manifest"]
