"""The CLIP family: `AptCLIPVisionModel` (the vision tower) and `AptCLIPModel` (full CLIP, zero-shot).

`AptCLIPVisionModel` is transformers' `CLIPVisionModel` with adaptive patches. In `AptCLIPModel` the text tower, both
projections and `logit_scale` are transformers' own `CLIPModel` modules and the vision tower is an
`AptCLIPVisionModel`; `CLIPModel.forward` computes the logits as usual, coupled only through its override points,
`get_image_features` (which takes the processor's packed layout keys) and `get_text_features` (which leaves them out,
as they are the image tower's).

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel, CLIPVisionModelWithProjection
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoder,
    CLIPEncoderLayer,
    CLIPOutput,
    CLIPPreTrainedModel,
    CLIPVisionEmbeddings,
)
from transformers.models.clip.modeling_clip import eager_attention_forward as clip_eager_attention_forward
from transformers.utils.generic import can_return_tuple

from .configuration_apt import AptCLIPConfig, AptCLIPVisionConfig
from .modeling_apt import (
    AptModelOutput,
    AptPatchEmbeddings,
    AptPreTrainedMixin,
    AptVisionModelMixin,
    _packed_encoder_config,
    first_token_rows,
)
from .packed_attention import PackedSequences
from .patchify import PatchLayout

_APT_LAYERS = r"(?:merge_conv|zero_mlp)\."


class AptCLIPVisionEmbeddings(AptPatchEmbeddings, CLIPVisionEmbeddings):
    """APT embeddings on `CLIPVisionEmbeddings` (weights: class_embedding, patch_embedding, position_embedding)."""

    def _projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.patch_embedding.weight, self.patch_embedding.bias

    def _patch_positions(self) -> torch.Tensor:
        return self.position_embedding.weight[1:]

    def _class_embedding(self) -> torch.Tensor:
        return self.class_embedding + self.position_embedding.weight[0]


class AptCLIPVisionModel(AptVisionModelMixin, CLIPPreTrainedModel):
    """`CLIPVisionModel` with adaptive patches: same weights and outputs per image, packed sequence."""

    config_class = AptCLIPVisionConfig
    config: AptCLIPVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _input_embed_layer = "patch_embedding"
    _no_split_modules = ["CLIPEncoderLayer", "AptCLIPVisionEmbeddings"]
    _can_record_outputs = {"hidden_states": CLIPEncoderLayer, "attentions": CLIPAttention}
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptCLIPVisionModel"}
    stock_class = CLIPVisionModel
    stock_containers = ((CLIPModel, "vision_model"), (CLIPVisionModelWithProjection, "vision_model"))
    card_kind = "clip"
    eager_attention = staticmethod(clip_eager_attention_forward)
    trainable_parts: ClassVar[dict[str, str]] = {
        "apt": rf"^embeddings\.{_APT_LAYERS}",
        "embeddings": rf"^(?:embeddings\.(?!{_APT_LAYERS})|pre_layrnorm\.)",
        "encoder": r"^encoder\.",
        "head": r"^post_layernorm\.",
    }
    layer_groups: ClassVar[dict[str, str]] = {
        "stem": rf"^(?:embeddings\.(?!{_APT_LAYERS})|pre_layrnorm\.)",
        "blocks": r"^encoder\.layers\.(\d+)\.",
    }

    def __init__(self, config: AptCLIPVisionConfig) -> None:
        super().__init__(config)
        embed_dim = config.hidden_size
        self.embeddings = AptCLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(_packed_encoder_config(config))
        self.post_layernorm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.post_init()

    @classmethod
    def from_clip(cls, model_or_path: Any, **kwargs: Any) -> AptCLIPVisionModel:
        """Convert a CLIP vision tower (CLIPVisionModel / CLIPModel / ...WithProjection object, path or hub id).

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins), image_mean / image_std (default:
        the checkpoint's image processor), attn_implementation, and from_pretrained options for paths.
        """
        return cls._convert(model_or_path, **kwargs)

    def _encode_and_pool(self, hidden: torch.Tensor, packing: PackedSequences,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.encoder(inputs_embeds=self.pre_layrnorm(hidden), attention_mask=packing,
                              **kwargs).last_hidden_state
        return states, self.post_layernorm(states[0, first_token_rows(packing.cu_seqlens)])


def _layout_kwargs(patch_scales: Any, patch_positions: Any, tokens_per_image: Any, image_grid_hw: Any) -> dict:
    return dict(zip(PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw), strict=True))


class AptCLIPModel(AptPreTrainedMixin, CLIPModel):
    """`CLIPModel` whose vision tower is an `AptCLIPVisionModel`: same text tower, projections and logits.

    `forward` takes the text inputs (`input_ids`, `attention_mask`) and either the `AptImageProcessor` output
    (`pixel_values` as base patches plus `patch_scales`, `patch_positions`, `tokens_per_image`, `image_grid_hw`)
    or dense `(B, C, H, W)` `pixel_values`, and returns transformers' `CLIPOutput`. With nothing merged
    (`thresholds=[-1]`) its logits are the stock model's.
    """

    config_class = AptCLIPConfig
    config: AptCLIPConfig
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings", "AptCLIPVisionEmbeddings"]
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptCLIPModel",
                                              "AutoModelForZeroShotImageClassification": "AptCLIPModel"}
    stock_class = CLIPModel
    card_kind = "clip_full"
    trainable_parts: ClassVar[dict[str, str]] = {
        "apt": rf"^vision_model\.embeddings\.{_APT_LAYERS}",
        "vision_tower": r"^vision_model\.",
        "text_tower": r"^text_model\.",
        "projections": r"^(?:visual_projection|text_projection|logit_scale)",
    }
    layer_groups: ClassVar[dict[str, str]] = {
        "stem": rf"^vision_model\.(?:embeddings\.(?!{_APT_LAYERS})|pre_layrnorm\.)",
        "blocks": r"^vision_model\.encoder\.layers\.(\d+)\.",
    }

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

    # -- conversion -------------------------------------------------------------------------------------------
    @classmethod
    def from_clip(cls, model_or_path: Any, **kwargs: Any) -> AptCLIPModel:
        """Convert a full `CLIPModel` (object, local path or hub id such as `openai/clip-vit-large-patch14`).

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins; default the paper's), image_mean /
        image_std (default: the checkpoint's image processor), attn_implementation (a str applies to both towers,
        except APT's "varlen", which only the vision tower has; a dict {"vision_config": ..., "text_config": ...}
        sets each), and from_pretrained options (dtype, revision, ...) for paths. The stock tensors are adopted,
        not copied. For the vision tower alone, use `AptCLIPVisionModel.from_clip`.
        """
        return cls._convert(model_or_path, **kwargs)


__all__ = ["AptCLIPVisionEmbeddings", "AptCLIPVisionModel", "AptCLIPModel"]
