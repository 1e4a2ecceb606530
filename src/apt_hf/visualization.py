"""Draw APT layouts on images with PIL only (no matplotlib): token outlines coloured by scale, titles, legends.

Used by `scripts/visualize_patches.py`; kept here so notebooks, model cards and tests can call it directly.
Every function takes the image *as the model sees it* (after resize / crop / pad), so token (row, col)
positions map to pixels by multiplying with the base patch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .patchify import PatchLayout, compute_layout, entropy_scores, recover_uint8, unpack_base_patches

# Scale s -> RGB: white for the base grid, then warm-to-cool high-contrast colours for merged tokens.
SCALE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),
    (255, 176, 0),
    (0, 200, 255),
    (255, 60, 170),
    (110, 255, 80),
    (170, 110, 255),
)
BAND_BACKGROUND = (24, 24, 24)
TEXT_COLOUR = (240, 240, 240)


def scale_colour(scale: int) -> tuple[int, int, int]:
    """Colour of a scale's outlines (cycles after the palette, which covers the scales used in practice)."""
    return SCALE_COLOURS[scale % len(SCALE_COLOURS)]


def _as_list(values: Any) -> list:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def draw_layout(
    image: Image.Image,
    patch_scales: Sequence[int] | torch.Tensor,
    patch_positions: Sequence[Sequence[int]] | torch.Tensor,
    patch_size: int,
    *,
    line_width: int = 1,
    fill_alpha: int = 8,
    upscale: int = 1,
) -> Image.Image:
    """Return a copy of `image` with every token's square outlined in its scale's colour.

    Merged tokens (scale >= 1) also get a faint tint (`fill_alpha` of 255: at most that many levels of colour
    change, so a blue sky stays blue) on top of their coloured outlines, as in the paper's figure 1. `upscale`
    enlarges the image first (nearest) so thin outlines stay readable on small inputs. Outline pixels are exactly
    `scale_colour(scale)`; positions are (row, col) of the top-left base cell, as in `PatchLayout`.
    """
    if patch_size < 1 or upscale < 1 or line_width < 1:
        raise ValueError(f"patch_size, upscale, line_width: expected ints >= 1, got {patch_size}, {upscale}, "
                         f"{line_width}")
    scales, positions = _as_list(patch_scales), _as_list(patch_positions)
    if len(scales) != len(positions):
        raise ValueError(f"patch_positions: expected one (row, col) per token ({len(scales)}), got {len(positions)}")
    base = image.convert("RGB")
    if upscale > 1:
        base = base.resize((base.width * upscale, base.height * upscale), Image.Resampling.NEAREST)
    cell = patch_size * upscale
    boxes = []
    for s, (r, c) in zip(scales, positions, strict=True):
        side = cell << s
        x0, y0 = c * cell, r * cell
        if r < 0 or c < 0 or x0 + side > base.width or y0 + side > base.height:
            raise ValueError(f"patch_positions: token of scale {s} at (row {r}, col {c}) does not fit a "
                             f"{image.width}x{image.height} image with patch_size={patch_size}")
        boxes.append((s, (x0, y0, x0 + side - 1, y0 + side - 1)))
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    tint_draw = ImageDraw.Draw(tint)
    for s, box in boxes:
        if s > 0:
            tint_draw.rectangle(box, fill=(*scale_colour(s), fill_alpha))
    out = Image.alpha_composite(base.convert("RGBA"), tint).convert("RGB")
    draw = ImageDraw.Draw(out)
    # Base-grid outlines first, merged tokens on top, so a coloured square is never overdrawn in white.
    for s, box in sorted(boxes, key=lambda item: item[0]):
        draw.rectangle(box, outline=scale_colour(s), width=min(line_width * upscale, (cell << s) // 2))
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def legend_entries(patch_scales: Sequence[int] | torch.Tensor, num_scales: int, patch_size: int) -> list[tuple]:
    """[(colour, label)]: each scale's patch size and token count, e.g. '28px: 58'."""
    scales = _as_list(patch_scales)
    return [(scale_colour(s), f"{patch_size << s}px: {scales.count(s)}") for s in range(num_scales)]


def add_header(
    panels: Sequence[Image.Image],
    titles: Sequence[str],
    legends: Sequence[Sequence[tuple]] | None = None,
) -> Image.Image:
    """Put panels side by side under a dark band holding each panel's title and (optional) colour legend.

    The width is exactly the sum of the panel widths, so a two-panel comparison is twice one panel.
    """
    if len(panels) != len(titles) or not panels:
        raise ValueError(f"titles: expected one title per panel ({len(panels)}), got {len(titles)}")
    legends = list(legends) if legends is not None else [[] for _ in panels]
    height = max(p.height for p in panels)
    font_size = max(11, min(p.width for p in panels) // 26)
    font = _font(font_size)
    line = int(font_size * 1.5)
    band = line * (1 + int(any(legends))) + font_size // 2
    out = Image.new("RGB", (sum(p.width for p in panels), height + band), BAND_BACKGROUND)
    draw = ImageDraw.Draw(out)
    x = 0
    for panel, title, legend in zip(panels, titles, legends, strict=True):
        out.paste(panel, (x, band))
        pad = font_size // 2
        draw.text((x + pad, pad // 2), title, fill=TEXT_COLOUR, font=font)
        lx = x + pad
        for colour, label in legend:
            y = pad // 2 + line + font_size // 6
            draw.rectangle((lx, y, lx + font_size - 1, y + font_size - 1), fill=colour)
            draw.text((lx + font_size + 3, y - font_size // 8), label, fill=TEXT_COLOUR, font=font)
            lx += font_size + 3 + int(draw.textlength(label, font=font)) + font_size
        x += panel.width
    return out


def side_by_side(
    image: Image.Image,
    layout_scales: Sequence[int] | torch.Tensor,
    layout_positions: Sequence[Sequence[int]] | torch.Tensor,
    patch_size: int,
    num_scales: int,
    *,
    titles: tuple[str, str] | None = None,
    line_width: int = 1,
    upscale: int = 1,
) -> Image.Image:
    """The paper's figure 1: the stock uniform grid (left) beside the APT layout (right), titled with counts."""
    scales = _as_list(layout_scales)
    rows, cols = image.height // patch_size, image.width // patch_size
    uniform_positions = [(r, c) for r in range(rows) for c in range(cols)]
    left = draw_layout(image, [0] * len(uniform_positions), uniform_positions, patch_size,
                       line_width=line_width, upscale=upscale)
    right = draw_layout(image, scales, layout_positions, patch_size, line_width=line_width, upscale=upscale)
    uniform = len(uniform_positions)
    if titles is None:
        titles = (f"uniform {patch_size}px: {uniform} tokens",
                  f"APT: {len(scales)} tokens ({100 * len(scales) / uniform:.0f}%)")
    return add_header([left, right], titles,
                      [legend_entries([0] * uniform, 1, patch_size), legend_entries(scales, num_scales, patch_size)])


def processed_images(batch: Any, image_mean: Sequence[float] | None, image_std: Sequence[float] | None,
                     rescale_factor: float | None = 1 / 255) -> list[Image.Image]:
    """The 8-bit images the model sees, rebuilt from an APT BatchFeature's packed `pixel_values`.

    Reassembling the packed base patches and undoing normalize shows exactly the pixels that were scored,
    so the drawing cannot drift from the processor's resize / crop / pad.
    """
    layout = PatchLayout(*(torch.as_tensor(batch[k]) for k in PatchLayout.KEYS))
    images = unpack_base_patches(torch.as_tensor(batch["pixel_values"]), layout)
    return [Image.fromarray(recover_uint8(img, image_mean, image_std, rescale_factor).permute(1, 2, 0).numpy())
            for img in images]


def split_layout(batch: Any) -> list[tuple[list[int], list[list[int]]]]:
    """Per image: (patch_scales, patch_positions) lists from an APT BatchFeature."""
    counts = _as_list(batch["tokens_per_image"])
    scales = torch.as_tensor(batch["patch_scales"]).split(counts)
    positions = torch.as_tensor(batch["patch_positions"]).split(counts)
    return [(s.tolist(), p.tolist()) for s, p in zip(scales, positions, strict=True)]


# Dark blue -> teal -> yellow, as common perceptual colour maps run from low to high.
HEAT_COLOURS = ((48, 18, 59), (40, 120, 190), (30, 180, 150), (160, 220, 60), (250, 230, 40))


def _heat(values: np.ndarray) -> np.ndarray:
    """uint8 RGB colours of values in [0, 1] on HEAT_COLOURS, linearly between its anchors (vectorised)."""
    anchors = np.asarray(HEAT_COLOURS, dtype=np.float64)
    position = np.clip(values, 0.0, 1.0) * (len(anchors) - 1)
    i = np.minimum(position.astype(int), len(anchors) - 2)
    t = (position - i)[..., None]
    return np.round(anchors[i] + (anchors[i + 1] - anchors[i]) * t).astype(np.uint8)


def entropy_heatmap(image: Image.Image, patch_size: int, bins: int = 512, alpha: float = 0.6) -> Image.Image:
    """The entropy (bits) of every base patch as a colour over the image, the quantity APT thresholds.

    A title band gives the patch size and the range, and a colour bar maps colours to bits.
    """
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
    scores = entropy_scores(pixels, patch_size, [0], bins)[0][0].numpy()  # (rows, cols)
    low, high = float(scores.min()), float(scores.max())
    span = high - low if high > low else 1.0
    rows, cols = scores.shape
    cells = Image.fromarray(_heat((scores - low) / span))  # one pixel per patch, scaled up below
    overlay = Image.new("RGB", image.size)
    overlay.paste(cells.resize((cols * patch_size, rows * patch_size), Image.Resampling.NEAREST))
    blended = Image.blend(image.convert("RGB"), overlay, alpha)
    bar_height = max(12, blended.height // 24)
    ramp = _heat(np.linspace(0.0, 1.0, blended.width))[None].repeat(bar_height, axis=0)
    panel = Image.new("RGB", (blended.width, blended.height + bar_height))
    panel.paste(blended, (0, 0))
    panel.paste(Image.fromarray(ramp), (0, blended.height))
    return add_header([panel], [f"entropy per {patch_size}px patch: {low:.2f} (dark) ... {high:.2f} bits (yellow)"])


def threshold_sweep(images: Sequence[Image.Image], patch_size: int, num_scales: int, thresholds: Sequence[float],
                    offsets: Sequence[float], scorer: str = "entropy", bins: int = 512) -> list[tuple[float, float]]:
    """(first threshold, % of tokens kept) when every threshold is shifted by each offset, over all images.

    The images must already be as the model sees them (same size); for S=2 this sweeps the threshold itself.
    """
    pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
    rows, cols = pixels.shape[-2] // patch_size, pixels.shape[-1] // patch_size
    points = []
    for offset in offsets:
        shifted = [t + offset for t in thresholds]
        layout = compute_layout(pixels, patch_size, num_scales, shifted, scorer, bins)
        points.append((shifted[0], 100 * float(layout.tokens_per_image.sum()) / (len(images) * rows * cols)))
    return points
