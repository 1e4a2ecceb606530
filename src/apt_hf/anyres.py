"""APT tokens in LLaVA-NeXT / OneVision "anyres" order: which kept tokens a language model reads, and where newlines go.

An anyres image is a base tile (the whole image resized to one tile) plus a grid of crop tiles (the image resized to
a best-fit pinpoint, padded, cut into tiles). Stock LLaVA-NeXT / OneVision send the base tile's cells, then the crop
tiles' cells stitched into one map, unpadded (`unpad_image`, which drops the rows or columns of padding) and read
row by row with one `image_newline` after every row. With APT a token may cover 2**s x 2**s cells, so "packed"
order is defined on tokens:

- the base tile's tokens come first, in their own (raster) order, with no newline after them (as stock);
- a crop token is placed on the stitched map (tile (i, j) of the grid starts at row i * tile_rows, column
  j * tile_cols); a token none of whose cells lie inside the unpadded rectangle is dropped;
- the others are read by their anchor, the first of their cells inside the rectangle in row-major order (row,
  then column); a token spanning two rows is read in the row of its anchor;
- one newline follows every row of the unpadded rectangle (a row where no token is anchored still gets one), so
  there are as many newlines as stock sends;
- an image that is not tiled (one tile, no crop grid) sends its tokens and one newline, as stock does.

With nothing merged every token is one cell, the anchors are the cells themselves, and the order is exactly stock's.
The rectangle is found by running transformers' own `unpad_image` on an index map of the stitched grid, so its
rounding is stock's by construction. The model (to gather features) and the processor (to count `<image>` tokens)
call the same functions here, so their counts always agree.

Orders are index tensors into an image's (or batch's) tokens, every tile's tokens concatenated in processor order
(base tile first), with -1 where a newline goes: `torch.cat([features, newline[None]])[order]` is the sequence.

Part of the remote-code set: imports only torch, transformers and sibling modules (relatively).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from .patchify import PatchLayout, segment_ids

NEWLINE = -1  # the index that marks an `image_newline` in an order

Unpad = Callable[[torch.Tensor, Any], torch.Tensor]  # transformers' `unpad_image(tensor (C, H, W), (height, width))`


def anyres_tiles(image_sizes: torch.Tensor | Sequence[Sequence[int]], grid_pinpoints: list, tile_size: int
                 ) -> tuple[list[int], torch.Tensor]:
    """Per image (original (height, width) in `image_sizes`), the number of tiles (base + crops) and the (tiles down,
    tiles across) crop grid, as stock LLaVA-NeXT computes them (`image_size_to_num_patches`,
    `get_anyres_image_grid_shape`) for tiles of `tile_size` pixels. Grid shapes come back as a (B, 2) int64 tensor."""
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
    tiles = [image_size_to_num_patches(size, grid_pinpoints, tile_size) for size in sizes]
    shapes = [get_anyres_image_grid_shape(size, grid_pinpoints, tile_size) for size in sizes]
    return tiles, torch.tensor(shapes, dtype=torch.int64).view(-1, 2)


def unpad_bounds(grid_hw: Sequence[int], image_size: Sequence[int] | torch.Tensor, unpad: Unpad = unpad_image
                 ) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of the region `unpad` keeps of a stitched (height, width) feature map of an image of
    original size `image_size`: the function itself runs on an index map, so the bounds are stock's exactly. An
    empty region (rows or cols 0, for extreme aspect ratios) still has its rows or columns counted, as stock does."""
    height, width = (int(v) for v in grid_hw)
    size = image_size.tolist() if isinstance(image_size, torch.Tensor) else [int(v) for v in image_size]
    kept = unpad(torch.arange(height * width).view(1, height, width), size)
    if kept.numel() == 0:  # an extreme aspect ratio: no cell is kept, only the rows' newlines (as stock)
        return 0, 0, kept.shape[1], kept.shape[2]
    first = int(kept[0, 0, 0])
    return first // width, first % width, kept.shape[1], kept.shape[2]


