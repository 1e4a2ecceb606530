"""LoRA adapters that load the standard way: a named APT base on disk, and a real card instead of PEFT's template.

    base = AutoModelForImageTextToText.from_pretrained(adapter_config["base_model_name_or_path"],
                                                       trust_remote_code=True)
    model = PeftModel.from_pretrained(base, adapter_dir)

When training started from a stock LLaVA (converted on the fly), no APT base exists anywhere: the converted base is
saved in `<adapter>/base` (model, processor, code) and named in `adapter_config.json`. PEFT has no Auto class for
image-text-to-text models, hence the two-line load above (`AutoPeftModelForCausalLM` would build a text-only model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

BASE_DIR = "base"


def finish_adapter(adapter_dir: str | Path, base_model: str, converted: bool, processor: Any,
                   apt_fields: dict[str, Any], layout: str) -> str:
    """Name the adapter's base in adapter_config.json (saving a converted one beside it) and write its card.

    Returns the base's path or id.
    """
    from ...conversion import convert

    adapter_dir = Path(adapter_dir).resolve()
    if converted:
        base = convert(base_model, vision_feature_layout=layout, **apt_fields)
        base.save_pretrained(adapter_dir / BASE_DIR)
        processor.save_pretrained(adapter_dir / BASE_DIR)
        base_model = str(adapter_dir / BASE_DIR)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    adapter_card(base_model, converted, config).save(adapter_dir / "README.md")
    return base_model


def adapter_card(base_model: str, converted: bool, config: dict[str, Any]) -> ModelCard:
    data = ModelCardData(library_name="peft", base_model=None if converted else base_model,
                         tags=["apt", "adaptive-patch-transformers", "lora", "llava"],
                         pipeline_tag="image-text-to-text")
    origin = ("the stock LLaVA converted to APT for this run, saved in `base/` beside this adapter"
              if converted else f"`{base_model}`")
    saved = ", ".join(config.get("modules_to_save") or []) or "none"
    text = f"""---
{data.to_yaml()}
---

# APT-LLaVA LoRA adapter

A LoRA adapter (r={config.get("r")}, alpha={config.get("lora_alpha")}) on the language model of an APT-LLaVA,
trained with `scripts/finetune_llava.py`. Its base is {origin}. The other trained parts are saved whole with the
adapter (`modules_to_save`: {saved}).

## Load

```python
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

base = AutoModelForImageTextToText.from_pretrained("{base_model}", trust_remote_code=True)
model = PeftModel.from_pretrained(base, "path/to/this/adapter")
processor = AutoProcessor.from_pretrained("{base_model}", trust_remote_code=True)
```

PEFT has no Auto class for image-text-to-text models, so load the base with transformers and attach the adapter;
`model.merge_and_unload()` gives a plain APT-LLaVA.
"""
    return ModelCard(text)


__all__ = ["BASE_DIR", "adapter_card", "finish_adapter"]
