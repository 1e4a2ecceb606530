"""Configurations of the APT models: the stock transformers configs plus the APT fields.

APT fields: `num_scales`, `thresholds`, `scorer`, `entropy_bins`, and `image_mean` / `image_std` of the
checkpoint's image processor (the dense-input path uses them to recover the 8-bit image from normalized pixels).
Defaults come from one table (`patchify.DEFAULT_THRESHOLDS`) and fill only fields that are absent: a saved
config reloads with exactly the values it was saved with.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import (
    CLIPConfig,
    CLIPVisionConfig,
    DepthAnythingConfig,
    Dinov2Config,
    DPTConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    PreTrainedConfig,
    SiglipConfig,
    SiglipVisionConfig,
    UperNetConfig,
    ViTConfig,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from .patchify import (
    APT_FIELDS,
    LLAVA_15_THRESHOLDS,
    default_thresholds,
    replace_apt_settings,
    thresholds_or_default,
    validate_apt_fields,
)

VISION_FEATURE_LAYOUTS = ("packed", "grid")
# What `replace_apt_fields` accepts: the APT fields plus the pixel statistics the dense path un-normalises with.
APT_SETTINGS = (*APT_FIELDS, "image_mean", "image_std")


def validate_vision_feature_layout(layout: Any) -> str:
    """`vision_feature_layout` is "packed" (kept tokens only) or "grid" (tokens repeated to the full grid)."""
    if layout not in VISION_FEATURE_LAYOUTS:
        raise ValueError(f"vision_feature_layout: expected one of {VISION_FEATURE_LAYOUTS}, got {layout!r}")
    return layout


def declared_settings(config: PreTrainedConfig | dict[str, Any], target: type) -> dict[str, Any]:
    """The values of `config` that `target`'s constructor declares as fields (drops model_type & bookkeeping)."""
    settings = config.to_dict() if isinstance(config, PreTrainedConfig) else dict(config)
    names = {f.name for f in dataclasses.fields(target)} - {"transformers_version", "architectures"}
    return {k: v for k, v in settings.items() if k in names}


@dataclass(kw_only=True)
class AptConfigMixin:
    """The APT fields shared by every APT vision config, validated on construction."""

    num_scales: int = 2
    thresholds: list[float | int] | tuple[float | int, ...] | None = None
    scorer: str = "entropy"
    entropy_bins: int = 512
    image_mean: list[float] | tuple[float, ...] | None = None
    image_std: list[float] | tuple[float, ...] | None = None
    # The stock checkpoint this model was converted from (hub id or path), for model cards; recorded by conversion.
    base_model_name_or_path: str | None = None

    _default_image_mean: ClassVar[tuple[float, ...]] = tuple(IMAGENET_STANDARD_MEAN)
    _default_image_std: ClassVar[tuple[float, ...]] = tuple(IMAGENET_STANDARD_STD)

    def __post_init__(self, **kwargs: Any) -> None:
        self._validate_apt_settings()
        super().__post_init__(**kwargs)

    def _validate_apt_settings(self) -> None:
        thresholds = thresholds_or_default(self.thresholds, self.num_scales, self.scorer)
        patch = _square_patch_size(self.patch_size)
        self.thresholds = validate_apt_fields(self.num_scales, thresholds, self.scorer, self.entropy_bins, patch)
        channels = getattr(self, "num_channels", 3)
        self.image_mean = _channel_stats(self.image_mean, self._default_image_mean, "image_mean", channels, False)
        self.image_std = _channel_stats(self.image_std, self._default_image_std, "image_std", channels, True)

    @property
    def apt_fields(self) -> dict[str, Any]:
        """The APT fields, e.g. to build a matching `AptImageProcessor`."""
        return {name: getattr(self, name) for name in APT_FIELDS}

    def replace_apt_fields(self, **settings: Any) -> AptConfigMixin:
        """Set APT fields (and image_mean / image_std) in place, validated together; returns the config.

        Fields not given keep their values; changing `num_scales` or `scorer` without `thresholds` takes that
        setting's defaults. On error nothing changes.
        """
        replace_apt_settings(self, APT_SETTINGS, settings, self._validate_apt_settings, "a config")
        return self

    @classmethod
    def from_stock_config(cls, config: PreTrainedConfig | dict[str, Any], **apt_fields: Any) -> AptConfigMixin:
        """The APT config of a stock config (`CLIPVisionConfig`, `ViTConfig`, ...) with the given APT fields."""
        return cls(**{**declared_settings(config, cls), **apt_fields})


