"""Padding-free forwards for a padded batch: one row of the samples back to back, for callers that own the forward.

A padded batch spends compute on padding. Where the caller runs the forward itself (loglikelihood scoring, a
prefill benchmark) and needs no cache, the batch can instead run as one row with `position_ids` restarting per
sample, no attention mask and `use_cache=False`: transformers' packed-sequence path (flash-attention varlen from
`position_ids`; sdpa / flex / eager detect the boundaries when there is no mask and no cache; `apt_sdpa_packed`
runs sdpa per sample). The image keys travel unchanged: images fill the `<image>` slots in row order, which
flattening keeps. `unflatten` puts per-token outputs (logits) back into the padded layout.
"""

from __future__ import annotations

from typing import Any

import torch


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


__all__ = ["flatten_padded_batch", "unflatten"]
