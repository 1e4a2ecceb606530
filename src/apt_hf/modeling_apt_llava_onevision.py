"""LLaVA-OneVision with APT as its vision tower: transformers' LLaVA-OneVision classes, overriding only their hooks.

Every tile of an image (the base tile, then the anyres crops) goes through the APT SigLIP tower, packed. What reaches
the language model depends on `vision_feature_layout`:

- "grid": each tile's tokens are repeated over the base cells they cover (paper §3.3), then transformers' own
  `pack_image_features` runs: unpadding, one `image_newline` per row and the "anyres_max_9" shrinking of large maps.
  Counts and prompts are stock OneVision's.
- "packed": only the kept tokens. A tiled image sends its base tile's tokens (raster order), then the crops' tokens
  that touch the unpadded region, ordered and followed by one `image_newline` per unpadded row as `anyres.py` lays
  them out; an image of a multi-image prompt (`batch_num_images` > 1: not tiled, as stock) sends its one tile's tokens
  and one newline. The "anyres_max_9" shrinking has no packed counterpart.

Cap rule: packed APT never sends more visual tokens than stock would. An image whose packed count exceeds stock's
count for it (a large image the max-9 shrinking makes small while APT merged too little) is sent as its grid
features instead, which are stock's count; `AptLlavaOnevisionProcessor` applies the same rule, so each `<image>`
expands to exactly the features the model produces.

Videos: frames (dense `pixel_values_videos`) go through the APT tower too, are repeated to the grid and pooled by
transformers' own `apply_pooling`, so video prompts are stock's and only the tower does less work.

Coupling to transformers is through its override points only: `get_image_features` / `get_video_features` (which
take the packed layout keys and return per-image `pooler_output`s in outputs they build themselves),
`get_placeholder_mask`, and `mm_encoder_outputs`, the pre-encoded images that `LlavaOnevisionModel.forward` accepts
and that `generate` builds (and expands per beam / sample) itself.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModel, LlavaOnevisionForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    LlavaOnevisionMultiModalProjector,
    LlavaOnevisionPreTrainedModel,
    unpad_image,
)

from .anyres import anyres_packed_order
from .configuration_apt import AptLlavaOnevisionConfig
from .modeling_apt import AptPreTrainedMixin, expand_to_grid
from .modeling_apt_siglip import AptSiglipVisionModel
from .modeling_apt_vlm import encode_inputs, placeholder_slots, vlm_layer_groups, vlm_trainable_parts
from .patchify import PatchLayout
from .processing_apt_llava_onevision import onevision_tiles


class AptLlavaOnevisionModel(AptPreTrainedMixin, LlavaOnevisionModel):
    """`LlavaOnevisionModel` whose tower is an `AptSiglipVisionModel`; only image (and video) features differ."""

    config_class = AptLlavaOnevisionConfig
    apt_auto_map: ClassVar[dict[str, str]] = {"AutoModel": "AptLlavaOnevisionModel"}
    stock_class = LlavaOnevisionModel
    card_kind = "llava_onevision"
    trainable_parts: ClassVar[dict[str, str]] = vlm_trainable_parts(in_model=False, image_newline=True)
    layer_groups: ClassVar[dict[str, str]] = vlm_layer_groups(in_model=False)

    def __init__(self, config: AptLlavaOnevisionConfig) -> None:
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.vision_tower = AptSiglipVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    # -- image features ----------------------------------------------------------------------------------------
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.Tensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Tower (every tile, packed) -> selected layer(s) -> projector -> per image: packed tokens or the grid.

        `pixel_values`: the processor's base patches with the layout keys (one layout entry per tile, tiles of an
        image consecutive), or stock dense tiles (B, max_tiles, C, H, W) / (tiles, C, H, W). Returns `pooler_output`
        as a list of per-image features (newlines included), as transformers' OneVision does, plus the tower's packed
        `last_hidden_state`. Other keyword arguments (the language model's) are not the tower's and are not passed.
        """
        config = self.config
        aspect_ratio = vision_aspect_ratio or config.vision_aspect_ratio
        if pixel_values.numel() == 0:  # a text-only batch: no features, and no <image> slot to fill
            none = self.image_newline.new_zeros((0, self.image_newline.shape[0]))
            return BaseModelOutputWithPooling(pooler_output=[none])
        tiles, grid_shapes = onevision_tiles(image_sizes, batch_num_images, config.image_grid_pinpoints,
                                             config.vision_config.image_size)
        layout = PatchLayout.from_inputs(dict(zip(
            PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw), strict=True)))
        if layout is None and pixel_values.dim() == 5:  # stock dense tiles, padded to the batch's most tiles
            kept = torch.arange(pixel_values.shape[1], device=pixel_values.device) < torch.tensor(
                tiles, device=pixel_values.device)[:, None]
            pixel_values = pixel_values[kept]
        tower, features = self.encode_tiles(pixel_values, vision_feature_layer, vision_feature_select_strategy,
                                            layout)
        layout = tower.layout
        if layout.tokens_per_image.shape[0] != sum(tiles):
            raise ValueError(f"image_sizes / batch_num_images: they give {sum(tiles)} tiles, the pixels hold "
                             f"{layout.tokens_per_image.shape[0]}; build the inputs with an AptLlavaOnevisionProcessor "
                             "whose image_grid_pinpoints are the model's")
        sizes = torch.as_tensor(image_sizes, device=features.device)
        if config.vision_feature_layout == "grid":
            per_image = self.grid_image_features(features, layout, tiles, sizes, aspect_ratio, range(len(tiles)))
        else:
            packed, counts = self.packed_image_features(features, layout, tiles, grid_shapes, sizes)
            per_image = list(packed)
            stock = self.stock_feature_counts(tiles, sizes, aspect_ratio)
            over = [i for i, (n, limit) in enumerate(zip(counts.tolist(), stock, strict=True)) if n > limit]
            if over:  # the cap rule: these images go as stock's (grid) features, never more tokens than stock
                for i, grid in zip(over, self.grid_image_features(features, layout, tiles, sizes, aspect_ratio, over),
                                   strict=True):
                    per_image[i] = grid
        return BaseModelOutputWithPooling(last_hidden_state=tower.last_hidden_state, pooler_output=per_image,
                                          hidden_states=tower.hidden_states)

    def encode_tiles(self, pixel_values: torch.Tensor, vision_feature_layer: int | list[int] | None,
                     vision_feature_select_strategy: str | None, layout: PatchLayout | None = None
                     ) -> tuple[Any, torch.Tensor]:
        """Tiles or frames -> the APT tower (packed; only the selected layers' states kept, as stock selects them)
        -> projector: (tower output, (T, D) features per token; projecting before any grid expansion is cheaper)."""
        config = self.config
        layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        if strategy != "full":
            raise ValueError(f"vision_feature_select_strategy: APT-OneVision takes 'full' (SigLIP has no class token "
                             f"to drop), got {strategy!r}")
        layers = [layer] if isinstance(layer, int) else list(layer)
        tower = self.vision_tower(pixel_values, output_hidden_states=layers, return_dict=True,
                                  **({} if layout is None else layout.as_dict()))
        states = torch.cat([tower.hidden_states[i][0] for i in layers], dim=-1)  # packed (T, D')
        return tower, self.multi_modal_projector(states)

    def stock_feature_counts(self, tiles: list[int], image_sizes: torch.Tensor, vision_aspect_ratio: str
                             ) -> list[int]:
        """How many features stock OneVision sends for each image: its own `pack_image_features` run on one-channel
        placeholders (unpadding, newlines and the max-9 shrinking counted by the code that does them)."""
        cells = (self.config.vision_config.image_size // self.config.vision_config.patch_size) ** 2
        placeholders = self.image_newline.new_zeros(sum(tiles), cells, 1).split(tiles)
        _, lengths = self.pack_image_features(placeholders, image_sizes, self.image_newline.new_zeros(1),
                                              vision_aspect_ratio)
        return lengths.tolist()

    def grid_image_features(self, features: torch.Tensor, layout: PatchLayout, tiles: list[int],
                            image_sizes: torch.Tensor, vision_aspect_ratio: str, images: Sequence[int]
                            ) -> list[torch.Tensor]:
        """Stock OneVision's features of `images`: their tiles' tokens repeated to the grid, then transformers'
        `pack_image_features` (unpadding, newlines, max-9 shrinking)."""
        grids = expand_to_grid(features, layout)
        if isinstance(grids, list):
            raise ValueError(f"image_grid_hw: every tile must have the tower's grid, got "
                             f"{layout.image_grid_hw.unique(dim=0).tolist()}")
        per_image = grids.split(tiles)
        picked, _ = self.pack_image_features([per_image[i] for i in images], image_sizes[list(images)],
                                             image_newline=self.image_newline, vision_aspect_ratio=vision_aspect_ratio)
        return picked

    def packed_image_features(self, features: torch.Tensor, layout: PatchLayout, tiles: list[int],
                              grid_shapes: torch.Tensor, image_sizes: torch.Tensor
                              ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The kept tokens of every image in `anyres.py`'s packed order, with its newlines, and their counts."""
        order, counts = anyres_packed_order(layout, tiles, grid_shapes, image_sizes, unpad_image)
        rows = torch.cat([features, self.image_newline[None].to(features)])  # row -1: the newline
        return rows[order].split(counts.tolist()), counts

    # -- video features ----------------------------------------------------------------------------------------
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Dense frames (B, F, C, H, W) -> APT tower -> the grid -> projector -> transformers' `apply_pooling` ->
        (B, F * pooled + 1, D) with the trailing newline: stock OneVision's video features and counts."""
        if pixel_values_videos.dim() != 5:
            raise ValueError(f"pixel_values_videos: expected (batch, frames, channels, height, width), got shape "
                             f"{tuple(pixel_values_videos.shape)}")
        batch, frames = pixel_values_videos.shape[:2]
        tower, features = self.encode_tiles(pixel_values_videos.flatten(0, 1), vision_feature_layer,
                                            vision_feature_select_strategy)
        grid = expand_to_grid(features, tower.layout)  # (B * F, cells, D)
        pooled = self.apply_pooling(grid).reshape(batch, -1, grid.shape[-1])
        newline = self.image_newline.to(pooled)[None, None].expand(batch, 1, -1)
        return BaseModelOutputWithPooling(last_hidden_state=tower.last_hidden_state,
                                          pooler_output=torch.cat([pooled, newline], dim=1),
                                          hidden_states=tower.hidden_states)

    # -- placeholders and forward ------------------------------------------------------------------------------
    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor | None = None,
                             video_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The `<image>` and `<video>` slots (B, L, 1) each, refusing counts that do not match the features with a
        clear error."""
        hint = "AptLlavaOnevisionProcessor.from_llava_onevision_processor"
        return (placeholder_slots(self, input_ids, inputs_embeds, self.config.image_token_id, image_features,
                                  "image", hint),
                placeholder_slots(self, input_ids, inputs_embeds, self.config.video_token_id, video_features,
                                  "video", hint))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """`LlavaOnevisionModel.forward` plus the processor's packed image keys (encoded here, with any video, into
        `mm_encoder_outputs`)."""
        selection = {"vision_feature_layer": vision_feature_layer,
                     "vision_feature_select_strategy": vision_feature_select_strategy}
        image_kwargs = {**selection, "image_sizes": image_sizes, "vision_aspect_ratio": vision_aspect_ratio,
                        "batch_num_images": batch_num_images, "patch_scales": patch_scales,
                        "patch_positions": patch_positions, "tokens_per_image": tokens_per_image,
                        "image_grid_hw": image_grid_hw}
        mm_encoder_outputs = encode_inputs(mm_encoder_outputs, image_kwargs,
                                           image=(self.get_image_features, pixel_values, image_kwargs),
                                           video=(self.get_video_features, pixel_values_videos, selection))
        return super().forward(input_ids=input_ids, image_sizes=image_sizes, batch_num_images=batch_num_images,
                               vision_aspect_ratio=vision_aspect_ratio, mm_encoder_outputs=mm_encoder_outputs,
                               **selection, **kwargs)


class AptLlavaOnevisionForConditionalGeneration(AptPreTrainedMixin, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with APT as its vision tower; generation, loss and caching are transformers' own."""

    config_class = AptLlavaOnevisionConfig
    apt_auto_map: ClassVar[dict[str, str]] = {
        "AutoModel": "AptLlavaOnevisionModel",
        "AutoModelForImageTextToText": "AptLlavaOnevisionForConditionalGeneration",
    }
    stock_class = LlavaOnevisionForConditionalGeneration
    card_kind = "llava_onevision"
    trainable_parts: ClassVar[dict[str, str]] = vlm_trainable_parts(in_model=True, image_newline=True)
    layer_groups: ClassVar[dict[str, str]] = vlm_layer_groups(in_model=True)

    def __init__(self, config: AptLlavaOnevisionConfig) -> None:
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = AptLlavaOnevisionModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        batch_num_images: torch.LongTensor | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """`LlavaOnevisionForConditionalGeneration.forward` plus the processor's packed image keys.

        Declared here (with the stock image keys beside them) so that `generate` accepts them;
        `AptLlavaOnevisionModel.forward` turns them into `mm_encoder_outputs`.
        """
        layout = dict(zip(PatchLayout.KEYS, (patch_scales, patch_positions, tokens_per_image, image_grid_hw),
                          strict=True))
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                               batch_num_images=batch_num_images, mm_encoder_outputs=mm_encoder_outputs, **layout,
                               **kwargs)

    @classmethod
    def from_llava_onevision(
        cls, model_or_path: Any, vision_feature_layout: str = "packed", **kwargs: Any
    ) -> AptLlavaOnevisionForConditionalGeneration:
        """Convert a stock LLaVA-OneVision (object, local path or hub id such as
        `llava-hf/llava-onevision-qwen2-0.5b-ov-hf`).

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins; default LLaVA's [5.75]), image_mean /
        image_std (default: the checkpoint's image processor, else OpenAI CLIP's as OneVision's processors), and
        from_pretrained options (dtype, attn_implementation, ...) for paths. The stock tensors are adopted, not copied.
        """
        return cls._convert(model_or_path, vision_feature_layout=vision_feature_layout, **kwargs)


__all__ = ["AptLlavaOnevisionModel", "AptLlavaOnevisionForConditionalGeneration"]
