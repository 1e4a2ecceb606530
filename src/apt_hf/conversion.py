"""Stock transformers models -> their APT counterparts, every pretrained weight kept: `apt_hf.convert`.

One conversion serves every family: each APT model class declares the stock class whose weights it holds
(`stock_class`, and `stock_containers` that hold one as an attribute); the stock config becomes the APT config
(`config_class.from_stock_config`), the stock tensors are adopted (not copied) and APT's two new layers are
initialised. It runs only at conversion time, so it lives outside the remote-code set; `import apt_hf` installs it
as the APT classes' converter, which `from_clip` / `from_vit` / `from_siglip` / `from_llava` call.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import logging

from .configuration_apt import APT_SETTINGS
from .families import model_classes
from .modeling_apt import AptPreTrainedMixin, init_apt_layer
from .packed_attention import APT_VARLEN

logger = logging.get_logger(__name__)

# Attention backends only APT's packed vision tower has: a str naming one applies to the vision tower alone.
VISION_ONLY_ATTN = ("varlen", APT_VARLEN)
CONFIG_LOAD_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "subfolder")
# SigLIP2's NaFlex models (variable resolution, a Linear patch embedding over `spatial_shapes`): not supported.
NAFLEX_MODEL_TYPES = ("siglip2", "siglip2_vision_model")
CONVERSION_OPTIONS = ("vision_feature_layout",)  # what a family's config takes beyond the APT fields


def convert(stock_model_or_path: Any, **kwargs: Any) -> PreTrainedModel:
    """The APT counterpart of any supported stock model (object, local path or hub id): a `CLIPVisionModel` gives an
    `AptCLIPVisionModel`, a `CLIPModel` an `AptCLIPModel`, a `ViTForImageClassification` an
    `AptViTForImageClassification`, a `SiglipModel` an `AptSiglipModel`, a `LlavaForConditionalGeneration` an
    `AptLlavaForConditionalGeneration`, and so on (`apt_hf.families`).

    kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins; default: the family's), image_mean /
    image_std (default: the checkpoint's image processor), attn_implementation, vision_feature_layout (LLaVA), and
    from_pretrained options (dtype, revision, ...) for paths.
    """
    return convert_to(apt_class_for(stock_model_or_path, kwargs), stock_model_or_path, **kwargs)


def apt_class_for(model_or_path: Any, load_kwargs: dict[str, Any] | None = None) -> type[PreTrainedModel]:
    """The APT class that converts this stock model (object, or a checkpoint's config.json architectures)."""
    if isinstance(model_or_path, nn.Module):
        name = type(model_or_path).__name__
        model_type = getattr(getattr(model_or_path, "config", None), "model_type", None)
    elif isinstance(model_or_path, (str, os.PathLike)):
        settings = _config_dict(os.fspath(model_or_path), load_kwargs or {})
        name, model_type = (settings.get("architectures") or [None])[0], settings.get("model_type")
    else:
        raise ValueError(f"stock_model_or_path: expected a model, a path or a hub id, got "
                         f"{type(model_or_path).__name__}")
    _refuse_unconvertible(model_type, name)
    candidates = [cls for cls in model_classes() if cls.stock_class is not None]
    for cls in candidates:
        if cls.stock_class.__name__ == name:
            return cls
    for cls in candidates:  # no architectures recorded: the family's first model of that type
        if name is None and cls.stock_class.config_class.model_type == model_type:
            return cls
    supported = sorted(cls.stock_class.__name__ for cls in candidates)
    raise ValueError(f"stock_model_or_path: no APT counterpart for {name or model_type!r}; apt_hf converts {supported}")


def convert_to(cls: type[PreTrainedModel], model_or_path: Any, **kwargs: Any) -> PreTrainedModel:
    """`model_or_path` (a stock model, path or hub id) as an APT `cls`, every pretrained weight kept."""
    apt = {k: kwargs.pop(k) for k in APT_SETTINGS if k in kwargs}
    options = {k: kwargs.pop(k) for k in CONVERSION_OPTIONS if k in kwargs}
    attn = kwargs.pop("attn_implementation", None)
    if isinstance(model_or_path, nn.Module):
        if kwargs:
            raise ValueError(f"{cls.__name__}: loading options {sorted(kwargs)} only apply to a path or hub id")
        stock = pick_stock(cls, model_or_path)
    elif isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        _check_checkpoint(cls, path, kwargs)
        apt = {**processor_stats(path, kwargs), **apt}  # the checkpoint's pixel statistics
        stock = load_quietly(cls.stock_class, path, kwargs, cls.__name__)
    else:
        raise ValueError(f"model_or_path: {converter_name(cls)} takes a {cls.stock_class.__name__}, a path or a hub "
                         f"id, got {type(model_or_path).__name__}")
    config = cls.config_class.from_stock_config(
        stock.config, **apt, **options, attn_implementation=attention_settings(stock.config, attn),
        base_model_name_or_path=stock.config.name_or_path or None)
    with torch.device("meta"):
        model = cls(config, **_build_options(cls, stock))
    adopt_stock_weights(model, stock)
    model.config.architectures = [cls.__name__]
    if getattr(stock, "generation_config", None) is not None and hasattr(model, "generation_config"):
        model.generation_config = stock.generation_config
    return model.train(stock.training)


def pick_stock(cls: type[PreTrainedModel], model: nn.Module) -> PreTrainedModel:
    """The stock model `cls` holds one to one: `model` itself, or the one a container holds (a CLIP's tower)."""
    if isinstance(model, AptPreTrainedMixin):
        raise ValueError(f"model_or_path: expected a stock {cls.stock_class.__name__}, got an {type(model).__name__} "
                         "(already converted)")
    if isinstance(model, cls.stock_class):
        return model
    for container, attribute in cls.stock_containers:
        if isinstance(model, container) and isinstance(getattr(model, attribute, None), cls.stock_class):
            return getattr(model, attribute)
    takes = [cls.stock_class.__name__, *(f"{c.__name__} (its .{a})" for c, a in cls.stock_containers)]
    other = [c for c in model_classes() if c.stock_class is not None and isinstance(model, c.stock_class)]
    hint = f"; for a {type(model).__name__}, use {converter_name(other[0])} or apt_hf.convert" if other else ""
    raise ValueError(f"model_or_path: {converter_name(cls)} takes a {' or a '.join(takes)}, a path or a hub id, "
                     f"got {type(model).__name__}{hint}")


def converter_name(cls: type) -> str:
    """The public name that converts to `cls`, e.g. "AptCLIPVisionModel.from_clip"."""
    name = next((n for n in vars(cls) if n.startswith("from_") and n != "from_pretrained"), "from_stock")
    return f"{cls.__name__}.{name}"


def attention_settings(stock_config: PretrainedConfig, requested: str | dict[str, Any] | None) -> Any:
    """The converted model's attn_implementation: the stock model's, or the requested one. In a composite model a str
    applies to every tower, except APT's "varlen", which only the vision tower has; a dict sets each sub-config."""
    towers = [k for k in getattr(stock_config, "sub_configs", {}) if getattr(stock_config, k, None) is not None]
    if not towers:
        return stock_config._attn_implementation if requested is None else requested
    settings = {"": stock_config._attn_implementation,
                **{k: getattr(stock_config, k)._attn_implementation for k in towers}}
    if isinstance(requested, dict):
        return {**settings, **requested}
    if requested is None:
        return settings
    if requested in VISION_ONLY_ATTN:
        return {**settings, "vision_config": requested}
    return {"": requested, **dict.fromkeys(towers, requested)}


def adopt_stock_weights(model: nn.Module, stock: nn.Module) -> None:
    """Fill a meta-device APT model with the stock model's own tensors (adopted, not copied).

    The layers APT adds (those marked `_apt_init`) are the only ones the stock model lacks; they are materialised
    and initialised on the device and dtype of the stock embedding module that holds them.
    """
    new = {name for name, _ in model.named_apt_parameters()}
    missing, unexpected = model.load_state_dict(stock.state_dict(keep_vars=True), strict=False, assign=True)
    if unexpected or set(missing) - new:
        raise ValueError(f"model_or_path: the stock weights do not match this APT model (missing "
                         f"{sorted(set(missing) - new)}, unexpected {sorted(unexpected)})")
    stock_buffers = dict(stock.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (e.g. position_ids) are not in a state dict
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, stock_buffers[name], persistent=False)
    for name, module in model.named_modules():
        if getattr(module, "_apt_init", None) is not None:
            parent = model.get_submodule(name.rpartition(".")[0])
            like = next(p for p in parent.parameters() if not p.is_meta)  # the stock embedding's own weights
            module.to_empty(device=like.device, recurse=False)
            module.to(like.dtype)
            init_apt_layer(module)


def load_quietly(stock_class: type[PreTrainedModel], path: str, kwargs: dict[str, Any], name: str) -> PreTrainedModel:
    """`stock_class.from_pretrained` without transformers' load report, which lists keys that are dropped by design
    (a full CLIP's text tower, a classifier's head); weights initialised fresh are named once instead."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        stock, info = stock_class.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    fresh = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", [])})
    if fresh:
        logger.warning(f"{name}: {path} has no weights for {', '.join(fresh)} (e.g. a classifier checkpoint has no "
                       f"pooler); they are initialised fresh, as {stock_class.__name__}.from_pretrained does")
    return stock


def processor_stats(path: str, load_kwargs: dict[str, Any]) -> dict[str, Any]:
    """image_mean / image_std of the checkpoint's image processor, when it has one."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(path, **_load_options(load_kwargs))
    except (OSError, ValueError):
        return {}
    return {k: settings[k] for k in ("image_mean", "image_std") if settings.get(k) is not None}


def _load_options(load_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in load_kwargs.items() if k in CONFIG_LOAD_OPTIONS}


def _config_dict(path: str, load_kwargs: dict[str, Any]) -> dict[str, Any]:
    settings, _ = PretrainedConfig.get_config_dict(path, **_load_options(load_kwargs))
    return settings


def _refuse_unconvertible(model_type: str | None, name: str | None) -> None:
    if model_type in NAFLEX_MODEL_TYPES:
        raise ValueError(
            f"model_or_path: {name or model_type} is SigLIP2's NaFlex variant (variable resolution: a Linear patch "
            "embedding over each image's own `spatial_shapes`, with padding masks), which APT does not support; "
            "fixed-resolution SigLIP2 checkpoints load as SiglipModel and convert (apt_hf.convert / from_siglip)")
    if model_type == "dinov2_with_registers":
        raise ValueError(
            f"model_or_path: {name or model_type} is DINOv2 with register tokens, which APT does not support: each "
            "image's sequence would carry the register tokens between its CLS and its patches, and APT's packing, "
            "pooling and grid view assume one class token per image; plain DINOv2 checkpoints (Dinov2Model / "
            "Dinov2Backbone) convert (apt_hf.convert / from_dinov2)")
    if (model_type or "").startswith("apt_"):
        raise ValueError(f"model_or_path: {name or model_type} is already an APT model")


def _check_checkpoint(cls: type[PreTrainedModel], path: str, load_kwargs: dict[str, Any]) -> None:
    """Refuse, before loading weights, a checkpoint of another model type (from_pretrained would invent the rest)."""
    settings = _config_dict(path, load_kwargs)
    model_type = settings.get("model_type")
    _refuse_unconvertible(model_type, (settings.get("architectures") or [None])[0])
    accepted = {cls.stock_class.config_class.model_type} | {c.config_class.model_type for c, _ in cls.stock_containers}
    if model_type not in accepted:
        other = [converter_name(c) for c in model_classes()
                 if c.stock_class is not None and c.stock_class.config_class.model_type == model_type]
        hint = f"; use {other[0]} or apt_hf.convert for it" if other else ""
        raise ValueError(f"model_or_path: {converter_name(cls)} takes checkpoints of model_type {sorted(accepted)}, "
                         f"{path} holds model_type={model_type!r}{hint}")


def _build_options(cls: type[PreTrainedModel], stock: PreTrainedModel) -> dict[str, Any]:
    """Constructor options that follow the stock model: a stock model without a pooler converts to one without."""
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        return {"add_pooling_layer": getattr(stock, "pooler", None) is not None}
    return {}


def install() -> None:
    """Make this module the APT classes' converter (called by `import apt_hf`)."""
    AptPreTrainedMixin.converter = convert_to


__all__ = ["adopt_stock_weights", "apt_class_for", "attention_settings", "convert", "convert_to", "install",
           "pick_stock", "processor_stats"]
