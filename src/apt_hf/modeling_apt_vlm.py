"""What every APT vision-language model shares (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision): the names of its
trainable parts and layer groups, and the check that the prompt's placeholders match the features.

All three hold the tower at `vision_tower`, the projector at `multi_modal_projector` and the language model at
`language_model` (under `model.` in the *ForConditionalGeneration classes, beside `lm_head`), so their declarations
differ only by that prefix and by the learned `image_newline` that the tiled families place after every row.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .patchify import PatchLayout

_APT_LAYERS = r"(?:merge_conv|zero_mlp)\."


def vlm_trainable_parts(in_model: bool, image_newline: bool = False) -> dict[str, str]:
    """`--trainable` names -> parameter-name regexes: APT's new layers, the projector (with `image_newline` where the
    family has one), the language model with its head, the whole vision tower. `in_model`: the parameters sit under
    `model.` (a *ForConditionalGeneration class)."""
    prefix = r"model\." if in_model else ""
    projector = r"(?:multi_modal_projector\.|image_newline$)" if image_newline else r"multi_modal_projector\."
    return {
        "apt": rf"^{prefix}vision_tower\.embeddings\.{_APT_LAYERS}",
        "projector": rf"^{prefix}{projector}",
        "language_model": r"^(?:model\.language_model|lm_head)\." if in_model else r"^language_model\.",
        "vision_tower": rf"^{prefix}vision_tower\.",
    }


def vlm_layer_groups(in_model: bool) -> dict[str, str]:
    """timm-style layer groups down the vision tower, the part APT changes: its stem (pretrained embeddings and,
    for CLIP, the pre-layernorm), then its numbered blocks; everything else is the top group."""
    prefix = r"model\." if in_model else ""
    return {
        "stem": rf"^{prefix}vision_tower\.(?:embeddings\.(?!{_APT_LAYERS})|pre_layrnorm\.)",
        "blocks": rf"^{prefix}vision_tower\.encoder\.layers\.(\d+)\.",
    }


def placeholder_slots(model: Any, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor,
                      token_id: int, features: torch.Tensor | None, name: str, processor_hint: str) -> torch.Tensor:
    """The `<name>` slots (B, L, 1) of a prompt, refusing a count that does not match the features with the fix in
    the message (the stock check only compares element counts, deep inside the forward). `features` None: the
    slots alone, unchecked (e.g. the image slots while the video features are placed)."""
    if input_ids is None:
        embed = model.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        slots = (inputs_embeds == embed).all(-1)
    else:
        slots = input_ids == token_id
    found = int(slots.sum())
    needed = found if features is None else features.numel() // inputs_embeds.shape[-1]
    if found != needed:
        layout = model.config.vision_feature_layout
        raise ValueError(
            f"input_ids: {found} <{name}> tokens for {needed} {name} features (vision_feature_layout={layout!r}). "
            f"Build the inputs with a processor of the same layout ({processor_hint}(..., vision_feature_layout="
            f"{layout!r})) and one <{name}> per {name}"
        )
    return slots[..., None].to(inputs_embeds.device)


def encode_inputs(mm_encoder_outputs: dict[str, Any] | None, layout_inputs: dict[str, Any],
                  **encoders: tuple[Callable[..., Any], torch.Tensor | None, dict[str, Any]]) -> dict[str, Any]:
    """`mm_encoder_outputs` with every modality given as pixels encoded (`name=(encode, pixels, kwargs)`, e.g.
    `image=(self.get_image_features, pixel_values, {...})`): the pre-encoded inputs the stock forward accepts.

    Refused: the packed layout keys without the image pixels they describe, and pixels beside pre-encoded features
    of the same modality.
    """
    outputs = dict(mm_encoder_outputs or {})
    image_pixels = encoders.get("image", (None, None, None))[1]
    if image_pixels is None and PatchLayout.from_inputs(layout_inputs) is not None:
        raise ValueError("pixel_values: the packed layout keys were given without the pixels they describe")
    for name, (encode, pixels, kwargs) in encoders.items():
        if pixels is None:
            continue
        if outputs.get(name) is not None:
            raise ValueError(f"pixel_values / mm_encoder_outputs: pass raw pixels or pre-encoded {name}s, not both")
        outputs[name] = encode(pixels, **kwargs)
    return outputs


__all__ = ["encode_inputs", "placeholder_slots", "vlm_layer_groups", "vlm_trainable_parts"]
