"""Full CLIP with APT on the vision side: `AptCLIPModel`, for zero-shot image classification and retrieval.

The text tower, both projections and `logit_scale` are transformers' own `CLIPModel` modules; the vision tower is
an `AptCLIPVisionModel` (adaptive patches, packed sequence). `CLIPModel.forward` computes the logits as usual;
this class couples to it only through its override points, `get_image_features` (which takes the processor's
packed layout keys) and `get_text_features` (which leaves them out, as they are the image tower's).

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel, PreTrainedConfig
from transformers.models.clip.modeling_clip import CLIPOutput, CLIPPreTrainedModel
from transformers.utils.generic import can_return_tuple

from .configuration_apt import APT_SETTINGS, AptCLIPConfig
from .modeling_apt import (
    AptCLIPVisionModel,
    AptHubMixin,
    AptModelOutput,
    _load_quietly,
    _processor_stats,
    add_auto_map,
    adopt_stock_weights,
)
from .packed_attention import APT_VARLEN
from .patchify import PatchLayout

# Attention backends only APT's packed vision tower has: a str naming one applies to the vision tower alone.
_VISION_ONLY_ATTN = ("varlen", APT_VARLEN)
_CONFIG_LOAD_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "subfolder")


def _layout_kwargs(patch_scales: Any, patch_positions: Any, tokens_per_image: Any, image_grid_hw: Any) -> dict:
    return dict(zip(PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw), strict=True))


class AptCLIPModel(AptHubMixin, CLIPModel):
    """`CLIPModel` whose vision tower is an `AptCLIPVisionModel`: same text tower, projections and logits.

    `forward` takes the text inputs (`input_ids`, `attention_mask`) and either the `AptImageProcessor` output
    (`pixel_values` as base patches plus `patch_scales`, `patch_positions`, `tokens_per_image`, `image_grid_hw`)
    or dense `(B, C, H, W)` `pixel_values`, and returns transformers' `CLIPOutput`. With nothing merged
    (`thresholds=[-1]`) its logits are the stock model's.
    """

    config_class = AptCLIPConfig
    config: AptCLIPConfig
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings", "AptCLIPVisionEmbeddings"]
    _can_compile_fullgraph = False  # the vision tower's packing is data-dependent

    def __init__(self, config: AptCLIPConfig) -> None:
        CLIPPreTrainedModel.__init__(self, config)
        text_config, vision_config = config.text_config, config.vision_config
        self.projection_dim = config.projection_dim
        self.text_embed_dim = text_config.hidden_size
        self.vision_embed_dim = vision_config.hidden_size
        self.text_model = CLIPTextModel._from_config(text_config)
        self.vision_model = AptCLIPVisionModel._from_config(vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(self.config.logit_scale_init_value))
        self.post_init()

    # -- the override points CLIPModel.forward calls ------------------------------------------------------------
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> AptModelOutput:
        """The vision tower's output with `pooler_output` projected to the joint space, one row per image.

        pixel_values: dense `(B, C, H, W)` images, or the processor's base patches with the layout keys.
        """
        layout = _layout_kwargs(patch_scales, patch_positions, tokens_per_image, image_grid_hw)
        return super().get_image_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                          **layout, **kwargs)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """`CLIPModel.get_text_features`. The image layout keys, which `CLIPModel.forward` passes to both towers
        with its other keyword arguments, are the vision tower's and are not given to the text tower."""
        return super().get_text_features(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> CLIPOutput:
        r"""`CLIPModel.forward` plus the processor's packed image keys.

        pixel_values: dense `(B, C, H, W)` normalized images, or `AptImageProcessor`'s base patches `(N, C, p, p)`.
        patch_scales, patch_positions, tokens_per_image, image_grid_hw: the processor's layout (packed input).
        Returns `CLIPOutput`: `logits_per_image` (B, num_texts), `logits_per_text`, `text_embeds`, `image_embeds`,
        and the towers' outputs (`vision_model_output` is packed, with `cu_seqlens` and the layout).
        """
        if input_ids is None or pixel_values is None:
            missing = "input_ids" if input_ids is None else "pixel_values"
            raise ValueError(f"{missing}: AptCLIPModel.forward needs texts (input_ids) and images (pixel_values); "
                             "for one side alone use get_text_features / get_image_features")
        layout = _layout_kwargs(patch_scales, patch_positions, tokens_per_image, image_grid_hw)
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                               position_ids=position_ids, return_loss=return_loss,
                               interpolate_pos_encoding=interpolate_pos_encoding, **layout, **kwargs)

    # -- APT parameters ---------------------------------------------------------------------------------------
    def named_apt_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters APT adds to the vision tower (merge conv, zero-MLP), by name."""
        return [(f"vision_model.{name}", p) for name, p in self.vision_model.named_apt_parameters()]

    def apt_parameters(self) -> list[nn.Parameter]:
        """The parameters APT adds (merge conv, zero-MLP); everything else is the pretrained CLIP."""
        return [p for _, p in self.named_apt_parameters()]

    # -- conversion and saving --------------------------------------------------------------------------------
    @classmethod
    def from_clip(cls, model_or_path: Any, **kwargs: Any) -> AptCLIPModel:
        """Convert a full `CLIPModel` (object, local path or hub id such as `openai/clip-vit-large-patch14`).

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins; default the paper's), image_mean /
        image_std (default: the checkpoint's image processor), attn_implementation (a str applies to both towers,
        except APT's "varlen", which only the vision tower has; a dict {"vision_config": ..., "text_config": ...}
        sets each), and from_pretrained options (dtype, revision, ...) for paths. The stock tensors are adopted,
        not copied. For the vision tower alone, use `AptCLIPVisionModel.from_clip`.
        """
        apt = {k: kwargs.pop(k) for k in APT_SETTINGS if k in kwargs}
        attn = kwargs.pop("attn_implementation", None)
        if isinstance(model_or_path, nn.Module):
            if kwargs:
                raise ValueError(f"{cls.__name__}.from_clip: loading options {sorted(kwargs)} only apply to a path "
                                 "or hub id")
            stock = model_or_path
        elif isinstance(model_or_path, (str, os.PathLike)):
            path = os.fspath(model_or_path)
            _check_full_clip_checkpoint(path, kwargs)
            apt = {**_processor_stats(path, kwargs), **apt}  # the checkpoint's pixel statistics
            stock = _load_quietly(CLIPModel, path, kwargs, cls.__name__)
        else:
            raise ValueError(f"model_or_path: expected a CLIPModel, a path or a hub id, got "
                             f"{type(model_or_path).__name__}")
        if isinstance(stock, cls):
            raise ValueError(f"model_or_path: expected a stock CLIPModel, got an {cls.__name__} (already converted)")
        if not isinstance(stock, CLIPModel):
            hint = ""
            if isinstance(stock, CLIPVisionModel) or isinstance(getattr(stock, "vision_model", None), CLIPVisionModel):
                hint = " (a vision tower without the text tower: use AptCLIPVisionModel.from_clip for it)"
            raise ValueError(f"model_or_path: expected a full CLIPModel (text and vision towers), got "
                             f"{type(stock).__name__}{hint}")
        config = AptCLIPConfig.from_stock_config(stock.config, **apt, attn_implementation=_attn_settings(stock, attn),
                                                 base_model_name_or_path=stock.config.name_or_path or None)
        with torch.device("meta"):
            model = cls(config)
        adopt_stock_weights(model, stock)
        model.config.architectures = [cls.__name__]
        return model.train(stock.training)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' save, with `auto_map` for AutoModel and AutoModelForZeroShotImageClassification, plus the
        code, so that `pipeline("zero-shot-image-classification", model=dir, trust_remote_code=True)` loads it."""
        add_auto_map(self, {"AutoModel": type(self).__name__,
                            "AutoModelForZeroShotImageClassification": type(self).__name__})
        return super().save_pretrained(save_directory, *args, **kwargs)


