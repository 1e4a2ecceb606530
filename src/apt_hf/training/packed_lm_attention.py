"""Padding-free batches for the language model on sdpa: attention per sample, not over the whole flattened row.

A padding-free batch is one row of samples back to back with `position_ids` restarting at each. transformers
then builds a block-diagonal causal mask over the whole row, and sdpa computes attention over all of it: the
row's length squared, more than the padded batch costs. Flash-attention instead runs its varlen kernel on the
samples. `apt_sdpa_packed` does the same with sdpa: on a flattened row without a cache it runs transformers' own
sdpa function once per sample (causal, no mask); on anything else (padded batches, generation with a cache) it is
plain sdpa with the mask transformers built, so it is always correct. Registered with transformers'
`AttentionInterface` and `AttentionMaskInterface`: the mask is sdpa's, except on one causal row without padding or
cache, where it is None (`packed_sdpa_mask`), so transformers does not build a dense (L, L) block-diagonal mask for a
flattened row that the per-sample attention never reads. Meant for plain causal language models (LLaVA-1.5's
Llama / Vicuna); a sliding-window config keeps sdpa's mask.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SDPA_PACKED = "apt_sdpa_packed"


class _LastBounds:
    """The sample bounds of the last `position_ids` seen: every decoder layer of one forward gets the same tensor, so
    they are read from the device once per forward, not once per layer (32 host syncs on a 7B model)."""

    def __init__(self) -> None:
        self.entry: tuple[weakref.ref, int, list[int] | None] | None = None  # replaced whole: safe across threads

    def get(self, position_ids: torch.Tensor) -> list[int] | None:
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


def register() -> str:
    """Register `apt_sdpa_packed` (attention and its mask) with transformers; returns the name."""
    AttentionInterface.register(SDPA_PACKED, sdpa_packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_PACKED, packed_sdpa_mask)
    return SDPA_PACKED


__all__ = ["SDPA_PACKED", "packed_sdpa_mask", "register", "sdpa_packed_attention"]
