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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from ..configuration_apt import validate_vision_feature_layout
from .arguments import AptArguments, ModelArguments, parse_trainable

logger = logging.getLogger(__name__)

APT_MODEL_TYPE = "apt_llava"
STOCK_MODEL_TYPE = "llava"
TRAINING_INFO_FILE = "apt_training.json"


def apt_llava_class() -> type:
    """The APT-LLaVA model class; the one place that names it."""
    from ..modeling_apt_llava import AptLlavaForConditionalGeneration

    return AptLlavaForConditionalGeneration


def apt_processor_class() -> type:
    from ..processing_apt_llava import AptLlavaProcessor

    return AptLlavaProcessor


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


def checkpoint_model_type(model_name_or_path: str, trust_remote_code: bool = True) -> str:
    """model_type of a checkpoint, refusing anything that is not LLaVA or APT-LLaVA."""
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    model_type = getattr(config, "model_type", None)
    if model_type not in (STOCK_MODEL_TYPE, APT_MODEL_TYPE):
        raise ValueError(
            f"model_name_or_path: expected a LLaVA (model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf) or APT-LLaVA "
            f"('apt_llava') checkpoint, got model_type {model_type!r} from {model_name_or_path!r}"
        )
    return model_type


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
) -> tuple[Any, Any]:
    """The APT-LLaVA model and its AptLlavaProcessor for `model_name_or_path` (stock or APT)."""
    path = model_args.model_name_or_path
    model_type = checkpoint_model_type(path, model_args.trust_remote_code)
    apt_fields = apt_args.given()
    load_kwargs: dict[str, Any] = {"dtype": dtype}
    attn = resolve_attn_implementation(model_args.attn_implementation)
    if attn is not None:
        load_kwargs["attn_implementation"] = attn
    model_cls, processor_cls = apt_llava_class(), apt_processor_class()
    if model_type == STOCK_MODEL_TYPE:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        layout = model_args.vision_feature_layout or "packed"
        with _zero3_init_disabled():
            stock = LlavaForConditionalGeneration.from_pretrained(path, **load_kwargs)
            model = model_cls.from_llava(stock, vision_feature_layout=layout, **apt_fields)
        del stock
        stock_processor = AutoProcessor.from_pretrained(path)
        processor = processor_cls.from_llava_processor(stock_processor, vision_feature_layout=layout, **apt_fields)
    else:
        from transformers import AutoProcessor

        overrides = dict(apt_fields)
        if model_args.vision_feature_layout is not None:
            overrides["vision_feature_layout"] = model_args.vision_feature_layout
        model = model_cls.from_pretrained(path, **load_kwargs)
        _override_apt_config(model, overrides)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
        if overrides:
            layout = overrides.pop("vision_feature_layout", processor.vision_feature_layout)
            processor = processor_cls.from_llava_processor(processor, vision_feature_layout=layout, **overrides)
    _check_match(model, processor)
    return model, processor


def _override_apt_config(model: Any, overrides: dict[str, Any]) -> None:
    """Apply command-line APT fields to a loaded APT-LLaVA, so the saved config matches the saved processor.

    The APT fields live on the vision config (the LLaVA config only mirrors them); the processor applies them
    to the images, the model reads them for dense `pixel_values` input.
    """
    overrides = dict(overrides)
    if "vision_feature_layout" in overrides:
        model.config.vision_feature_layout = validate_vision_feature_layout(overrides.pop("vision_feature_layout"))
    if overrides:
        model.config.replace_apt_fields(**overrides)


def _check_match(model: Any, processor: Any) -> None:
    """The processor's token counts must be what the model expects, or every batch fails at the first step."""
    layout = getattr(model.config, "vision_feature_layout", None)
    if layout is not None and layout != processor.vision_feature_layout:
        raise ValueError(f"vision_feature_layout: the model uses {layout!r} but the processor "
                         f"{processor.vision_feature_layout!r}")


# ------------------------------------------------------------------------------------------- trainable parts


def _module_names(model: Any, params: list[torch.nn.Parameter]) -> list[str]:
    """Names of the modules that directly own `params` (what PEFT's modules_to_save expects)."""
    wanted = {id(p) for p in params}
    names = {name.rsplit(".", 1)[0] for name, p in model.named_parameters() if id(p) in wanted}
    # Drop names nested inside another selected module: PEFT must not wrap a module twice.
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names if o != n))


def lora_target_regex(target_modules: str) -> str:
    """Linear layers of the language model only: the vision tower also has q_proj / k_proj / v_proj."""
    names = [n.strip() for n in target_modules.split(",") if n.strip()]
    if not names:
        raise ValueError(f"lora_target_modules: expected a comma list of layer names, got {target_modules!r}")
    return rf"(.*\.)?language_model\..*\.({'|'.join(map(_re_escape, names))})"


def _re_escape(name: str) -> str:
    import re

    return re.escape(name)


def setup_trainable(model: Any, model_args: ModelArguments, upcast: bool) -> Any:
    """Freeze everything, unfreeze the `--trainable` parts, add LoRA when asked; return the model to train.

    With `upcast`, trainable parameters are float32 (autocast computes in bf16/fp16): APT's learning rate
    (2e-6) is far below bfloat16's resolution for weights near 1e-2, so bf16 master weights would not move.
    """
    parts = parse_trainable(model_args.trainable)
    model.requires_grad_(False)
    trainable = [p for part in parts for p in model.parameters_of(part)]
    if model_args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        save_modules = _module_names(model, trainable)
        config = LoraConfig(
            r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
            target_modules=lora_target_regex(model_args.lora_target_modules), modules_to_save=save_modules or None,
        )
        model = get_peft_model(model, config)
    else:
        for p in trainable:
            p.requires_grad_(True)
    if upcast:
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    if n_train == 0:
        raise ValueError(f"trainable: {model_args.trainable!r} selects no parameters in this model")
    logger.info("trainable parameters: %s of %s (%.4f%%): %s%s", f"{n_train:,}", f"{n_all:,}",
                100 * n_train / n_all, ",".join(parts), f" + LoRA r={model_args.lora_r}" if model_args.lora_r else "")
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
    model_cls = apt_llava_class()
    base = info["base_model_name_or_path"]
    if info["base_model_type"] == STOCK_MODEL_TYPE:
        model = model_cls.from_llava(base, vision_feature_layout=info["vision_feature_layout"] or "packed",
                                     **info["apt_fields"])
    else:
        model = model_cls.from_pretrained(base, **load_kwargs)
    return PeftModel.from_pretrained(model, str(adapter_dir))
