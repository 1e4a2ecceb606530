"""Configurations of the APT models: the stock transformers configs plus the APT fields (DESIGN §3).

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, PreTrainedConfig, ViTConfig
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .patchify import validate_apt_fields

# Paper defaults per number of scales (DESIGN §1); other scale counts must give their thresholds.
DEFAULT_THRESHOLDS = {1: [], 2: [5.5], 3: [5.5, 4.0]}
LLAVA_15_THRESHOLDS = (5.75,)
APT_FIELDS = ("num_scales", "thresholds", "scorer", "entropy_bins")
# Bookkeeping keys of a saved config that must not be passed back to a config constructor.
_NOT_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "name_or_path",
               "_attn_implementation_autoset", "_commit_hash")


@dataclass(kw_only=True)
class AptConfigMixin:
    """The APT fields shared by every APT config (vision models now, LLaVA later), validated on construction.

    `image_mean` / `image_std` are those of the checkpoint's image processor: the dense-input path uses them to
    recover the 8-bit image from normalized `pixel_values`, so it picks the same layout as the processor.
    """

    num_scales: int = 2
    thresholds: list[float | int] | tuple[float | int, ...] | None = None
    scorer: str = "entropy"
    entropy_bins: int = 512
    image_mean: list[float] | tuple[float, ...] | None = None
    image_std: list[float] | tuple[float, ...] | None = None

    _default_image_mean: ClassVar[tuple[float, ...]] = tuple(IMAGENET_STANDARD_MEAN)
    _default_image_std: ClassVar[tuple[float, ...]] = tuple(IMAGENET_STANDARD_STD)

    def __post_init__(self, **kwargs: Any) -> None:
        if self.thresholds is None and type(self.num_scales) is int and self.num_scales in DEFAULT_THRESHOLDS:
            self.thresholds = list(DEFAULT_THRESHOLDS[self.num_scales])
        patch = _square_patch_size(kwargs.get("patch_size", getattr(self, "patch_size", None)))
        self.thresholds = validate_apt_fields(self.num_scales, self.thresholds, self.scorer, self.entropy_bins, patch)
        self.image_mean = _channel_stats(self.image_mean, self._default_image_mean, "image_mean", positive=False)
        self.image_std = _channel_stats(self.image_std, self._default_image_std, "image_std", positive=True)
        super().__post_init__(**kwargs)

    @property
    def apt_fields(self) -> dict[str, Any]:
        """The APT fields, e.g. to build a matching `AptImageProcessor`."""
        return {name: getattr(self, name) for name in APT_FIELDS}

    @classmethod
    def from_stock_config(cls, config: PreTrainedConfig | dict[str, Any], **apt_fields: Any) -> AptConfigMixin:
        """The APT config of a stock config (`CLIPVisionConfig`, `ViTConfig`, ...) with the given APT fields."""
        settings = config.to_dict() if isinstance(config, PreTrainedConfig) else dict(config)
        for key in _NOT_FIELDS:
            settings.pop(key, None)
        settings.update(apt_fields)
        return cls(**settings)


def _square_patch_size(patch_size: Any) -> int | None:
    """APT's quadtree needs square patches: accept p or (p, p), refuse anything else."""
    if patch_size is None or (isinstance(patch_size, int) and not isinstance(patch_size, bool)):
        return patch_size
    if isinstance(patch_size, (list, tuple)) and len(patch_size) == 2 and patch_size[0] == patch_size[1]:
        return int(patch_size[0])
    raise ValueError(f"patch_size: APT needs square patches (an int or (p, p)), got {patch_size!r}")


def _channel_stats(values: Any, default: tuple[float, ...], name: str, positive: bool) -> list[float]:
    """Per-channel statistics as a list of finite floats (std strictly positive)."""
    if values is None:
        return list(default)
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * 3
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a list of per-channel numbers, got {values!r}") from None
    if not out or not all(math.isfinite(v) for v in out) or (positive and min(out) <= 0):
        kind = "positive finite" if positive else "finite"
        raise ValueError(f"{name}: expected {kind} per-channel numbers, got {values!r}")
    return out


class AptCLIPVisionConfig(AptConfigMixin, CLIPVisionConfig):
    """`CLIPVisionConfig` plus the APT fields (num_scales, thresholds, scorer, entropy_bins, image_mean/std)."""

    model_type = "apt_clip_vision_model"
    _default_image_mean: ClassVar[tuple[float, ...]] = tuple(OPENAI_CLIP_MEAN)
    _default_image_std: ClassVar[tuple[float, ...]] = tuple(OPENAI_CLIP_STD)


class AptViTConfig(AptConfigMixin, ViTConfig):
    """`ViTConfig` plus the APT fields (num_scales, thresholds, scorer, entropy_bins, image_mean/std)."""

    model_type = "apt_vit"


AptCLIPVisionConfig.register_for_auto_class()
AptViTConfig.register_for_auto_class()

__all__ = ["AptConfigMixin", "AptCLIPVisionConfig", "AptViTConfig", "APT_FIELDS", "DEFAULT_THRESHOLDS"]


class AptLlavaConfig(LlavaConfig):
    """`LlavaConfig` whose vision tower is an `AptCLIPVisionConfig`, plus `vision_feature_layout`.

    The APT fields live once, on `vision_config`; they are also accepted here as keyword arguments and read
    back as properties (`config.num_scales`, ...), so LLaVA and vision configs share the same names.
    """

    model_type = "apt_llava"
    sub_configs = {"text_config": AutoConfig, "vision_config": AptCLIPVisionConfig}

    vision_feature_layout: str = "packed"

    def __post_init__(self, **kwargs: Any) -> None:
        apt = {k: kwargs.pop(k) for k in (*APT_FIELDS, "image_mean", "image_std") if k in kwargs}
        vision = self.vision_config
        if vision is None:  # LLaVA-1.5's CLIP ViT-L/14-336
            vision = LlavaConfig().vision_config
        if not isinstance(vision, AptCLIPVisionConfig) and apt.get("num_scales", 2) == 2:
            apt.setdefault("thresholds", list(LLAVA_15_THRESHOLDS))  # the paper's LLaVA-1.5 setting at 336/14
        if not isinstance(vision, AptCLIPVisionConfig) or apt:
            # A dict (saved APT or stock CLIP tower) or a stock CLIPVisionConfig: same fields, plus APT's.
            self.vision_config = AptCLIPVisionConfig.from_stock_config(vision, **apt)
        if self.vision_feature_layout not in ("packed", "grid"):
            raise ValueError(
                f"vision_feature_layout: expected 'packed' or 'grid', got {self.vision_feature_layout!r}"
            )
        super().__post_init__(**kwargs)

    @property
    def apt_fields(self) -> dict[str, Any]:
        return self.vision_config.apt_fields


for _field in APT_FIELDS:
    setattr(AptLlavaConfig, _field, property(lambda self, _f=_field: getattr(self.vision_config, _f)))

AptLlavaConfig.register_for_auto_class()
__all__ += ["AptLlavaConfig"]
