"""LLaVA-NeXT with APT as its vision tower: transformers' LLaVA-NeXT classes, overriding only their hooks.

Every tile of an image (the base tile, then the anyres crops) goes through the APT CLIP tower, packed. What reaches
the language model depends on `vision_feature_layout`:

- "grid": each tile's tokens are repeated over the base cells they cover (paper §3.3), then transformers' own
  `pack_image_features` runs: stitching, unpadding, one `image_newline` per row. Counts and prompts are stock's.
- "packed": only the kept tokens: the base tile's, then the crops' tokens that touch the unpadded region, in
  `anyres.py`'s order, with one `image_newline` per unpadded row, as stock has. Never more tokens than stock; with
  nothing merged, exactly stock's sequence.

`vision_feature_select_strategy="full"` is refused: the class token has no place in the anyres map (stock NeXT's
`pack_image_features` cannot reshape a CLIP tile with it either).

Coupling to transformers is through its override points only: `get_image_features` (which takes the packed layout
keys and `image_sizes` and returns per-image `pooler_output`s in an output it builds itself), `get_placeholder_mask`,
and `mm_encoder_outputs`, the pre-encoded images that `LlavaNextModel.forward` accepts and that `generate` builds
(and expands per beam / sample) itself.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModel, LlavaNextForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    LlavaNextMultiModalProjector,
    LlavaNextPreTrainedModel,
)

from .anyres import anyres_packed_order, anyres_tiles
from .configuration_apt import AptLlavaNextConfig
from .modeling_apt import AptPreTrainedMixin, drop_cls_tokens, expand_to_grid
from .modeling_apt_clip import AptCLIPVisionModel
from .modeling_apt_vlm import encode_inputs, placeholder_slots, vlm_layer_groups, vlm_trainable_parts
from .patchify import PatchLayout


class AptLlavaNextModel(AptPreTrainedMixin, LlavaNextModel):
    """`LlavaNextModel` whose tower is an `AptCLIPVisionModel`; only image feature extraction differs."""

    config_class = AptLlavaNextConfig
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptLlavaNextModel"}
    stock_class = LlavaNextModel
    card_kind = "llava_next"
    # the projector trains with the learned `image_newline`, its companion in the anyres sequence
    trainable_parts: ClassVar[dict[str, str]] = vlm_trainable_parts(in_model=False, image_newline=True)
    layer_groups: ClassVar[dict[str, str]] = vlm_layer_groups(in_model=False)

    def __init__(self, config: AptLlavaNextConfig) -> None:
        LlavaNextPreTrainedModel.__init__(self, config)
        self.vision_tower = AptCLIPVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def tiles_of(self, image_sizes: torch.Tensor | list) -> tuple[list[int], torch.Tensor]:
        """Tiles per image (base + crops) and each image's (tiles down, tiles across) crop grid, as stock computes
        them from the original sizes, this model's pinpoints and its tower's tile size."""
        return anyres_tiles(image_sizes, self.config.image_grid_pinpoints, self.config.vision_config.image_size)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Tower (every tile) -> selected layer(s) -> CLS dropped -> projector -> per image, the anyres sequence of
        the model's layout (see the module docstring).

        `pixel_values`: the APT processor's packed patches with the layout keys, or stock's dense (B, tiles, C, H, W)
        tiles (patchified on the device). Returns `pooler_output` as a list of per-image features, as transformers'
        LLaVA-NeXT does, plus the tower's packed `last_hidden_state`. Other keyword arguments (the language model's)
        are not the tower's and are not passed to it.
        """
        if pixel_values.numel() == 0:  # a text-only batch: no features, and no <image> slot to fill
            none = self.image_newline.new_zeros((0, self.config.text_config.hidden_size))
            return BaseModelOutputWithPooling(pooler_output=[none])
        config = self.config
        layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy: expected 'default' (the class token has no place in "
                             f"LLaVA-NeXT's anyres map), got {strategy!r}")
        if image_sizes is None:
            raise ValueError("image_sizes: LLaVA-NeXT needs each image's original (height, width) to lay out its "
                             "tiles; pass the processor's `image_sizes`")
        tiles, grid_shapes = self.tiles_of(image_sizes)
        layout = PatchLayout.from_inputs(dict(zip(
            PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw), strict=True)))
        if layout is None and pixel_values.dim() == 5:  # stock's dense tiles, padded to the batch's most tiles
            pixel_values = torch.cat([image[:n] for image, n in zip(pixel_values, tiles, strict=True)])
        tower = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True,
                                  **({} if layout is None else layout.as_dict()))
        layout = tower.layout
        if layout.tokens_per_image.shape[0] != sum(tiles):
            raise ValueError(f"image_sizes: they give {sum(tiles)} tiles, the pixels hold "
                             f"{layout.tokens_per_image.shape[0]}; build the inputs with an AptLlavaNextProcessor "
                             "whose image_grid_pinpoints and tile size are the model's")
        layers = [layer] if isinstance(layer, int) else list(layer)
        states = torch.cat([tower.hidden_states[i][0] for i in layers], dim=-1)  # packed (L, D')
        states = drop_cls_tokens(states, tower.cu_seqlens, tower.has_class_token)
        features = self.multi_modal_projector(states)  # per token; projecting before the grid expansion is cheaper
        sizes = torch.as_tensor(image_sizes, device=features.device)
        if config.vision_feature_layout == "grid":
            grids = expand_to_grid(features, layout)
            if isinstance(grids, list):
                raise ValueError(f"image_grid_hw: every tile must have the tower's grid, got "
                                 f"{layout.image_grid_hw.unique(dim=0).tolist()}")
            per_image, _ = self.pack_image_features(list(grids.split(tiles)), sizes, strategy,
                                                    image_newline=self.image_newline)
        else:
            order, counts = anyres_packed_order(layout, tiles, grid_shapes, sizes)
            rows = torch.cat([features, self.image_newline[None].to(features)])  # row -1: the newline
            per_image = list(rows[order.to(features.device)].split(counts.tolist()))
        return BaseModelOutputWithPooling(last_hidden_state=tower.last_hidden_state, pooler_output=per_image,
                                          hidden_states=tower.hidden_states)

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor) -> torch.Tensor:
        """The `<image>` slots (B, L, 1), refusing a count that does not match the features with a clear error."""
        return placeholder_slots(self, input_ids, inputs_embeds, self.config.image_token_id, image_features, "image",
                                 "AptLlavaNextProcessor.from_llava_next_processor")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """`LlavaNextModel.forward` plus the processor's packed image keys (encoded here into `mm_encoder_outputs`)."""
        layout = dict(zip(PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw),
                          strict=True))
        image_kwargs = {"image_sizes": image_sizes, "vision_feature_layer": vision_feature_layer,
                        "vision_feature_select_strategy": vision_feature_select_strategy, **layout}
        mm_encoder_outputs = encode_inputs(mm_encoder_outputs, layout,
                                           image=(self.get_image_features, pixel_values, image_kwargs))
        return super().forward(input_ids=input_ids, vision_feature_layer=vision_feature_layer,
                               vision_feature_select_strategy=vision_feature_select_strategy,
                               mm_encoder_outputs=mm_encoder_outputs, **kwargs)


