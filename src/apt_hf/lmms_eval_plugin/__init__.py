"""lmms-eval plugin: the `apt_llava` model, found by lmms-eval through the `lmms_eval.models` entry point.

pyproject.toml declares `apt_llava = "apt_hf.lmms_eval_plugin:manifest"`; lmms-eval calls `manifest()` when it
builds its model registry, so `lmms-eval --model apt_llava ...` works without editing lmms-eval. One module per
concern; only `model.py` imports lmms-eval, and it is imported only when that model is asked for:

- `model.py`: the lmms-eval classes `AptLlava` (chat) and `AptLlavaSimple` (--force_simple): loading, running the
  model (batched `generate`, padding-free loglikelihood) and reporting throughput to lmms-eval;
- `arguments.py`: --model_args and a task's generation_kwargs, parsed and checked;
- `prompts.py`: chat-template prompts and their images;
- `batching.py`: windowed, length-aware batching, collated as the processor would;
- `statistics.py`: throughput accounting (images/s without warm-up, its spread, tokens kept);
- `metrics.py`: the throughput metric names, defined once (the model logs them; results readers and cards read them);
- `results.py`: lmms-eval's results files read back (the one parser, also behind `apt_hf.model_card`);
- `comparison.py`: the stock-vs-APT comparison table of two results folders.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "apt_llava"
CHAT_CLASS_PATH = "apt_hf.lmms_eval_plugin.model.AptLlava"
SIMPLE_CLASS_PATH = "apt_hf.lmms_eval_plugin.model.AptLlavaSimple"


def manifest() -> Any:
    """lmms-eval's `ModelManifest` for `apt_llava`: the chat class by default, the simple one with --force_simple."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=SIMPLE_CLASS_PATH, chat_class_path=CHAT_CLASS_PATH)


__all__ = ["MODEL_ID", "manifest"]