def _square_patch_size(patch_size: Any) -> int:
    """APT's quadtree needs square patches: accept p or (p, p), refuse anything else."""
    if isinstance(patch_size, int) and not isinstance(patch_size, bool):
        return patch_size
    if isinstance(patch_size, (list, tuple)) and len(patch_size) == 2 and patch_size[0] == patch_size[1]:
        return _square_patch_size(patch_size[0])
    raise ValueError(f"patch_size: APT needs square patches (an int or (p, p)), got {patch_size!r}")


def _channel_stats(values: Any, default: tuple[float, ...], name: str, channels: int, positive: bool) -> list[float]:
    """Per-channel statistics as a list of one finite float per channel (std strictly positive).

    An absent value takes the family's default, per channel when it has `channels` values, else their average for
    every channel (e.g. [0.5] for a greyscale ViT, whose processors use 0.5 too).
    """
    if values is None:
        return list(default) if len(default) == channels else [sum(default) / len(default)] * channels
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * channels
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a list of per-channel numbers, got {values!r}") from None
    kind = "positive finite" if positive else "finite"
    if len(out) != channels or not all(math.isfinite(v) for v in out) or (positive and min(out) <= 0):
        raise ValueError(f"{name}: expected {channels} {kind} numbers (one per channel), got {values!r}")
    return out


class AptCLIPVisionConfig(AptConfigMixin, CLIPVisionConfig):
    """`CLIPVisionConfig` plus the APT fields (num_scales, thresholds, scorer, entropy_bins, image_mean/std)."""

    model_type = "apt_clip_vision_model"
    _default_image_mean: ClassVar[tuple[float, ...]] = tuple(OPENAI_CLIP_MEAN)
    _default_image_std: ClassVar[tuple[float, ...]] = tuple(OPENAI_CLIP_STD)


class AptViTConfig(AptConfigMixin, ViTConfig):
    """`ViTConfig` plus the APT fields (num_scales, thresholds, scorer, entropy_bins, image_mean/std)."""

    model_type = "apt_vit"


class AptSiglipVisionConfig(AptConfigMixin, SiglipVisionConfig):
    """`SiglipVisionConfig` plus the APT fields (num_scales, thresholds, scorer, entropy_bins, image_mean/std)."""

    model_type = "apt_siglip_vision_model"


class AptDinov2Config(AptConfigMixin, Dinov2Config):
    """`Dinov2Config` plus the APT fields (num_scales, thresholds, scorer, entropy_bins, image_mean/std); the backbone
    settings (out_features / out_indices, apply_layernorm, reshape_hidden_states) serve `AptDinov2Backbone`."""

    model_type = "apt_dinov2"
    # DINOv2's and Depth Anything's image processors normalise with ImageNet's statistics.
    _default_image_mean: ClassVar[tuple[float, ...]] = tuple(IMAGENET_DEFAULT_MEAN)
    _default_image_std: ClassVar[tuple[float, ...]] = tuple(IMAGENET_DEFAULT_STD)

    @classmethod
    def from_stock_config(cls, config: PreTrainedConfig | dict[str, Any], **apt_fields: Any) -> AptDinov2Config:
        """As `AptConfigMixin.from_stock_config`, keeping the backbone's out_features (saved under that name, not
        as the `_out_features` field it is stored in)."""
        settings = config.to_dict() if isinstance(config, PreTrainedConfig) else dict(config)
        stages = {k: settings[k] for k in ("out_features", "out_indices") if settings.get(k) is not None}
        return cls(**{**declared_settings(settings, cls), **stages, **apt_fields})


