"""Padding-free language-model batches: the samples of a padded batch back to back in one row, and attention per sample.

`flatten_padded_batch` turns a padded batch into one row with `position_ids` restarting per sample, no attention
mask and `use_cache=False`, for callers that own the forward (training, loglikelihood scoring, a prefill benchmark).
transformers' packed-sequence path then finds the samples: flash-attention's varlen kernel from `position_ids`;
sdpa / flex / eager detect the boundaries when there is no mask and no cache. The image keys travel unchanged:
images fill the `<image>` slots in row order, which flattening keeps. `unflatten` puts per-token outputs (logits) back
into the padded layout.

On such a row plain sdpa would still compute attention over the whole row (its length squared, more than the
padded batch costs). `apt_sdpa_packed` (`register_packed_sdpa`) runs transformers' own sdpa function once per sample
instead (causal, no mask); on anything else (padded batches, generation with a cache) it is plain sdpa with the mask
transformers built, so it is always correct. Registered with transformers' `AttentionInterface` and
`AttentionMaskInterface`: the mask is sdpa's, except on one causal row without padding or cache, where it is None
(`packed_sdpa_mask`), so transformers builds no dense (L, L) block-diagonal mask that the per-sample attention never
reads. Meant for plain causal language models (LLaVA-1.5's Llama / Vicuna); a sliding-window config keeps sdpa's mask.
The samples' bounds are read from the device once per forward, not once per layer.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask


def flatten_padded_batch(inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` (left- or right-padded `input_ids` with their `attention_mask`) as one padding-free row.

    Returns the other keys unchanged plus `input_ids` (1, N), `position_ids` (1, N) restarting per sample and
    `use_cache=False`; N is the number of real tokens. Refuses a mask with holes inside a sample.
    """
    input_ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a (batch, length) tensor, got "
                         f"{None if input_ids is None else tuple(input_ids.shape)}")
    if mask is None or mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected one of shape {tuple(input_ids.shape)} (the padding to remove), "
                         f"got {None if mask is None else tuple(mask.shape)}")
    keep = mask.bool()
    lengths = keep.sum(-1)
    runs = (keep[:, 1:] & ~keep[:, :-1]).sum(-1) + keep[:, 0].long()
    if bool((runs > 1).any()):
        raise ValueError("attention_mask: expected padding only at the start or the end of each row, got a row "
                         "with masked tokens between real ones")
    if bool((lengths == 0).any()):
        raise ValueError("attention_mask: every row needs at least one real token, got an all-padding row")
    positions = keep.long().cumsum(-1) - 1
    flat = {k: v for k, v in inputs.items() if k != "attention_mask"}
    flat["input_ids"] = input_ids[keep][None]
    flat["position_ids"] = positions[keep][None]
    flat["use_cache"] = False
    return flat


def unflatten(values: torch.Tensor, attention_mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Per-token `values` (1, N, ...) of a flattened row back to the padded (batch, length, ...) layout."""
    keep = attention_mask.bool()
    if values.dim() < 2 or values.shape[0] != 1 or values.shape[1] != int(keep.sum()):
        raise ValueError(f"values: expected (1, {int(keep.sum())}, ...) for this attention_mask, got "
                         f"{tuple(values.shape)}")
    out = values.new_full((*keep.shape, *values.shape[2:]), fill)
    out[keep] = values[0]
    return out


SDPA_PACKED = "apt_sdpa_packed"


class _LastBounds:
    """The sample bounds of the last `position_ids` seen: every decoder layer of one forward gets the same tensor, so
    they are read from the device once per forward, not once per layer (32 host syncs on a 7B model)."""

    def __init__(self) -> None:
        self.entry: tuple[weakref.ref, int, list[int] | None] | None = None  # replaced whole: safe across threads

    def get(self, position_ids: torch.Tensor) -> list[int] | None:
        if position_ids.is_inference():  # made under torch.inference_mode: no version counter, so read every time
            return _read_bounds(position_ids)
        entry = self.entry
        if entry is not None and entry[0]() is position_ids and entry[1] == position_ids._version:
            return entry[2]
        bounds = _read_bounds(position_ids)
        self.entry = (weakref.ref(position_ids), position_ids._version, bounds)
        return bounds


def _read_bounds(position_ids: torch.Tensor) -> list[int] | None:
    """Start offsets of the samples of a (1, L) row (plus its end), or None when it holds one sample (one sync)."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0 or len(starts) == 1:
        return None
    return [*starts, position_ids.shape[1]]


_LAST_BOUNDS = _LastBounds()


def _sample_bounds(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """Start offsets of the samples of one flattened row (plus its end), or None when it is not one."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] != length:
        return None
    return _LAST_BOUNDS.get(position_ids)


def packed_sdpa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    config: Any = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """sdpa's mask, or None for one causal row without padding, cache or custom mask functions.

    On such a row `sdpa_packed_attention` runs each sample causally on its own (a flattened batch) or the whole row
    causally (one sequence), so the mask would be built and never read.
    """
    if (batch_size == 1 and attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length
            and not use_vmap and not getattr(config, "sliding_window", None)):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, use_vmap=use_vmap, config=config, **kwargs)


def sdpa_packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa per sample on a flattened row (B=1, no cache: queries and keys of the same length); sdpa otherwise."""
    bounds = _sample_bounds(position_ids, query.shape[2]) if query.shape[2] == key.shape[2] else None
    if bounds is None or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                        None, dropout=dropout, scaling=scaling, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def register_packed_sdpa() -> str:
    """Register `apt_sdpa_packed` (attention and its mask) with transformers; returns the name."""
    AttentionInterface.register(SDPA_PACKED, sdpa_packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_PACKED, packed_sdpa_mask)
    return SDPA_PACKED


__all__ = ["SDPA_PACKED", "flatten_padded_batch", "packed_sdpa_mask", "register_packed_sdpa", "sdpa_packed_attention",
           "unflatten"]