def _attn_settings(stock: CLIPModel, requested: str | dict[str, Any] | None) -> dict[str, Any]:
    """Per-tower attention implementations: the stock model's, or the requested one (a vision-only one for the vision
    tower alone)."""
    settings = {"": stock.config._attn_implementation,
                "vision_config": stock.config.vision_config._attn_implementation,
                "text_config": stock.config.text_config._attn_implementation}
    if isinstance(requested, dict):
        return {**settings, **requested}
    if requested is None:
        return settings
    if requested in _VISION_ONLY_ATTN:
        return {**settings, "vision_config": requested}
    return {"": requested, "vision_config": requested, "text_config": requested}


def _check_full_clip_checkpoint(path: str, load_kwargs: dict[str, Any]) -> None:
    """Refuse, before loading weights, a checkpoint that is not a full CLIP (CLIPModel would invent a text tower)."""
    options = {k: v for k, v in load_kwargs.items() if k in _CONFIG_LOAD_OPTIONS}
    settings, _ = PreTrainedConfig.get_config_dict(path, **options)
    model_type = settings.get("model_type")
    if model_type != "clip":
        hint = " (a vision tower: use AptCLIPVisionModel.from_clip)" if model_type == "clip_vision_model" else ""
        raise ValueError(f"model_or_path: expected a full CLIP checkpoint (model_type 'clip'), {path} holds "
                         f"model_type={model_type!r}{hint}")


# save_pretrained writes auto_map and copies this file and its relative imports (remote code).
AptCLIPModel.register_for_auto_class("AutoModelForZeroShotImageClassification")


def register_auto_classes() -> None:
    """Register AptCLIPConfig / AptCLIPModel with the Auto classes (called by `import apt_hf`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

    AutoConfig.register(AptCLIPConfig.model_type, AptCLIPConfig, exist_ok=True)
    AutoModel.register(AptCLIPConfig, AptCLIPModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(AptCLIPConfig, AptCLIPModel, exist_ok=True)


__all__ = ["AptCLIPModel", "register_auto_classes"]