# LLaVA-1.5's tower (CLIP ViT-L/14-336) at LLaVA-1.5's APT setting: what a LLaVA config without a tower gets.
_LLAVA_15_TOWER = {
    **LlavaConfig.sub_configs_defaults["vision_config"].init_kwargs,
    "thresholds": list(LLAVA_15_THRESHOLDS[("entropy", 2)]),
}


def _apt_tower(vision: Any, apt: dict[str, Any], tower: type[AptConfigMixin], default_tower: dict[str, Any],
               llava: bool) -> Any:
    """A composite config's vision tower as an APT `tower` config (or the dict the sub-config spec builds it from).

    A stock tower (dict or config) is converted, with the default thresholds (LLaVA-1.5's where `llava`) for the APT
    fields not given; a saved APT tower keeps its own fields unless `apt` replaces them.
    """
    is_apt = isinstance(vision, tower) or (isinstance(vision, dict) and vision.get("model_type") == tower.model_type)
    if vision is not None and not is_apt:
        if llava and "thresholds" not in apt:
            apt["thresholds"] = default_thresholds(apt.get("num_scales", 2), apt.get("scorer", "entropy"), llava=True)
        return tower.from_stock_config(vision, **apt)
    if vision is None and apt:
        return tower(**{**default_tower, **apt})
    if apt:
        if isinstance(vision, dict):
            vision = tower(**declared_settings(vision, tower))
        vision.replace_apt_fields(**apt)
    return vision


class AptCompositeConfigMixin:
    """A composite config (full CLIP or SigLIP, LLaVA) whose `vision_config` is its family's APT tower config (dense
    models: `backbone_config`, see `tower_attribute`).

    The APT fields live once, on `vision_config`; they are also accepted here as keyword arguments and read back as
    properties (`config.num_scales`, ...), so composite and vision configs share the same names. A stock tower (a dict
    or config) is converted with the default thresholds for the fields not given; a saved APT tower keeps its own.
    """

    tower_config: ClassVar[type[AptConfigMixin]]
    tower_attribute: ClassVar[str] = "vision_config"  # the sub-config that is the APT tower
    stock_model_type: ClassVar[str]  # the stock composite this config converts (model_type)
    default_tower: ClassVar[dict[str, Any]] = {}  # a tower built from nothing but APT fields
    llava_thresholds: ClassVar[bool] = False  # LLaVA-1.5's default thresholds for a converted tower

    def __post_init__(self, **kwargs: Any) -> None:
        apt = {k: kwargs.pop(k) for k in APT_SETTINGS if k in kwargs}
        base = kwargs.pop("base_model_name_or_path", None)
        setattr(self, self.tower_attribute, _apt_tower(getattr(self, self.tower_attribute), apt, self.tower_config,
                                                       self.default_tower, self.llava_thresholds))
        super().__post_init__(**kwargs)
        if base is not None:  # recorded on the tower, where the APT fields live
            self.apt_tower_config.base_model_name_or_path = base

    @property
    def apt_tower_config(self) -> AptConfigMixin:
        """The sub-config that holds the APT fields (`vision_config`, or a dense model's `backbone_config`)."""
        return getattr(self, self.tower_attribute)

    @property
    def apt_fields(self) -> dict[str, Any]:
        return self.apt_tower_config.apt_fields

    def replace_apt_fields(self, **settings: Any) -> AptCompositeConfigMixin:
        """Set the vision tower's APT fields in place (validated; see `AptConfigMixin.replace_apt_fields`)."""
        self.apt_tower_config.replace_apt_fields(**settings)
        return self

    @classmethod
    def from_stock_config(cls, config: PreTrainedConfig | dict[str, Any], **apt_fields: Any) -> AptCompositeConfigMixin:
        """The APT config of the stock composite config (its other sub-configs kept as they are) with the given APT
        fields; a config of another model type is refused."""
        settings = config.to_dict() if isinstance(config, PreTrainedConfig) else dict(config)
        if settings.get("model_type") not in (cls.stock_model_type, cls.model_type):
            raise ValueError(f"config: expected a {cls.stock_model_type!r} config, got "
                             f"model_type={settings.get('model_type')!r}")
        return cls(**{**declared_settings(settings, cls), **apt_fields})


