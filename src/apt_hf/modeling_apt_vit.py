"""The ViT family: `AptViTModel` and `AptViTForImageClassification`, transformers' ViT with adaptive patches.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import ViTForImageClassification, ViTModel
from transformers.models.vit.modeling_vit import (
    ViTAttention,
    ViTEmbeddings,
    ViTLayer,
    ViTPooler,
    ViTPreTrainedModel,
)
from transformers.models.vit.modeling_vit import eager_attention_forward as vit_eager_attention_forward
from transformers.utils.generic import can_return_tuple

from .configuration_apt import AptViTConfig
from .modeling_apt import (
    AptAttentionMixin,
    AptImageClassifierOutput,
    AptPatchEmbeddings,
    AptPreTrainedMixin,
    AptVisionModelMixin,
    _layout_fields,
    _packed_encoder_config,
    first_token_rows,
)
from .packed_attention import PackedSequences
from .patchify import PatchLayout

_APT_LAYERS = r"(?:merge_conv|zero_mlp)\."


class AptViTEmbeddings(AptPatchEmbeddings, ViTEmbeddings):
    """APT embeddings on `ViTEmbeddings` (weights: cls_token, patch_embeddings.projection, position_embeddings)."""

    def _projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        projection = self.patch_embeddings.projection
        return projection.weight, projection.bias

    def _patch_positions(self) -> torch.Tensor:
        return self.position_embeddings[0, 1:]

    def _class_embedding(self) -> torch.Tensor:
        return self.cls_token[0, 0] + self.position_embeddings[0, 0]

    def forward(self, pixel_values: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
        return self.dropout(super().forward(pixel_values, layout))


class AptViTModel(AptVisionModelMixin, ViTPreTrainedModel):
    """`ViTModel` with adaptive patches: same weights and outputs per image, packed sequence."""

    config_class = AptViTConfig
    config: AptViTConfig
    _no_split_modules = ["AptViTEmbeddings", "ViTLayer"]
    _can_record_outputs = {"hidden_states": ViTLayer, "attentions": ViTAttention}
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptViTModel"}
    stock_class = ViTModel
    stock_containers = ((ViTForImageClassification, "vit"),)
    card_kind = "vit"
    eager_attention = staticmethod(vit_eager_attention_forward)
    trainable_parts: ClassVar[dict[str, str]] = {
        "apt": rf"^embeddings\.{_APT_LAYERS}",
        "embeddings": rf"^embeddings\.(?!{_APT_LAYERS})",
        "encoder": r"^layers\.",
        "head": r"^(?:layernorm|pooler)\.",
    }
    layer_groups: ClassVar[dict[str, str]] = {"stem": rf"^embeddings\.(?!{_APT_LAYERS})", "blocks": r"^layers\.(\d+)\."}

    def __init__(self, config: AptViTConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = AptViTEmbeddings(config)
        encoder_config = _packed_encoder_config(config)
        self.layers = nn.ModuleList([ViTLayer(encoder_config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self.post_init()

    @classmethod
    def from_vit(cls, model_or_path: Any, **kwargs: Any) -> "AptViTModel":
        """Convert a ViTModel (object, path or hub id; a ViTForImageClassification gives its .vit).

        kwargs: the APT fields, image_mean / image_std (default: the checkpoint's image processor),
        attn_implementation, and from_pretrained options for paths.
        """
        return cls._convert(model_or_path, **kwargs)

    def _encode_and_pool(self, hidden: torch.Tensor, packing: PackedSequences,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        for layer in self.layers:
            hidden = layer(hidden, packing, **kwargs)
        states = self.layernorm(hidden)
        cls_states = states[:, first_token_rows(packing.cu_seqlens)]  # (1, B, D)
        return states, self.pooler(cls_states.transpose(0, 1)) if self.pooler is not None else None


class AptViTForImageClassification(AptAttentionMixin, AptPreTrainedMixin, ViTPreTrainedModel):
    """`ViTForImageClassification` with adaptive patches: logits from each image's CLS token."""

    config_class = AptViTConfig
    config: AptViTConfig
    _no_split_modules = ["AptViTEmbeddings", "ViTLayer"]
    _can_record_outputs = {"hidden_states": ViTLayer, "attentions": ViTAttention}
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptViTModel",
                                              "AutoModelForImageClassification": "AptViTForImageClassification"}
    stock_class = ViTForImageClassification
    card_kind = "vit_classifier"
    # `trainable_parts`: what `finetune_vit.py --trainable` names (APT's new layers, the pretrained embeddings, the
    # encoder layers, the head: final layernorm + classifier). `layer_groups`, in timm's `group_matcher` format: the
    # stem (the pretrained embeddings), then the numbered blocks; whatever neither matches (final layernorm,
    # classifier, APT's new layers, which start from scratch) is the top group and keeps the full learning rate.
    trainable_parts: ClassVar[dict[str, str]] = {
        "apt": rf"^vit\.embeddings\.{_APT_LAYERS}",
        "embeddings": rf"^vit\.embeddings\.(?!{_APT_LAYERS})",
        "encoder": r"^vit\.layers\.",
        "head": r"^(?:vit\.layernorm|classifier)\.",
    }
    layer_groups: ClassVar[dict[str, str]] = {
        "stem": rf"^vit\.embeddings\.(?!{_APT_LAYERS})",
        "blocks": r"^vit\.layers\.(\d+)\.",
    }

    def __init__(self, config: AptViTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = AptViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @classmethod
    def from_vit(cls, model_or_path: Any, **kwargs: Any) -> "AptViTForImageClassification":
        """Convert a ViTForImageClassification (object, path or hub id), classifier included."""
        return cls._convert(model_or_path, **kwargs)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Any,
    ) -> AptImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): as `ViTForImageClassification`.
        Other inputs: as `AptViTModel.forward`.
        """
        outputs = self.vit(pixel_values, patch_scales, patch_positions, tokens_per_image, image_grid_hw,
                           interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self.classifier(outputs.last_hidden_state[0, first_token_rows(outputs.cu_seqlens)])
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return AptImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            **_layout_fields(outputs.layout, outputs.cu_seqlens),
        )


__all__ = ["AptViTEmbeddings", "AptViTModel", "AptViTForImageClassification"]
