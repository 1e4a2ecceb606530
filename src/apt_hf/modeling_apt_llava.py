"""LLaVA-1.5 with APT as its vision tower: transformers' LLaVA classes, overriding only their hooks.

"packed": per image, the kept tokens (CLS dropped for strategy "default") go through the projector into
exactly as many `<image>` slots, so the language model reads fewer tokens. "grid": tokens are repeated over
the base cells they cover (paper §3.3), so the counts, and prompts, are stock LLaVA's.

Coupling to transformers is through its override points only: `get_image_features` (which takes the packed
layout keys and returns a per-image `pooler_output` list in an output it builds itself), `get_placeholder_mask`,
and `mm_encoder_outputs`, the pre-encoded images that `LlavaModel.forward` accepts and that `generate` builds
(and expands per beam / sample) itself. Everything else, the cache included, passes through `**kwargs`.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaModel, LlavaMultiModalProjector, LlavaPreTrainedModel

from .configuration_apt import AptLlavaConfig
from .modeling_apt import AptPreTrainedMixin, drop_cls_tokens, expand_to_grid
from .modeling_apt_clip import AptCLIPVisionModel
from .modeling_apt_vlm import encode_inputs, placeholder_slots, vlm_layer_groups, vlm_trainable_parts
from .patchify import PatchLayout


class AptLlavaModel(AptPreTrainedMixin, LlavaModel):
    """`LlavaModel` whose tower is an `AptCLIPVisionModel`; only image feature extraction differs."""

    config_class = AptLlavaConfig
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptLlavaModel"}
    stock_class = LlavaModel
    card_kind = "llava"
    trainable_parts: ClassVar[dict[str, str]] = vlm_trainable_parts(in_model=False)
    layer_groups: ClassVar[dict[str, str]] = vlm_layer_groups(in_model=False)

    def __init__(self, config: AptLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AptCLIPVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def image_token_counts(self, layout: PatchLayout, strategy: str | None = None) -> torch.Tensor:
        """How many `<image>` tokens each image takes in the text for this model's layout and strategy."""
        strategy = strategy or self.config.vision_feature_select_strategy
        if self.config.vision_feature_layout == "packed":
            counts = layout.tokens_per_image
        else:
            counts = layout.image_grid_hw.prod(-1)
        return counts + (1 if strategy == "full" else 0)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Tower -> selected layer(s) -> (CLS dropped) -> projector -> (grid expansion).

        Returns `pooler_output` as a list of per-image features, as transformers' LLaVA does, plus the tower's
        packed `last_hidden_state`. Other keyword arguments (the language model's, e.g. `position_ids`,
        `cu_seq_lens_q`, `num_items_in_batch`) are not the tower's and are not passed to it.
        """
        if pixel_values.numel() == 0:  # a text-only batch: no features, and no <image> slot to fill
            dim = self.config.text_config.hidden_size
            none = self.multi_modal_projector.linear_2.weight.new_zeros((0, dim))
            return BaseModelOutputWithPooling(pooler_output=[none])
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        layout = PatchLayout.from_inputs(dict(zip(
            PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw), strict=True)))
        layout_kwargs = {} if layout is None else layout.as_dict()
        tower = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **layout_kwargs)
        layers = [layer] if isinstance(layer, int) else list(layer)
        states = torch.cat([tower.hidden_states[i][0] for i in layers], dim=-1)  # packed (L, D')
        if strategy == "default":
            states = drop_cls_tokens(states, tower.cu_seqlens, tower.has_class_token)
        features = self.multi_modal_projector(states)  # per token; projecting before the grid expansion is cheaper
        if self.config.vision_feature_layout == "grid":
            per_image = list(expand_to_grid(features, tower.layout))
            if strategy != "default" and tower.has_class_token:  # "full": CLS first, then the grid
                cls = features[tower.cu_seqlens[:-1].long()]
                per_image = [torch.cat([c[None], g]) for c, g in zip(cls, per_image, strict=True)]
        else:
            per_image = list(features.split(self.image_token_counts(tower.layout, strategy).tolist()))
        return BaseModelOutputWithPooling(last_hidden_state=tower.last_hidden_state, pooler_output=per_image,
                                          hidden_states=tower.hidden_states)

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor) -> torch.Tensor:
        """The `<image>` slots (B, L, 1), refusing a count that does not match the features with a clear error."""
        return placeholder_slots(self, input_ids, inputs_embeds, self.config.image_token_id, image_features, "image",
                                 "AptLlavaProcessor.from_llava_processor")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """`LlavaModel.forward` plus the processor's packed image keys (encoded here into `mm_encoder_outputs`)."""
        layout = dict(zip(PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw),
                          strict=True))
        image_kwargs = {"vision_feature_layer": vision_feature_layer,
                        "vision_feature_select_strategy": vision_feature_select_strategy, **layout}
        mm_encoder_outputs = encode_inputs(mm_encoder_outputs, layout,
                                           image=(self.get_image_features, pixel_values, image_kwargs))
        return super().forward(input_ids=input_ids, vision_feature_layer=vision_feature_layer,
                               vision_feature_select_strategy=vision_feature_select_strategy,
                               mm_encoder_outputs=mm_encoder_outputs, **kwargs)


class AptLlavaForConditionalGeneration(AptPreTrainedMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 with APT as its vision tower; generation, loss and caching are transformers' own."""

    config_class = AptLlavaConfig
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptLlavaModel",
                                              "AutoModelForImageTextToText": "AptLlavaForConditionalGeneration"}
    stock_class = LlavaForConditionalGeneration
    card_kind = "llava"
    # `trainable_parts`: what `finetune_llava.py --trainable` names (APT's new layers, the projector, the language
    # model with its head, the whole vision tower). `layer_groups`, in timm's `group_matcher` format: the stem, then
    # the numbered blocks; whatever neither matches (APT's new layers, projector, language model) is the top group,
    # so layer-wise LR decay runs down the vision tower, the part APT changes.
    trainable_parts: ClassVar[dict[str, str]] = vlm_trainable_parts(in_model=True)
    layer_groups: ClassVar[dict[str, str]] = vlm_layer_groups(in_model=True)

    def __init__(self, config: AptLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = AptLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """`LlavaForConditionalGeneration.forward` plus the processor's packed image keys.

        Declared here so that `generate` accepts them; `AptLlavaModel.forward` turns them into `mm_encoder_outputs`.
        """
        layout = dict(zip(PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw),
                          strict=True))
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, mm_encoder_outputs=mm_encoder_outputs,
                               **layout, **kwargs)

    @classmethod
    def from_llava(
        cls, model_or_path: Any, vision_feature_layout: str = "packed", **kwargs: Any
    ) -> AptLlavaForConditionalGeneration:
        """Convert a stock LLaVA-1.5 (object, local path or hub id such as `llava-hf/llava-1.5-7b-hf`).

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins; default LLaVA-1.5's [5.75]),
        image_mean / image_std, and from_pretrained options (dtype, attn_implementation, ...) for paths.
        The stock tensors are adopted, not copied, so converting a 7B model needs no second copy in memory.
        """
        return cls._convert(model_or_path, vision_feature_layout=vision_feature_layout, **kwargs)


__all__ = ["AptLlavaModel", "AptLlavaForConditionalGeneration"]