class AptLlavaConfig(AptCompositeConfigMixin, LlavaConfig):
    """`LlavaConfig` whose vision tower is an `AptCLIPVisionConfig`, plus `vision_feature_layout`.

    A stock CLIP tower is converted with LLaVA-1.5's default thresholds for the APT fields not given.
    """

    model_type = "apt_llava"
    tower_config = AptCLIPVisionConfig
    stock_model_type = "llava"
    default_tower = _LLAVA_15_TOWER
    llava_thresholds = True
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AptCLIPVisionConfig, init_kwargs=_LLAVA_15_TOWER),
        "text_config": LlavaConfig.sub_configs_defaults["text_config"],
    }

    vision_feature_layout: str = "packed"

    def __post_init__(self, **kwargs: Any) -> None:
        validate_vision_feature_layout(self.vision_feature_layout)
        super().__post_init__(**kwargs)


# LLaVA-NeXT's tower (CLIP ViT-L/14-336, as LLaVA-1.5's) at LLaVA-1.5's APT setting.
_LLAVA_NEXT_TOWER = {
    **LlavaNextConfig.sub_configs_defaults["vision_config"].init_kwargs,
    "thresholds": list(LLAVA_15_THRESHOLDS[("entropy", 2)]),
}


class AptLlavaNextConfig(AptCompositeConfigMixin, LlavaNextConfig):
    """`LlavaNextConfig` whose vision tower is an `AptCLIPVisionConfig`, plus `vision_feature_layout`.

    A stock CLIP tower is converted with LLaVA-1.5's default thresholds for the APT fields not given.
    `vision_feature_select_strategy="full"` is refused: the class token has no place in the anyres map (stock
    LLaVA-NeXT's `pack_image_features` cannot reshape a CLIP tile with it either).
    """

    model_type = "apt_llava_next"
    tower_config = AptCLIPVisionConfig
    stock_model_type = "llava_next"
    default_tower = _LLAVA_NEXT_TOWER
    llava_thresholds = True
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AptCLIPVisionConfig, init_kwargs=_LLAVA_NEXT_TOWER),
        "text_config": LlavaNextConfig.sub_configs_defaults["text_config"],
    }

    vision_feature_layout: str = "packed"

    def __post_init__(self, **kwargs: Any) -> None:
        validate_vision_feature_layout(self.vision_feature_layout)
        if self.vision_feature_select_strategy == "full":
            raise ValueError("vision_feature_select_strategy: expected 'default'; 'full' keeps the class token, which "
                             "has no place in LLaVA-NeXT's anyres map (stock pack_image_features cannot reshape it)")
        super().__post_init__(**kwargs)


# LLaVA-OneVision's tower (SigLIP so400m/384) with LLaVA's APT setting and the OneVision processors' pixel statistics
# (OpenAI CLIP's, not SigLIP's own 0.5): what a OneVision config without a tower gets.
_LLAVA_ONEVISION_TOWER = {
    **LlavaOnevisionConfig.sub_configs_defaults["vision_config"].init_kwargs,
    "thresholds": list(LLAVA_15_THRESHOLDS[("entropy", 2)]),
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
}


