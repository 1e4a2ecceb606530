"""The SigLIP family: `AptSiglipVisionModel` (the vision tower) and `AptSiglipModel` (image and text towers,
sigmoid zero-shot), transformers' SigLIP with adaptive patches.

SigLIP has no class token: every token is an image token, a packed batch is [tokens_1..., tokens_2...] and
`cu_seqlens` counts tokens only. Its pooled output comes from an attention-pooling head (an `nn.MultiheadAttention`
outside transformers' attention interface), run here on each image's own tokens. SigLIP's 384 px images at patch 14
leave 6 px the stock convolution never sees: the processor and the dense path score, select and embed exactly the
27 x 27 patches it does see. `SiglipModel.forward` calls its towers directly rather than through
`get_image_features`, so `AptSiglipModel` has its own thin forward: the towers, then SigLIP's logits and loss.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import SiglipModel, SiglipTextModel, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import (
    SiglipAttention,
    SiglipEncoder,
    SiglipEncoderLayer,
    SiglipMultiheadAttentionPoolingHead,
    SiglipOutput,
    SiglipPreTrainedModel,
    SiglipVisionEmbeddings,
)
from transformers.models.siglip.modeling_siglip import eager_attention_forward as siglip_eager_attention_forward
from transformers.utils.generic import can_return_tuple

from .configuration_apt import AptSiglipConfig, AptSiglipVisionConfig
from .modeling_apt import (
    AptModelOutput,
    AptPatchEmbeddings,
    AptPreTrainedMixin,
    AptVisionModelMixin,
    _packed_encoder_config,
    pool_per_image,
)
from .packed_attention import PackedSequences
from .patchify import PatchLayout

_APT_LAYERS = r"(?:merge_conv|zero_mlp)\."


class AptSiglipVisionEmbeddings(AptPatchEmbeddings, SiglipVisionEmbeddings):
    """APT embeddings on `SiglipVisionEmbeddings` (weights: patch_embedding, position_embedding; no class token)."""

    has_class_token = False

    def _projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.patch_embedding.weight, self.patch_embedding.bias

    def _patch_positions(self) -> torch.Tensor:
        return self.position_embedding.weight


class AptSiglipVisionModel(AptVisionModelMixin, SiglipPreTrainedModel):
    """`SiglipVisionModel` with adaptive patches: same weights and outputs per image, packed sequence."""

    config_class = AptSiglipVisionConfig
    config: AptSiglipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _input_embed_layer = "patch_embedding"
    _no_split_modules = ["AptSiglipVisionEmbeddings", "SiglipEncoderLayer", "SiglipMultiheadAttentionPoolingHead"]
    _can_record_outputs = {"hidden_states": SiglipEncoderLayer, "attentions": SiglipAttention}
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptSiglipVisionModel"}
    stock_class = SiglipVisionModel
    stock_containers = ((SiglipModel, "vision_model"),)
    card_kind = "siglip"
    eager_attention = staticmethod(siglip_eager_attention_forward)
    trainable_parts: ClassVar[dict[str, str]] = {
        "apt": rf"^embeddings\.{_APT_LAYERS}",
        "embeddings": rf"^embeddings\.(?!{_APT_LAYERS})",
        "encoder": r"^encoder\.",
        "head": r"^(?:post_layernorm|head)\.",
    }
    layer_groups: ClassVar[dict[str, str]] = {"stem": rf"^embeddings\.(?!{_APT_LAYERS})",
                                              "blocks": r"^encoder\.layers\.(\d+)\."}

    def __init__(self, config: AptSiglipVisionConfig) -> None:
        super().__init__(config)
        self.embeddings = AptSiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(_packed_encoder_config(config))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.use_head = config.vision_use_head
        if self.use_head:
            self.head = SiglipMultiheadAttentionPoolingHead(config)
        self.post_init()

    @classmethod
    def from_siglip(cls, model_or_path: Any, **kwargs: Any) -> AptSiglipVisionModel:
        """Convert a SigLIP vision tower (SiglipVisionModel, or a SiglipModel's; object, path or hub id).

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins), image_mean / image_std (default:
        the checkpoint's image processor), attn_implementation, and from_pretrained options for paths.
        """
        return cls._convert(model_or_path, **kwargs)

    def _encode_and_pool(self, hidden: torch.Tensor, packing: PackedSequences,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        states = self.encoder(inputs_embeds=hidden, attention_mask=packing, **kwargs).last_hidden_state
        states = self.post_layernorm(states)
        return states, pool_per_image(self.head, states, packing.cu_seqlens) if self.use_head else None


class AptSiglipModel(AptPreTrainedMixin, SiglipModel):
    """`SiglipModel` whose vision tower is an `AptSiglipVisionModel`: same text tower, logit scale and bias.

    `forward` takes the text inputs and either the `AptImageProcessor` output (base patches plus the layout keys) or
    dense `(B, C, H, W)` `pixel_values`, and returns transformers' `SiglipOutput`. With nothing merged
    (`thresholds=[-1]`) its logits are the stock model's.
    """

    config_class = AptSiglipConfig
    config: AptSiglipConfig
    _no_split_modules = ["SiglipTextEmbeddings", "AptSiglipVisionEmbeddings", "SiglipEncoderLayer",
                         "SiglipMultiheadAttentionPoolingHead"]
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptSiglipModel",
                                              "AutoModelForZeroShotImageClassification": "AptSiglipModel"}
    stock_class = SiglipModel
    card_kind = "siglip_full"
    trainable_parts: ClassVar[dict[str, str]] = {
        "apt": rf"^vision_model\.embeddings\.{_APT_LAYERS}",
        "vision_tower": r"^vision_model\.",
        "text_tower": r"^text_model\.",
        "logits": r"^logit_(?:scale|bias)$",
    }
    layer_groups: ClassVar[dict[str, str]] = {"stem": rf"^vision_model\.embeddings\.(?!{_APT_LAYERS})",
                                              "blocks": r"^vision_model\.encoder\.layers\.(\d+)\."}

    def __init__(self, config: AptSiglipConfig) -> None:
        SiglipPreTrainedModel.__init__(self, config)
        self.text_model = SiglipTextModel._from_config(config.text_config)
        self.vision_model = AptSiglipVisionModel._from_config(config.vision_config)
        self.logit_scale = nn.Parameter(torch.randn(1))
        self.logit_bias = nn.Parameter(torch.randn(1))
        self.post_init()

    @classmethod
    def from_siglip(cls, model_or_path: Any, **kwargs: Any) -> AptSiglipModel:
        """Convert a full `SiglipModel` (object, path or hub id such as `google/siglip-so400m-patch14-384`; fixed-
        resolution SigLIP2 checkpoints too). kwargs as `AptSiglipVisionModel.from_siglip`; a str attn_implementation
        applies to both towers, except APT's "varlen", which only the vision tower has."""
        return cls._convert(model_or_path, **kwargs)

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
        """The vision tower's output (packed), its `pooler_output` one row per image, as `SiglipModel`'s."""
        layout = dict(zip(PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw),
                          strict=True))
        return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **layout, **kwargs)

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
    ) -> SiglipOutput:
        r"""`SiglipModel.forward` plus the processor's packed image keys: sigmoid logits of every image-text pair.

        pixel_values: dense `(B, C, H, W)` normalized images, or `AptImageProcessor`'s base patches `(N, C, p, p)`.
        patch_scales, patch_positions, tokens_per_image, image_grid_hw: the processor's layout (packed input).
        """
        if input_ids is None or pixel_values is None:
            missing = "input_ids" if input_ids is None else "pixel_values"
            raise ValueError(f"{missing}: AptSiglipModel.forward needs texts (input_ids) and images (pixel_values); "
                             "for one side alone use get_text_features / get_image_features")
        vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding, patch_scales,
                                                 patch_positions, tokens_per_image, image_grid_hw, **kwargs)
        text_outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       **kwargs)
        image_embeds = vision_outputs.pooler_output
        text_embeds = text_outputs.pooler_output
        image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        logits_per_text = torch.matmul(text_embeds, image_embeds.t().to(text_embeds.device))
        scale, bias = self.logit_scale.to(text_embeds.device), self.logit_bias.to(text_embeds.device)
        logits_per_text = logits_per_text * scale.exp() + bias
        loss = None
        if return_loss:  # SigLIP's pairwise sigmoid loss: matching pairs on the diagonal
            labels = 2 * torch.eye(logits_per_text.size(0), device=logits_per_text.device) - 1
            loss = -torch.nn.functional.logsigmoid(labels * logits_per_text).sum(-1).mean()
        return SiglipOutput(loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                            text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_outputs,
                            vision_model_output=vision_outputs)


__all__ = ["AptSiglipVisionEmbeddings", "AptSiglipVisionModel", "AptSiglipModel"]