def anyres_image_order(tile_layout: PatchLayout, image_size: Sequence[int] | torch.Tensor,
                       grid_shape: Sequence[int] | torch.Tensor, unpad: Unpad = unpad_image) -> torch.Tensor:
    """The packed order of one image (see the module docstring): a (L,) int64 index into its tokens (every tile's
    tokens concatenated, base tile first), `NEWLINE` (-1) where an `image_newline` goes.

    `tile_layout`: the image's tiles as the processor lays them out (one "image" of the layout per tile, base first);
    `image_size`: its original (height, width); `grid_shape`: its (tiles down, tiles across) crop grid, (0, 0) for an
    image that is not tiled. Kept tokens: `order[order >= 0]`; newline positions: `(order < 0).nonzero()`.
    """
    counts = tile_layout.tokens_per_image
    device = counts.device
    tiles_down, tiles_across = (int(v) for v in grid_shape)
    base = int(counts[0])
    if counts.shape[0] == 1 and tiles_down * tiles_across == 0:  # not tiled: its tokens, then one newline
        return torch.cat([torch.arange(base, device=device), torch.full((1,), NEWLINE, device=device)])
    if counts.shape[0] != tiles_down * tiles_across + 1:
        raise ValueError(f"image_sizes: a {tiles_down}x{tiles_across} crop grid needs {tiles_down * tiles_across + 1} "
                         f"tiles (base + crops), the pixels hold {counts.shape[0]} for this image; build the inputs "
                         "with the processor of the model's image_grid_pinpoints and tile size")
    grids = tile_layout.image_grid_hw
    if not bool((grids == grids[:1]).all()):
        raise ValueError(f"image_grid_hw: every tile of an image must have the same grid, got "
                         f"{grids.unique(dim=0).tolist()}")
    tile_rows, tile_cols = (int(v) for v in grids[0])
    top, left, rows, cols = unpad_bounds((tiles_down * tile_rows, tiles_across * tile_cols), image_size, unpad)
    scales, positions = tile_layout.patch_scales[base:], tile_layout.patch_positions[base:]
    tile = segment_ids(counts[1:], scales.shape[0])  # crop tile of each crop token, raster over the grid
    side = torch.ones_like(scales) << scales
    row = torch.div(tile, tiles_across, rounding_mode="floor") * tile_rows + positions[:, 0]
    col = tile % tiles_across * tile_cols + positions[:, 1]
    touches = (row < top + rows) & (row + side > top) & (col < left + cols) & (col + side > left)
    kept = touches.nonzero().squeeze(1)
    anchor_row = row[kept].clamp(min=top) - top
    anchor_col = col[kept].clamp(min=left) - left
    by_anchor = torch.argsort(anchor_row * cols + anchor_col)  # anchors are distinct cells: no ties
    kept, anchor_row = kept[by_anchor], anchor_row[by_anchor]
    per_row = torch.bincount(anchor_row, minlength=rows)
    length = base + kept.shape[0] + rows
    newlines = base + per_row.cumsum(0) + torch.arange(rows, device=device)  # after each row's last token
    order = torch.full((length,), NEWLINE, dtype=torch.int64, device=device)
    is_token = torch.ones(length, dtype=torch.bool, device=device)
    is_token[newlines] = False
    order[is_token] = torch.cat([torch.arange(base, device=device), kept + base])
    return order


def anyres_packed_order(layout: PatchLayout, tiles: Sequence[int], grid_shapes: torch.Tensor | Sequence,
                        image_sizes: torch.Tensor | Sequence, unpad: Unpad = unpad_image
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed order of a batch: (order, counts).

    `layout`: the processor's layout of every tile of every image (base tile first per image); `tiles`: tiles per
    image; `grid_shapes` (B, 2): each image's crop grid ((0, 0): not tiled); `image_sizes` (B, 2): original sizes.
    `order` indexes the batch's tokens (-1: a newline), so `torch.cat([features, newline[None]])[order]` is every
    image's sequence back to back; `counts` (B,) int64 is each image's sequence length (its `<image>` tokens).
    """
    tiles = [int(n) for n in tiles]
    per_tile = layout.tokens_per_image.tolist()
    if sum(tiles) != len(per_tile) or len(tiles) != len(grid_shapes) or len(tiles) != len(image_sizes):
        raise ValueError(f"image_sizes: {len(image_sizes)} images of {sum(tiles)} tiles in all, with "
                         f"{len(grid_shapes)} crop grids, for pixels holding {len(per_tile)} tiles; build the inputs "
                         "with the processor of the model's image_grid_pinpoints and tile size")
    device = layout.tokens_per_image.device
    orders, tile_start, token_start = [], 0, 0
    for n, grid_shape, size in zip(tiles, grid_shapes, image_sizes, strict=True):
        tokens = sum(per_tile[tile_start:tile_start + n])
        image = PatchLayout(layout.patch_scales[token_start:token_start + tokens],
                            layout.patch_positions[token_start:token_start + tokens],
                            layout.tokens_per_image[tile_start:tile_start + n],
                            layout.image_grid_hw[tile_start:tile_start + n])
        order = anyres_image_order(image, size, grid_shape, unpad)
        orders.append(torch.where(order >= 0, order + token_start, order))
        tile_start, token_start = tile_start + n, token_start + tokens
    counts = torch.tensor([o.shape[0] for o in orders], dtype=torch.int64, device=device)
    order = torch.cat(orders) if orders else torch.zeros(0, dtype=torch.int64, device=device)
    return order, counts


__all__ = ["NEWLINE", "anyres_image_order", "anyres_packed_order", "anyres_tiles", "unpad_bounds"]