class AptLlavaOnevisionConfig(AptCompositeConfigMixin, LlavaOnevisionConfig):
    """`LlavaOnevisionConfig` whose vision tower is an `AptSiglipVisionConfig`, plus `vision_feature_layout`.

    A stock SigLIP tower is converted with LLaVA's default thresholds and, unless given, the OneVision processors'
    pixel statistics (OpenAI CLIP's), which the dense input path (videos) un-normalises with.
    """

    model_type = "apt_llava_onevision"
    tower_config = AptSiglipVisionConfig
    stock_model_type = "llava_onevision"
    default_tower = _LLAVA_ONEVISION_TOWER
    llava_thresholds = True
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AptSiglipVisionConfig, init_kwargs=_LLAVA_ONEVISION_TOWER),
        "text_config": LlavaOnevisionConfig.sub_configs_defaults["text_config"],
    }

    vision_feature_layout: str = "packed"

    def __post_init__(self, **kwargs: Any) -> None:
        validate_vision_feature_layout(self.vision_feature_layout)
        vision = self.vision_config
        if vision is not None and not isinstance(vision, AptSiglipVisionConfig) and not (
                isinstance(vision, dict) and vision.get("model_type") == AptSiglipVisionConfig.model_type):
            kwargs.setdefault("image_mean", list(OPENAI_CLIP_MEAN))  # a stock tower: the OneVision processors' stats
            kwargs.setdefault("image_std", list(OPENAI_CLIP_STD))
        super().__post_init__(**kwargs)


class AptCLIPConfig(AptCompositeConfigMixin, CLIPConfig):
    """`CLIPConfig` (text and vision towers) whose vision tower is an `AptCLIPVisionConfig`: full CLIP, zero-shot."""

    model_type = "apt_clip"
    tower_config = AptCLIPVisionConfig
    stock_model_type = "clip"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AptCLIPVisionConfig),
        "text_config": CLIPConfig.sub_configs_defaults["text_config"],
    }


class AptSiglipConfig(AptCompositeConfigMixin, SiglipConfig):
    """`SiglipConfig` (text and vision towers) whose vision tower is an `AptSiglipVisionConfig`: zero-shot SigLIP.

    Its model type keeps "siglip" in its name: transformers' zero-shot pipeline pads the texts to 64 tokens and
    scores with a sigmoid for exactly those model types.
    """

    model_type = "apt_siglip"
    tower_config = AptSiglipVisionConfig
    stock_model_type = "siglip"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AptSiglipVisionConfig),
        "text_config": SiglipConfig.sub_configs_defaults["text_config"],
    }


_DINOV2_BACKBONES = ("dinov2", AptDinov2Config.model_type)
# DINOv2-small (ViT-S/14 at 518 px) with the stages DPT-DINOv2 reads: the towers of dense configs built from nothing.
_DINOV2_SMALL_STAGES = {"image_size": 518, "hidden_size": 384, "num_attention_heads": 6, "out_indices": [3, 6, 9, 12]}


class AptDenseConfigMixin(AptCompositeConfigMixin):
    """A dense-prediction config (Depth Anything, DPT, UperNet) whose `backbone_config` is an `AptDinov2Config`.

    transformers builds a `backbone_config` dict, or None, through the config registered for its model type, and remote
    code never registers "apt_dinov2": the APT backbone config is built here, before the stock config sees it. Only
    DINOv2 backbones are accepted (APT replaces a ViT's patch embedding).
    """

    tower_attribute = "backbone_config"
    tower_config = AptDinov2Config

    def __post_init__(self, **kwargs: Any) -> None:
        backbone = self.backbone_config
        model_type = backbone.get("model_type") if isinstance(backbone, dict) else getattr(backbone, "model_type", None)
        if backbone is None:
            self.backbone_config = AptDinov2Config(**self.default_tower)
        elif model_type not in _DINOV2_BACKBONES:
            raise ValueError(f"backbone_config: APT needs a DINOv2 backbone (model_type in {_DINOV2_BACKBONES}), got "
                             f"model_type={model_type!r}")
        elif isinstance(backbone, dict) and model_type == AptDinov2Config.model_type:
            self.backbone_config = AptDinov2Config(**backbone)  # a saved APT backbone, stages and APT fields kept
        super().__post_init__(**kwargs)

    @classmethod
    def from_stock_config(cls, config: PreTrainedConfig | dict[str, Any], **apt_fields: Any) -> AptDenseConfigMixin:
        """As `AptCompositeConfigMixin.from_stock_config`; a stock config without a backbone (DPT on its own ViT) is
        refused rather than given a default one."""
        settings = config.to_dict() if isinstance(config, PreTrainedConfig) else dict(config)
        if settings.get("backbone_config") is None:
            raise ValueError(f"config: {cls.__name__} converts {settings.get('model_type')!r} models on a DINOv2 "
                             "backbone (backbone_config); this one has none (e.g. DPT on its own ViT), which APT "
                             "does not support")
        return super().from_stock_config(settings, **apt_fields)


