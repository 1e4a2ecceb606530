"""One FLOP model for the ideal (FLOP-ratio) speedup that evaluation and benchmarks report beside measured ones.

FLOPs are counted as 2 per multiply-add, over the matrix products that dominate a transformer: per layer and
sequence of n tokens of width D, 4 D^2 n (query, key, value, output projections) + m D I n (the MLP's m matrices of
width I) + 2 D n^2 (scores and weighted sum). Only ratios of these counts are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .patchify import PatchLayout


def layer_flops(lengths: Sequence[int] | torch.Tensor, hidden: int, intermediate: int, mlp_matrices: int) -> float:
    """FLOPs of one transformer layer over sequences of the given lengths (each attends only to itself)."""
    n = torch.as_tensor(lengths, dtype=torch.float64)
    linear = 4 * hidden * hidden + mlp_matrices * hidden * intermediate
    return float(2 * (linear * n.sum() + 2 * hidden * n.square().sum()))


def vision_flops(config: Any, layout: PatchLayout, apt: bool, class_token: bool = True) -> float:
    """FLOPs of a vision tower's forward (patch embedding + encoder) on `layout`, with one class token per image
    (ViT, CLIP) or none (`class_token=False`: SigLIP; its attention-pooling head is not counted).

    `apt`: count APT's embedding too (the resized-block embedding, the zero-MLP and the 2 x 2 merge conv at each
    level of a merged token's quadtree); without it, the stock patch embedding alone.
    """
    d, channels, p = config.hidden_size, config.num_channels, int(config.patch_size)
    lengths = layout.tokens_per_image + int(class_token)
    encoder = config.num_hidden_layers * layer_flops(lengths, d, config.intermediate_size, 2)
    cells = float(layout.image_grid_hw.prod(-1).double().sum())
    flops = encoder + 2 * cells * channels * p * p * d  # E on every base patch
    if apt:
        scales = layout.patch_scales
        merged = float((scales > 0).sum())
        conv_blocks = sum(float((scales == s).sum()) * sum(4 ** (s - k) for k in range(1, s + 1))
                          for s in range(1, int(scales.max()) + 1)) if merged else 0.0
        flops += 2 * (merged * (channels * p * p * d + d * d) + conv_blocks * 4 * d * d)
    return flops


def llava_prefill_flops(model: Any, vision_tokens: Sequence[int], text_lengths: Sequence[int],
                        lm_image_tokens: int, class_token: bool = True) -> float:
    """FLOPs of a LLaVA prefill: the tower (plus a CLS token per image or tile where it has one) on
    `vision_tokens` per image or tile, the projector on the `lm_image_tokens` that reach the language model, and the
    language model over `text_lengths`."""
    vc, tc = model.config.vision_config, model.config.text_config
    tower = vc.num_hidden_layers * layer_flops([t + int(class_token) for t in vision_tokens], vc.hidden_size,
                                               vc.intermediate_size, 2)
    projector = 2 * lm_image_tokens * (vc.hidden_size * tc.hidden_size + tc.hidden_size ** 2)
    text = tc.num_hidden_layers * layer_flops(text_lengths, tc.hidden_size, tc.intermediate_size, 3)
    return tower + projector + text


__all__ = ["layer_flops", "llava_prefill_flops", "vision_flops"]
