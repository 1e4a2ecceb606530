"""LLaVA-1.5 with APT as its vision tower: transformers' LLaVA classes, overriding only the image features.

"packed": per image, the kept tokens (CLS dropped for strategy "default") go through the projector into
exactly as many `<image>` slots, so the language model reads fewer tokens. "grid": tokens are repeated over
the base cells they cover (paper §3.3), so the counts, and prompts, are stock LLaVA's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaModel, LlavaMultiModalProjector, LlavaPreTrainedModel

from .configuration_apt import APT_FIELDS, AptLlavaConfig
from .modeling_apt import AptCLIPVisionModel, drop_cls_tokens, expand_to_grid
from .patchify import PatchLayout, select_images

LAYOUT_KEYS = ("patch_scales", "patch_positions", "tokens_per_image", "image_grid_hw")


def _layout_of(inputs: dict[str, Any]) -> PatchLayout | None:
    present = [k for k in LAYOUT_KEYS if inputs.get(k) is not None]
    if not present:
        return None
    if len(present) != len(LAYOUT_KEYS):
        missing = [k for k in LAYOUT_KEYS if inputs.get(k) is None]
        raise ValueError(f"{', '.join(missing)}: packed image keys missing; pass every key the processor returns "
                         f"(model(**processor(images=..., text=...)))")
    return PatchLayout(*(inputs[k] for k in LAYOUT_KEYS))


def _layout_kwargs(layout: PatchLayout) -> dict[str, torch.Tensor]:
    return {k: getattr(layout, k) for k in LAYOUT_KEYS}


class AptLlavaModel(LlavaModel):
    """`LlavaModel` whose tower is an `AptCLIPVisionModel`; only image feature extraction differs."""

    config_class = AptLlavaConfig

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
        """Tower -> selected layer(s) -> (CLS dropped) -> projector -> (grid expansion); `pooler_output` is a list
        of per-image features, as in transformers' LLaVA."""
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        layout = _layout_of({"patch_scales": patch_scales, "patch_positions": patch_positions,
                             "tokens_per_image": tokens_per_image, "image_grid_hw": image_grid_hw})
        layout_kwargs = {} if layout is None else _layout_kwargs(layout)
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "image_sizes"}
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **layout_kwargs, **kwargs)
        layers = [layer] if isinstance(layer, int) else list(layer)
        states = torch.cat([out.hidden_states[i][0] for i in layers], dim=-1)  # packed (L, D')
        if strategy == "default":
            states = drop_cls_tokens(states, out.cu_seqlens)
        features = self.multi_modal_projector(states)  # per token; projecting before the grid expansion is cheaper
        out_layout = out.layout
        if self.config.vision_feature_layout == "grid":
            grid = expand_to_grid(features, out_layout, has_cls=strategy != "default")
            per_image = list(grid) if isinstance(grid, torch.Tensor) else grid
            if strategy != "default":  # "full": CLS first, then the grid
                cls = features[out.cu_seqlens[:-1].long()]
                per_image = [torch.cat([c[None], g]) for c, g in zip(cls, per_image, strict=True)]
        else:
            per_image = list(features.split(self.image_token_counts(out_layout, strategy).tolist()))
        out.pooler_output = per_image
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("input_ids / inputs_embeds: specify exactly one of them")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(
                pixel_values, vision_feature_layer, vision_feature_select_strategy, patch_scales=patch_scales,
                patch_positions=patch_positions, tokens_per_image=tokens_per_image, image_grid_hw=image_grid_hw,
            ).pooler_output
            image_features = torch.cat(image_features).to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self._image_slots(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], image_features)
        outputs = super().forward(
            input_ids=None, pixel_values=None, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs,
        )
        outputs.image_hidden_states = image_features
        return outputs

    def _image_slots(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor,
                     image_features: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the `<image>` slots, refusing a count that does not match the features."""
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device))
            slots = (inputs_embeds == image_embed).all(-1)
        else:
            slots = input_ids == self.config.image_token_id
        found, needed = int(slots.sum()), image_features.shape[0]
        if found != needed:
            raise ValueError(
                f"input_ids: {found} <image> tokens for {needed} image features (vision_feature_layout="
                f"{self.config.vision_feature_layout!r}). Build the inputs with an AptLlavaProcessor of the same "
                f"layout (AptLlavaProcessor.from_llava_processor(..., vision_feature_layout="
                f"{self.config.vision_feature_layout!r})) and one <image> per image"
            )
        return slots


class AptLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-1.5 with APT as its vision tower; generation, loss and caching are transformers' own."""

    config_class = AptLlavaConfig

    def __init__(self, config: AptLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = AptLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        patch_scales: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        tokens_per_image: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """LlavaForConditionalGeneration.forward plus the processor's packed image keys."""
        return super().forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels, logits_to_keep=logits_to_keep, patch_scales=patch_scales, patch_positions=patch_positions,
            tokens_per_image=tokens_per_image, image_grid_hw=image_grid_hw, **kwargs,
        )

    def apt_parameters(self) -> list[nn.Parameter]:
        """The parameters APT adds to the tower (merge conv, zero-MLP)."""
        return self.model.vision_tower.apt_parameters()

    def named_apt_parameters(self) -> list[tuple[str, nn.Parameter]]:
        prefix = "model.vision_tower."
        return [(prefix + name, p) for name, p in self.model.vision_tower.named_apt_parameters()]

    # -- generation: image keys are per image (or per base patch), never per prompt ------------------------------
    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if model_inputs.get("pixel_values") is None:  # images are used at prefill only
            for key in LAYOUT_KEYS:
                model_inputs.pop(key, None)
        return model_inputs

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: torch.LongTensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.LongTensor | None, dict[str, Any]]:
        """Repeat each prompt's images with the prompt (beam search, num_return_sequences)."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        layout_values = {k: model_kwargs.pop(k) for k in LAYOUT_KEYS if model_kwargs.get(k) is not None}
        # keywords through super(): a staticmethod in transformers 5.17, a method in later releases
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        if pixel_values is None or expand_size == 1:
            model_kwargs.update(pixel_values=pixel_values, **layout_values)
            return expanded_ids, model_kwargs
        layout = _layout_of(layout_values)
        images_per_prompt = self._images_per_prompt(input_ids, layout, pixel_values)
        first = (torch.cumsum(images_per_prompt, 0) - images_per_prompt).tolist()
        index = torch.cat([torch.arange(f, f + n).repeat(expand_size)
                           for f, n in zip(first, images_per_prompt.tolist(), strict=True)])
        if layout is None:
            model_kwargs["pixel_values"] = pixel_values[index.to(pixel_values.device)]
        else:
            pixel_values, layout = select_images(pixel_values, layout, index)
            model_kwargs.update(pixel_values=pixel_values, **_layout_kwargs(layout))
        return expanded_ids, model_kwargs

    def _images_per_prompt(self, input_ids: torch.Tensor | None, layout: PatchLayout | None,
                           pixel_values: torch.Tensor) -> torch.Tensor:
        """Assign images to prompts in order, from each prompt's `<image>` count and each image's token count."""
        if input_ids is None:
            raise ValueError("input_ids: needed to expand image inputs for beam search / num_return_sequences")
        slots = (input_ids == self.config.image_token_id).sum(-1).cpu()
        if layout is None:  # dense images: only one image per prompt can be told apart
            if pixel_values.shape[0] != input_ids.shape[0]:
                raise ValueError("pixel_values: with several images per prompt, pass the processor's packed keys "
                                 "to use beam search or num_return_sequences")
            return torch.ones(input_ids.shape[0], dtype=torch.int64)
        per_image = self.model.image_token_counts(layout).cpu()
        ends = torch.searchsorted(torch.cumsum(per_image, 0), torch.cumsum(slots, 0), right=True)
        return torch.diff(ends, prepend=torch.zeros(1, dtype=ends.dtype))

    # -- conversion ---------------------------------------------------------------------------------------------
    @classmethod
    def from_llava(
        cls, model_or_path: Any, vision_feature_layout: str = "packed", **kwargs: Any
    ) -> AptLlavaForConditionalGeneration:
        """Convert a stock LLaVA-1.5 (object, local path or hub id such as `llava-hf/llava-1.5-7b-hf`).

        kwargs: the APT fields (num_scales, thresholds, scorer, entropy_bins; default LLaVA-1.5's [5.75]),
        image_mean / image_std, and from_pretrained options (dtype, attn_implementation, ...) for paths.
        The stock tensors are adopted, not copied, so converting a 7B model needs no second copy in memory.
        """
        apt = {k: kwargs.pop(k) for k in (*APT_FIELDS, "image_mean", "image_std") if k in kwargs}
        if isinstance(model_or_path, nn.Module):
            if kwargs:
                raise ValueError(f"from_llava: loading options {sorted(kwargs)} only apply to a path or hub id")
            stock = model_or_path
        else:
            stock = LlavaForConditionalGeneration.from_pretrained(model_or_path, **kwargs)
        if not isinstance(stock, LlavaForConditionalGeneration) or isinstance(stock, cls):
            raise ValueError(f"model_or_path: expected a stock LlavaForConditionalGeneration, got "
                             f"{type(stock).__name__}")
        settings = stock.config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
            settings.pop(key, None)
        config = AptLlavaConfig(**settings, vision_feature_layout=vision_feature_layout, **apt)
        config._attn_implementation = stock.config._attn_implementation
        config.vision_config._attn_implementation = stock.config.vision_config._attn_implementation
        config.text_config._attn_implementation = stock.config.text_config._attn_implementation
        with torch.device("meta"):
            model = cls(config)
        _adopt(model, stock)
        model.config.architectures = [cls.__name__]
        model.generation_config = stock.generation_config
        return model.train(stock.training)


def _adopt(model: nn.Module, stock: nn.Module) -> None:
    """Fill a meta-device APT model with the stock model's own tensors; initialise only what APT adds."""
    stock_params = dict(stock.named_parameters())
    stock_buffers = dict(stock.named_buffers())
    tower = model.model.vision_tower
    new = {name for name, _ in model.named_apt_parameters()}
    like = stock.model.vision_tower.get_input_embeddings().weight  # new APT weights live beside the tower's
    params = {name for name, _ in model.named_parameters()}
    for name in [*params, *(name for name, _ in model.named_buffers())]:
        if name in new:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        is_param = name in params
        source = stock_params.get(name) if is_param else stock_buffers.get(name)
        if source is None:
            raise ValueError(f"from_llava: the stock model has no {name!r}; is it a LLaVA-1.5 checkpoint?")
        if is_param:
            owner._parameters[leaf] = source
        else:
            owner._buffers[leaf] = source
    for name in new:
        owner = model.get_submodule(name.rpartition(".")[0])
        owner.to_empty(device=like.device, recurse=False)
        owner.to(like.dtype)
        tower._init_weights(owner)


# save_pretrained writes auto_map and copies this file and its relative imports (remote code).
AptLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


def register_auto_classes() -> None:
    """Register AptLlavaConfig / AptLlavaForConditionalGeneration with the Auto classes (`import apt_hf`)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    AutoConfig.register(AptLlavaConfig.model_type, AptLlavaConfig, exist_ok=True)
    AutoModel.register(AptLlavaConfig, AptLlavaModel, exist_ok=True)
    AutoModelForImageTextToText.register(AptLlavaConfig, AptLlavaForConditionalGeneration, exist_ok=True)


__all__ = ["AptLlavaModel", "AptLlavaForConditionalGeneration", "register_auto_classes"]