class AptLlavaNextForConditionalGeneration(AptPreTrainedMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with APT as its vision tower; generation, loss and caching are transformers' own."""

    config_class = AptLlavaNextConfig
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptLlavaNextModel",
                                              "AutoModelForImageTextToText": "AptLlavaNextForConditionalGeneration"}
    stock_class = LlavaNextForConditionalGeneration
    card_kind = "llava_next"
    # As AptLlavaForConditionalGeneration's; the projector part includes the learned `image_newline`.
    trainable_parts: ClassVar[dict[str, str]] = vlm_trainable_parts(in_model=True, image_newline=True)
    layer_groups: ClassVar[dict[str, str]] = vlm_layer_groups(in_model=True)

    def __init__(self, config: AptLlavaNextConfig) -> None:
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = AptLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """`LlavaNextForConditionalGeneration.forward` plus the processor's packed image keys.

        Declared here so that `generate` accepts them; `AptLlavaNextModel.forward` turns them into
        `mm_encoder_outputs`.
        """
        layout = dict(zip(PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw),
                          strict=True))
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                               mm_encoder_outputs=mm_encoder_outputs, **layout, **kwargs)

    @classmethod
    def from_llava_next(
        cls, model_or_path: Any, vision_feature_layout: str = "packed", **kwargs: Any
    ) -> AptLlavaNextForConditionalGeneration:
        """Convert a stock LLaVA-NeXT (object, local path or hub id such as `llava-hf/llava-v1.6-vicuna-7b-hf`).

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins; default LLaVA-1.5's [5.75]),
        image_mean / image_std, and from_pretrained options (dtype, attn_implementation, ...) for paths.
        The stock tensors are adopted, not copied, so converting a 7B model needs no second copy in memory.
        """
        return cls._convert(model_or_path, vision_feature_layout=vision_feature_layout, **kwargs)


__all__ = ["AptLlavaNextModel", "AptLlavaNextForConditionalGeneration"]
