"""One validated way to get an APT vision-language model and its processor from a stock or APT checkpoint.

Training (`finetune_llava.py`), evaluation (the lmms-eval plugin) and the benchmarks call `load_apt_vlm` (also
named `load_apt_llava`). Every vision-language family of `apt_hf.families` is served the same way: a stock
checkpoint (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision) is converted with `apt_hf.convert` and the given APT fields (the
family's defaults for the rest), and its processor is wrapped by the family's APT processor; an APT checkpoint keeps
its own settings unless fields are given, which then go through the config's and the processor's validated
`replace_apt_fields`. Either way the model and processor are checked to agree before anything runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from .configuration_apt import APT_SETTINGS, validate_vision_feature_layout
from .conversion import convert
from .families import Family, vlm_families

APT_MODEL_TYPE = "apt_llava"  # LLaVA-1.5's; every family's types: vlm_model_types()
STOCK_MODEL_TYPE = "llava"


def vlm_model_types() -> dict[str, tuple[Family, bool]]:
    """Every model type a vision-language checkpoint may have: model_type -> (family, is_stock)."""
    types = {}
    for family in vlm_families():
        config = family.configs[0]
        types[config.stock_model_type] = (family, True)
        types[config.model_type] = (family, False)
    return types


def is_stock_model_type(model_type: str) -> bool:
    """Whether `checkpoint_model_type`'s answer names a stock checkpoint (to be converted) rather than an APT one."""
    return vlm_model_types().get(model_type, (None, False))[1]


def checkpoint_model_type(path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                          argument: str = "model_name_or_path") -> str:
    """The checkpoint's model type (e.g. "llava", "apt_llava_next"); anything but a supported stock or APT
    vision-language model is refused before loading weights."""
    accepted = vlm_model_types()
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{argument}: expected an APT or stock vision-language checkpoint (folder or hub id) of "
                         f"model_type {sorted(accepted)}, could not read a config from {path!r}: {err}") from err
    model_type = getattr(config, "model_type", None)
    if model_type not in accepted:
        raise ValueError(f"{argument}: expected a checkpoint of model_type {sorted(accepted)} (e.g. "
                         f"llava-hf/llava-1.5-7b-hf or an APT-LLaVA folder), {path!r} has model_type {model_type!r}")
    return model_type


def load_apt_vlm(
    path: str,
    *,
    apt_fields: dict[str, Any] | None = None,
    vision_feature_layout: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    backend: str | None = None,
    conversion_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    **load_kwargs: Any,
) -> tuple[PreTrainedModel, Any, bool]:
    """(model, processor, converted): the APT model of `path` with `apt_fields` / layout applied and checked.

    apt_fields: any of num_scales, thresholds, scorer, entropy_bins, image_mean, image_std. load_kwargs go to
    `from_pretrained` (dtype, attn_implementation, device_map, ...). `converted` says a stock checkpoint was converted
    here; `conversion_context` wraps that load (training disables DeepSpeed ZeRO-3 init there).
    """
    fields = dict(apt_fields or {})
    unknown = sorted(set(fields) - set(APT_SETTINGS))
    if unknown:
        raise ValueError(f"apt_fields: {unknown[0]!r} is not an APT setting; expected some of {list(APT_SETTINGS)}")
    if vision_feature_layout is not None:
        validate_vision_feature_layout(vision_feature_layout)
    kind = checkpoint_model_type(path, revision=revision, trust_remote_code=trust_remote_code)
    family, stock = vlm_model_types()[kind]
    if stock:
        # the family's processor loads the stock one itself (OneVision's cannot load through AutoProcessor without
        # torchvision); the APT fields follow the converted model's below
        patch_size = int(AutoConfig.from_pretrained(path, revision=revision).vision_config.patch_size)
        processor = family.processor.from_stock_processor(
            path, vision_feature_layout=vision_feature_layout or "packed", backend=backend, patch_size=patch_size)
        for stat in ("image_mean", "image_std"):  # the dense path un-normalises with the processor's statistics
            fields.setdefault(stat, list(getattr(processor.image_processor, stat)))
        with conversion_context():
            stock_model = AutoModelForImageTextToText.from_pretrained(path, revision=revision, **load_kwargs)
            model = convert(stock_model, vision_feature_layout=vision_feature_layout or "packed", **fields)
        del stock_model
        processor.replace_apt_fields(**model.config.apt_fields)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, revision=revision,
                                                            trust_remote_code=trust_remote_code, **load_kwargs)
        processor_kwargs = {} if backend is None else {"backend": backend}
        processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                                  **processor_kwargs)
        if fields:
            model.config.replace_apt_fields(**fields)
        if vision_feature_layout is not None:
            model.config.vision_feature_layout = vision_feature_layout
        if fields or vision_feature_layout is not None:
            processor.replace_apt_fields(vision_feature_layout=model.config.vision_feature_layout,
                                         **model.config.apt_fields)
    check_model_and_processor(model, processor)
    return model, processor, stock


load_apt_llava = load_apt_vlm  # the name from LLaVA-1.5 days, kept


def check_model_and_processor(model: Any, processor: Any) -> None:
    """Refuse a processor that would feed the model other token counts or another layout than it expects."""
    config = model.config
    vision = config.vision_config
    image_processor = processor.image_processor
    pairs = [("vision_feature_layout", config.vision_feature_layout, processor.vision_feature_layout),
             ("patch_size", vision.patch_size, image_processor.patch_size),
             *((name, getattr(vision, name), getattr(image_processor, name)) for name in
               ("num_scales", "thresholds", "scorer", "entropy_bins"))]
    for name in ("image_mean", "image_std"):
        pairs.append((name, [round(float(v), 6) for v in getattr(vision, name)],
                      [round(float(v), 6) for v in getattr(image_processor, name)]))
    for name, model_value, processor_value in pairs:
        if model_value != processor_value:
            raise ValueError(f"{name}: the model uses {model_value!r} but the processor {processor_value!r}; save "
                             "both with the same settings (e.g. AptLlavaProcessor.from_llava_processor(..., "
                             "**model.config.apt_fields)) or pass the setting to both")


__all__ = ["APT_MODEL_TYPE", "STOCK_MODEL_TYPE", "check_model_and_processor", "checkpoint_model_type",
           "is_stock_model_type", "load_apt_llava", "load_apt_vlm", "vlm_model_types"]
