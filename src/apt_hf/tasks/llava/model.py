"""Load the model to fine-tune and decide what trains.

A stock LLaVA checkpoint is converted to APT-LLaVA on the fly with the requested APT fields; an APT-LLaVA
checkpoint is loaded as is (APT fields given on the command line override its own). `--trainable` picks whole
parts; `--lora_r` wraps the language model's linear layers in PEFT LoRA, with every other trained part saved
in the adapter as `modules_to_save` so that the adapter alone restores the fine-tune.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ...conversion import convert
from ...loading import is_stock_model_type, load_apt_vlm
from ...training.arguments import AptArguments
from ...training.trainable import check_trainable, parse_parts, select_parameters
from .arguments import TRAINABLE_PARTS, ModelArguments

logger = logging.getLogger(__name__)

TRAINING_INFO_FILE = "apt_training.json"


def resolve_dtype(name: str, bf16: bool = False, fp16: bool = False, sharding: str | None = None) -> torch.dtype:
    """'auto': the mixed-precision flag's dtype (frozen weights in bf16 / fp16 under autocast), float32 otherwise.

    FSDP keeps float32 shards and casts for compute itself, so 'auto' is float32 there.
    """
    if name == "auto":
        if sharding == "fsdp":
            return torch.float32
        return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    return getattr(torch, name)


def sharding_backend(training_args: Any) -> str | None:
    """'deepspeed' or 'fsdp' when the run shards the model (from the flags or `accelerate launch`'s config)."""
    import os

    def env(name: str) -> bool:
        return os.environ.get(name, "false").lower() in ("1", "true", "yes")

    if training_args.deepspeed or env("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if training_args.fsdp or env("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def resolve_attn_implementation(name: str | None) -> str | dict[str, str] | None:
    """The flag as given; unset: flash-attn 2 for the language model when it can run (installed, on a GPU).

    The automatic choice leaves the vision tower alone: APT packs images itself and picks its own kernel.
    """
    if name is not None:
        return name
    from transformers.utils import is_flash_attn_2_available

    if torch.cuda.is_available() and is_flash_attn_2_available():
        return {"text_config": "flash_attention_2"}
    return None


@contextlib.contextmanager
def _zero3_init_disabled() -> Iterator[None]:
    """Load unpartitioned: the on-the-fly conversion reads full weights (DeepSpeed partitions them afterwards)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    obj = ref() if ref is not None else None
    if obj is None or not obj.is_zero3():
        yield
        return
    logger.warning("ZeRO-3: loading the stock LLaVA unpartitioned on every rank to convert it; for 13B+ convert "
                   "once with scripts/convert_to_apt.py and train from the converted checkpoint instead")
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(obj)


def load_model_and_processor(
    model_args: ModelArguments, apt_args: AptArguments, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any, bool]:
    """The APT-LLaVA model, its AptLlavaProcessor, and whether a stock LLaVA was converted on the fly."""
    load_kwargs: dict[str, Any] = {"dtype": dtype}
    attn = resolve_attn_implementation(model_args.attn_implementation)
    if attn is not None:
        load_kwargs["attn_implementation"] = attn
    return load_apt_vlm(model_args.model_name_or_path, apt_fields=apt_args.given(),
                          vision_feature_layout=model_args.vision_feature_layout,
                          trust_remote_code=model_args.trust_remote_code, conversion_context=_zero3_init_disabled,
                          **load_kwargs)


# ------------------------------------------------------------------------------------------- trainable parts


def _module_names(param_names: list[str]) -> list[str]:
    """Names of the modules that directly own the named parameters (what PEFT's modules_to_save expects)."""
    names = {name.rsplit(".", 1)[0] for name in param_names}
    # Drop names nested inside another selected module: PEFT must not wrap a module twice.
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names if o != n))


def lora_target_regex(target_modules: str) -> str:
    """Linear layers of the language model only: the vision tower also has q_proj / k_proj / v_proj."""
    names = [n.strip() for n in target_modules.split(",") if n.strip()]
    if not names:
        raise ValueError(f"lora_target_modules: expected a comma list of layer names, got {target_modules!r}")
    return rf"(.*\.)?language_model\..*\.({'|'.join(map(re.escape, names))})"


def setup_trainable(model: Any, model_args: ModelArguments, upcast: bool) -> Any:
    """Freeze everything, unfreeze the `--trainable` parts, add LoRA when asked; return the model to train.

    With `upcast`, trainable parameters are float32 (autocast computes in bf16/fp16): APT's learning rate
    (2e-6) is far below bfloat16's resolution for weights near 1e-2, so bf16 master weights would not move.
    """
    parts = parse_parts(model_args.trainable, TRAINABLE_PARTS)
    model.requires_grad_(False)
    trainable = select_parameters(model, parts)
    if model_args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        save_modules = _module_names(list(trainable))
        config = LoraConfig(
            r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
            target_modules=lora_target_regex(model_args.lora_target_modules), modules_to_save=save_modules or None,
        )
        model = get_peft_model(model, config)
    else:
        for p in trainable.values():
            p.requires_grad_(True)
    if upcast:
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    check_trainable(model, model_args.trainable, f" + LoRA r={model_args.lora_r}" if model_args.lora_r else "")
    return model


# ------------------------------------------------------------------------------------------- saving / loading


def save_training_info(output_dir: str | Path, model_args: ModelArguments, apt_args: AptArguments,
                       model_type: str, layout: str | None) -> None:
    """Record how the base model was built, so a LoRA adapter can be re-attached (`load_lora_model`)."""
    info = {
        "base_model_name_or_path": model_args.model_name_or_path, "base_model_type": model_type,
        "vision_feature_layout": layout, "apt_fields": apt_args.given(), "trainable": model_args.trainable,
        "lora_r": model_args.lora_r,
    }
    Path(output_dir, TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2))


def load_lora_model(adapter_dir: str | Path, **load_kwargs: Any) -> Any:
    """Rebuild the APT-LLaVA base recorded in `apt_training.json` and attach the adapter saved next to it."""
    from peft import PeftModel

    info = json.loads(Path(adapter_dir, TRAINING_INFO_FILE).read_text())
    base = info["base_model_name_or_path"]
    if is_stock_model_type(info["base_model_type"]):
        layout = info["vision_feature_layout"] or "packed"
        model = convert(base, vision_feature_layout=layout, **info["apt_fields"])
    else:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(base, **load_kwargs)
    return PeftModel.from_pretrained(model, str(adapter_dir))