class AptDepthAnythingConfig(AptDenseConfigMixin, DepthAnythingConfig):
    """`DepthAnythingConfig` whose `backbone_config` is an `AptDinov2Config` (stages as 3-d states with the CLS row,
    `reshape_hidden_states=False`, as stock); the neck and head settings are Depth Anything's own."""

    model_type = "apt_depth_anything"
    stock_model_type = "depth_anything"
    default_tower = DepthAnythingConfig.sub_configs_defaults["backbone_config"].init_kwargs
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AptDinov2Config, init_kwargs=default_tower)}


class AptDPTConfig(AptDenseConfigMixin, DPTConfig):
    """`DPTConfig` on an `AptDinov2Config` backbone (as facebook/dpt-dinov2-*: `reshape_hidden_states=False`, the
    neck reads each stage's CLS row); DPT on its own ViT or a hybrid BiT backbone has no APT counterpart."""

    model_type = "apt_dpt"
    stock_model_type = "dpt"
    default_tower = {**_DINOV2_SMALL_STAGES, "reshape_hidden_states": False}
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AptDinov2Config, init_kwargs=default_tower)}

    def __post_init__(self, **kwargs: Any) -> None:
        if self.is_hybrid:
            raise ValueError("is_hybrid: APT DPT runs on a DINOv2 backbone; hybrid DPT (a BiT backbone) is not "
                             "supported, expected is_hybrid=False")
        super().__post_init__(**kwargs)


class AptUperNetConfig(AptDenseConfigMixin, UperNetConfig):
    """`UperNetConfig` on an `AptDinov2Config` backbone: UperNet takes `(B, C, h, w)` maps
    (`reshape_hidden_states=True`)."""

    model_type = "apt_upernet"
    stock_model_type = "upernet"
    default_tower = {**_DINOV2_SMALL_STAGES, "reshape_hidden_states": True}
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AptDinov2Config, init_kwargs=default_tower)}


for _field in APT_FIELDS:
    for _composite in (AptLlavaConfig, AptCLIPConfig, AptSiglipConfig, AptLlavaOnevisionConfig, AptLlavaNextConfig,
                       AptDepthAnythingConfig, AptDPTConfig, AptUperNetConfig):
        setattr(_composite, _field, property(lambda self, _f=_field: getattr(self.apt_tower_config, _f)))

AptCLIPVisionConfig.register_for_auto_class()
AptViTConfig.register_for_auto_class()
AptLlavaConfig.register_for_auto_class()
AptLlavaNextConfig.register_for_auto_class()
AptCLIPConfig.register_for_auto_class()
AptSiglipVisionConfig.register_for_auto_class()
AptSiglipConfig.register_for_auto_class()
AptLlavaOnevisionConfig.register_for_auto_class()
AptDinov2Config.register_for_auto_class()
AptDepthAnythingConfig.register_for_auto_class()
AptDPTConfig.register_for_auto_class()
AptUperNetConfig.register_for_auto_class()

__all__ = [
    "AptConfigMixin",
    "AptCLIPVisionConfig",
    "AptViTConfig",
    "AptLlavaConfig",
    "AptLlavaNextConfig",
    "AptCLIPConfig",
    "AptSiglipVisionConfig",
    "AptSiglipConfig",
    "AptLlavaOnevisionConfig",
    "AptDinov2Config",
    "AptDepthAnythingConfig",
    "AptDPTConfig",
    "AptUperNetConfig",
    "AptCompositeConfigMixin",
    "AptDenseConfigMixin",
    "APT_FIELDS",
    "APT_SETTINGS",
    "VISION_FEATURE_LAYOUTS",
    "validate_vision_feature_layout",
]
