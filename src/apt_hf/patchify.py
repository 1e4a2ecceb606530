"""APT patchification: score patches on a quadtree of scales, select sizes, pack tokens.

Pure, batched tensor functions shared by `AptImageProcessor` (CPU) and the models' dense path (any
device). Conventions, those of the APT paper and its official code: scale ``s`` has patch size ``p * 2**s`` on
an aligned quadtree of the base grid; a base cell is covered by the largest scale whose aligned patch scores
below that scale's threshold; tokens are ordered by the raster position of their top-left base cell; a token
of scale ``s`` owns ``4**s`` base patches, kept contiguous and in raster order inside the token.

Layout tensors (one row per token unless said otherwise):
    patch_scales (T,) int64, patch_positions (T, 2) int64 (row, col of the top-left base cell),
    tokens_per_image (B,) int64, image_grid_hw (B, 2) int64 (base-grid rows, cols of each image).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

SCORERS = ("entropy", "laplacian", "upsample_mse")
APT_FIELDS = ("num_scales", "thresholds", "scorer", "entropy_bins")
MAX_ENTROPY_BINS = 65536

# The one table of default thresholds, per (scorer, num_scales): the paper's entropy settings and the official
# code's laplacian / upsample_mse ones. num_scales=1 merges nothing. A default fills a field that is absent (a
# stock model being converted, an argument not given); it never replaces a saved value.
DEFAULT_THRESHOLDS: dict[tuple[str, int], tuple[float, ...]] = {
    ("entropy", 2): (5.5,),
    ("entropy", 3): (5.5, 4.0),
    ("laplacian", 2): (0.087,),
    ("laplacian", 3): (0.035, 0.035),
    ("upsample_mse", 2): (0.000303,),
    ("upsample_mse", 3): (0.000303, 0.000025),
}
# LLaVA-1.5 at 336/14 (paper Table 3) differs from the ViT setting only here.
LLAVA_15_THRESHOLDS: dict[tuple[str, int], tuple[float, ...]] = {("entropy", 2): (5.75,)}


def default_thresholds(num_scales: int, scorer: str = "entropy", llava: bool = False) -> list[float]:
    """The default thresholds for this scorer and number of scales (LLaVA-1.5's where `llava`)."""
    if num_scales == 1:
        return []
    key = (scorer, num_scales)
    value = LLAVA_15_THRESHOLDS.get(key) if llava else None
    value = value if value is not None else DEFAULT_THRESHOLDS.get(key)
    if value is None:
        raise ValueError(
            f"thresholds: no default for scorer={scorer!r} with num_scales={num_scales!r} (defaults exist for "
            f"{sorted(DEFAULT_THRESHOLDS)}); pass num_scales - 1 thresholds"
        )
    return list(value)

# ITU-R 601 luma weights, as the official pipeline applies them (float32) and, for the Laplacian, as exact
# integers over 10_000.
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
_GRAY_WEIGHTS_1E4 = (2989, 5870, 1140)


@dataclass(frozen=True)
class PatchLayout:
    """Where every token of a packed batch sits; see the module docstring for the tensors' meaning.

    The processor returns these four tensors under their field names (`KEYS`), and models take them back as
    keyword arguments: `PatchLayout.from_inputs(kwargs)` and `layout.as_dict()` are the one place they are named.
    """

    patch_scales: torch.Tensor
    patch_positions: torch.Tensor
    tokens_per_image: torch.Tensor
    image_grid_hw: torch.Tensor

    KEYS: ClassVar[tuple[str, ...]] = ("patch_scales", "patch_positions", "tokens_per_image", "image_grid_hw")

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, Any]) -> PatchLayout | None:
        """The layout in `inputs` (e.g. a processor's BatchFeature or forward kwargs); None when it has none."""
        present = [k for k in cls.KEYS if inputs.get(k) is not None]
        if not present:
            return None
        missing = [k for k in cls.KEYS if inputs.get(k) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: packed image keys missing (got {present}); pass every key the "
                             f"processor returns ({', '.join(cls.KEYS)}) or dense pixel_values alone")
        return cls(*(inputs[k] for k in cls.KEYS))

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.KEYS}

    def to(self, device: torch.device | str) -> PatchLayout:
        return PatchLayout(*(t.to(device) for t in self.as_dict().values()))

    @cached_property
    def image_of_token(self) -> torch.Tensor:
        """(T,) index of the image each token belongs to."""
        return segment_ids(self.tokens_per_image, self.patch_scales.shape[0])


def is_exporting() -> bool:
    """Whether torch.export is tracing (then no value may be read on the host)."""
    return bool(getattr(torch.compiler, "is_exporting", lambda: False)())


def segment_ids(counts: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) index of the segment each position falls in, for consecutive segments of `counts` positions.

    `total` (= counts.sum(), known from a shape) spares a host sync. Under torch.export, a comparison against the
    segment ends (O(total * segments), for the few images of an exported batch) that ONNX can express.
    """
    if is_exporting():
        ends = torch.cumsum(counts, 0)
        return (torch.arange(total, device=counts.device)[:, None] >= ends[None, :]).sum(-1)
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)


def true_divide(x: torch.Tensor, divisor: float, inplace: bool = False) -> torch.Tensor:
    """x / divisor (in place when asked), correctly rounded on every device.

    CUDA computes a division by a Python scalar as a multiplication by its reciprocal (one bit off at times, enough
    to move a gray level to another histogram bin); a division by a tensor on the same device is a true division.
    Every division of the scoring path goes through here, so a GPU scores exactly as the CPU and the official code.
    """
    divisor_tensor = torch.tensor([divisor], dtype=x.dtype, device=x.device)
    return x.div_(divisor_tensor) if inplace else x / divisor_tensor


def validate_apt_fields(
    num_scales: int,
    thresholds: Sequence[float] | None,
    scorer: str,
    entropy_bins: int,
    patch_size: int | None = None,
) -> list[float]:
    """Check the APT fields shared by configs and processors; return the thresholds as floats."""
    if not _is_int(num_scales) or num_scales < 1:
        raise ValueError(f"num_scales: expected an int >= 1, got {num_scales!r}")
    if patch_size is not None and (not _is_int(patch_size) or patch_size < 1):
        raise ValueError(f"patch_size: expected an int >= 1, got {patch_size!r}")
    if scorer not in SCORERS:
        raise ValueError(f"scorer: expected one of {SCORERS}, got {scorer!r}")
    if not _is_int(entropy_bins) or not 2 <= entropy_bins <= MAX_ENTROPY_BINS:
        raise ValueError(f"entropy_bins: expected an int from 2 to {MAX_ENTROPY_BINS}, got {entropy_bins!r}")
    if isinstance(thresholds, (str, bytes, numbers.Number)) or (
            thresholds is not None and not isinstance(thresholds, Sequence) and not hasattr(thresholds, "tolist")):
        raise ValueError(f"thresholds: expected a list of num_scales - 1 = {num_scales - 1} numbers, got "
                         f"{thresholds!r} ({type(thresholds).__name__})")
    thresholds = [] if thresholds is None else list(thresholds)
    if len(thresholds) != num_scales - 1:
        raise ValueError(
            f"thresholds: expected num_scales - 1 = {num_scales - 1} values (one per scale >= 1), "
            f"got {len(thresholds)}: {thresholds!r}"
        )
    out = []
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t):
            raise ValueError(f"thresholds: expected finite numbers, got {thresholds!r}")
        out.append(float(t))
    return out


def thresholds_or_default(thresholds: Any, num_scales: Any, scorer: Any, llava: bool = False) -> Any:
    """`thresholds`, or the table's default when absent (and num_scales / scorer are valid, else left to validation)."""
    if thresholds is None and _is_int(num_scales) and num_scales >= 1 and scorer in SCORERS:
        return default_thresholds(num_scales, scorer, llava=llava)
    return thresholds


def replace_apt_settings(target: Any, allowed: Sequence[str], settings: dict[str, Any],
                         validate: Callable[[], None], what: str) -> None:
    """Set `settings` on `target`, then `validate()` them together; an unknown name or an error changes nothing.

    Changing num_scales or scorer without thresholds takes that setting's default thresholds: the old ones belong
    to another scale.
    """
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an APT setting of {what}; expected one of {list(allowed)}")
    settings = dict(settings)
    if "thresholds" not in settings and ({"num_scales", "scorer"} & set(settings)):
        settings["thresholds"] = None
    old = {name: getattr(target, name) for name in allowed}
    for name, value in settings.items():
        setattr(target, name, value)
    try:
        validate()
    except ValueError:
        for name, value in old.items():
            setattr(target, name, value)
        raise


def _is_int(value: object) -> bool:
    """An integer, Python's or numpy's, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_image_size(height: int, width: int, patch_size: int, setting: str = "size / crop_size") -> None:
    """Refuse images whose sides the base patch does not tile, saying which setting to change."""
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"image: expected sides of at least patch_size={patch_size} pixels, got {height}x{width}"
        )
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image: processed sides must be multiples of patch_size={patch_size}, got {height}x{width}; "
            f"change {setting} to a multiple of {patch_size}"
        )


def recover_uint8(
    pixel_values: torch.Tensor,
    image_mean: Sequence[float] | None,
    image_std: Sequence[float] | None,
    rescale_factor: float | None = 1 / 255,
    name: str = "pixel_values",
    check_finite: bool = True,
) -> torch.Tensor:
    """Undo normalize and rescale of (..., C, H, W) pixels and round: the exact 8-bit image they came from.

    Exact because one 8-bit step (1/255 after rescale) is ~1e5 times larger than float32 error.
    """
    if check_finite and not torch.isfinite(pixel_values).all():
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    x = pixel_values.float()
    factor = rescale_factor or 1.0
    channels = x.shape[-3]
    if image_mean is not None and image_std is not None:
        mean = _per_channel(image_mean, channels, "image_mean", x.device)
        std = _per_channel(image_std, channels, "image_std", x.device)
        x = torch.addcmul(true_divide(mean, factor), x, true_divide(std, factor))  # (x * std + mean) / factor
    elif factor != 1.0:
        x = true_divide(x, factor)
    return x.round().clamp_(0, 255).to(torch.uint8)  # not round_: x may be the caller's own float32 tensor


def _per_channel(values: float | Sequence[float], channels: int, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if t.numel() not in (1, channels):
        raise ValueError(f"{name}: expected 1 or {channels} values (one per channel), got {t.numel()}")
    return t.expand(channels).reshape(channels, 1, 1)


def _gray_1e4(images: torch.Tensor) -> torch.Tensor:
    """Integer gray level times 10_000 of (B, 3, H, W) 8-bit images (int32: at most 2_549_745)."""
    x = images.to(torch.int32)
    w = _GRAY_WEIGHTS_1E4
    return w[0] * x[:, 0] + w[1] * x[:, 1] + w[2] * x[:, 2]


@lru_cache(maxsize=8)
def _gray_tables(device: str) -> torch.Tensor:
    """(3, 256) float32: weight_c * v for every 8-bit value v, each a single float32 product.

    The official pipeline computes 0.2989 * R + 0.5870 * G + 0.1140 * B on float32 tensors of integer values;
    gathering these products and adding them in the same order gives the same float32 gray, bit for bit, on any
    device, and leaves no multiply that a compiler could fuse into the adds (a fused multiply-add rounds
    differently).
    """
    values = torch.arange(256, dtype=torch.float32, device=device)
    return torch.stack([values * w for w in _GRAY_WEIGHTS])


def _gray_levels(images: torch.Tensor, bins: int) -> torch.Tensor:
    """The histogram bin of every pixel of (B, 3, H, W) 8-bit images, exactly as the official pipeline bins them.

    That pipeline scores `to_tensor(img) * 255` with `torch.histc(gray, bins, min=0, max=255)` per patch; histc
    puts a float32 value g in bin floor(g * bins / 255) computed in float32 (255 itself in the last bin). Every
    one of the 3.7M float32 gray values of 8-bit RGB lands in the same bin as histc puts it (tests check it).
    Returns (B, H, W) int32.
    """
    # One pass from any memory layout (channels-last from PIL, a crop's strided view) to contiguous planes.
    planes = images.transpose(0, 1)
    if images.device.type == "cpu" and not (is_exporting() or torch.compiler.is_compiling()):
        # Eager CPU ops are one IEEE float32 operation each, so the official products and sums themselves are exact
        # (and cheaper than three table lookups): the processor's path.
        x = planes.to(torch.float32, memory_format=torch.contiguous_format, copy=True).view(3, -1)  # ours to scale
        gray = x[0].mul_(_GRAY_WEIGHTS[0])
        gray += x[1].mul_(_GRAY_WEIGHTS[1])
        gray += x[2].mul_(_GRAY_WEIGHTS[2])
    else:
        tables = _gray_tables(str(images.device))
        index = planes.to(torch.int32, memory_format=torch.contiguous_format).view(3, -1)  # index_select: a fast gather
        gray = tables[0].index_select(0, index[0]) + tables[1].index_select(0, index[1])
        gray += tables[2].index_select(0, index[2])
    # 8-bit gray is at most 0.9999 * 255 < 255, so g * bins / 255 < bins: histc's special case (255 in the last bin)
    # never applies, and truncation (of values >= 0) is the floor.
    level = true_divide(gray.mul_(bins), 255, inplace=True).to(torch.int32)
    return level.view(images.shape[0], *images.shape[2:])


def _full_grid(cells: int, factor: int) -> int:
    """Number of aligned patches of `factor` base cells that lie fully inside `cells` base cells."""
    return cells // factor


def entropy_scores(images: torch.Tensor, patch_size: int, scales: Sequence[int], bins: int) -> dict[int, torch.Tensor]:
    """Shannon entropy (bits) of the gray histogram of every full aligned patch at each requested scale.

    Histograms are counted once at the finest requested scale by bincount, and coarser ones are sums of
    their four children. Returns {s: (B, rows_s, cols_s) float64}.
    """
    if not scales:
        return {}
    b, _, h, w = images.shape
    finest = min(scales)
    cell = patch_size << finest
    rows, cols = _full_grid(h // patch_size, 1 << finest), _full_grid(w // patch_size, 1 << finest)
    if rows == 0 or cols == 0:
        return {s: images.new_zeros((b, _full_grid(h // patch_size, 1 << s), _full_grid(w // patch_size, 1 << s)),
                                    dtype=torch.float64) for s in scales}
    level = _gray_levels(images[:, :, : rows * cell, : cols * cell], bins)
    # One bincount over (image, patch row, patch col, level): the key adds each pixel's histogram offset to its level.
    key_dtype = torch.int32 if b * rows * cols * bins < 2**31 else torch.int64
    key = level.to(key_dtype)
    key += _histogram_offsets(rows, cols, cell, bins, key_dtype, str(images.device))
    if b > 1:
        key += (torch.arange(b, dtype=key_dtype, device=images.device) * (rows * cols * bins)).view(b, 1, 1)
    counts = torch.bincount(key.flatten(), minlength=b * rows * cols * bins)
    counts = counts.view(b, rows, cols, bins)
    out = {}
    for s in range(finest, max(scales) + 1):
        if s > finest:
            r, c = counts.shape[1] // 2, counts.shape[2] // 2
            counts = counts[:, : 2 * r, : 2 * c].view(b, r, 2, c, 2, bins).sum(dim=(2, 4))
        if s in scales:
            plogp = _plogp_table((patch_size << s) ** 2, str(images.device))
            out[s] = true_divide(-plogp.index_select(0, counts.flatten()).view(counts.shape).sum(-1), math.log(2))
    return out


@lru_cache(maxsize=8)
def _histogram_offsets(rows: int, cols: int, cell: int, bins: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(rows * cell, cols * cell): the first bincount key of each pixel's patch histogram (patch index * bins).

    The same for every batch of a size, so built once: scoring then adds it to the levels in one pass.
    """
    ar = partial(torch.arange, dtype=dtype, device=device)
    return (ar(rows * cell) // cell * (cols * bins)).view(-1, 1) + (ar(cols * cell) // cell * bins).view(1, -1)


@lru_cache(maxsize=16)
def _plogp_table(pixels: int, device: str) -> torch.Tensor:
    """q ln q for every possible count (q = count / pixels): a gather instead of a log per histogram bin.

    Entries are exactly xlogy(q, q), so entropies are bit-identical to computing it on the histograms. Computed on
    the CPU and copied, so every device gathers the same table (a GPU's log may differ in the last bit).
    """
    q = torch.arange(pixels + 1, dtype=torch.float64) / torch.tensor([float(pixels)], dtype=torch.float64)
    return torch.special.xlogy(q, q).to(device)


def _sum_full_patches(per_pixel: torch.Tensor, patch_size: int, scale: int) -> torch.Tensor:
    """Sum of a (B, H, W) map over every full aligned patch of scale `scale` (the callers divide: a mean on a GPU
    multiplies by the reciprocal of the count, which `true_divide` avoids)."""
    side = patch_size << scale
    rows, cols = per_pixel.shape[1] // side, per_pixel.shape[2] // side
    cropped = per_pixel[:, : rows * side, : cols * side]
    return cropped.reshape(per_pixel.shape[0], rows, side, cols, side).sum(dim=(2, 4))  # rows/cols may be 0


def laplacian_scores(images: torch.Tensor, patch_size: int, scales: Sequence[int]) -> dict[int, torch.Tensor]:
    """Mean |8-neighbour Laplacian| of gray in [0, 1] (edges reflected, as the official code) over every full aligned
    patch."""
    gray = _gray_1e4(images).to(torch.float64)  # 10_000 * gray in 0..255: integers, so the conv is exact
    kernel = torch.ones(1, 1, 3, 3, dtype=gray.dtype, device=gray.device)
    kernel[0, 0, 1, 1] = -8
    mode = "reflect" if min(gray.shape[-2:]) > 1 else "replicate"  # reflect needs two pixels per side
    lap = F.conv2d(F.pad(gray[:, None], (1, 1, 1, 1), mode=mode), kernel)[:, 0].abs()
    # Integer sums, exact in float64 on any device; one correctly rounded division each (mean, gray in [0, 1]).
    return {s: true_divide(_sum_full_patches(lap, patch_size, s), (patch_size << s) ** 2 * 255 * 10_000)
            for s in scales}


def upsample_mse_scores(images: torch.Tensor, patch_size: int, scales: Sequence[int]) -> dict[int, torch.Tensor]:
    """Mean squared error (RGB in [0, 1]) between the image and its bilinear down-then-up copy at 2**-s."""
    x = true_divide(images.to(torch.float64), 255)
    h, w = x.shape[-2:]
    out = {}
    for s in scales:
        f = 1 << s
        if h < f or w < f:
            out[s] = x.new_zeros((x.shape[0], 0, 0))
            continue
        down = F.interpolate(x, size=(h // f, w // f), mode="bilinear", align_corners=False)
        up = F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)
        squared = _sum_full_patches((x - up).pow(2).sum(1), patch_size, s)
        out[s] = true_divide(squared, x.shape[1] * (patch_size << s) ** 2)  # the mean over channels and pixels
    return out


def score_patches(
    images: torch.Tensor, patch_size: int, scales: Sequence[int], scorer: str = "entropy", entropy_bins: int = 512
) -> dict[int, torch.Tensor]:
    """Score every full aligned patch of each scale in `scales` (all >= 1) of (B, 3, H, W) 8-bit images."""
    if scorer == "entropy":
        return entropy_scores(images, patch_size, scales, entropy_bins)
    if scorer == "laplacian":
        return laplacian_scores(images, patch_size, scales)
    if scorer == "upsample_mse":
        return upsample_mse_scores(images, patch_size, scales)
    raise ValueError(f"scorer: expected one of {SCORERS}, got {scorer!r}")


def select_cell_scales(
    scores: dict[int, torch.Tensor], thresholds: Sequence[float], grid_hw: tuple[int, int]
) -> torch.Tensor:
    """(B, rows, cols) int64: the largest scale whose aligned patch scores below its threshold, else 0."""
    rows, cols = grid_hw
    first = next(iter(scores.values()), None)
    if first is None:
        raise ValueError("select_cell_scales needs at least one scored scale")
    cell_scale = torch.zeros((first.shape[0], rows, cols), dtype=torch.int64, device=first.device)
    for s in sorted(scores):
        merge = scores[s] < thresholds[s - 1]
        f = 1 << s
        merge = merge.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)
        r, c = merge.shape[1:]
        cell_scale[:, :r, :c].masked_fill_(merge, s)
    return cell_scale


def layout_from_cell_scales(cell_scale: torch.Tensor) -> PatchLayout:
    """Pack a (B, rows, cols) map of cell scales into tokens in raster order of their top-left cell."""
    b, rows, cols = cell_scale.shape
    r = torch.arange(rows, device=cell_scale.device).view(1, rows, 1)
    c = torch.arange(cols, device=cell_scale.device).view(1, 1, cols)
    mask = (1 << cell_scale) - 1
    anchor = ((r & mask) == 0) & ((c & mask) == 0)
    idx = anchor.nonzero()  # (T, 3), raster-sorted per image
    grid = torch.tensor([rows, cols], dtype=torch.int64, device=cell_scale.device)
    return PatchLayout(
        patch_scales=cell_scale[idx[:, 0], idx[:, 1], idx[:, 2]],
        patch_positions=idx[:, 1:].contiguous(),
        tokens_per_image=torch.bincount(idx[:, 0], minlength=b),
        image_grid_hw=grid.expand(b, 2).contiguous(),
    )


def uniform_layout(batch_size: int, rows: int, cols: int, device: torch.device | str = "cpu") -> PatchLayout:
    """The stock ViT layout: every token of scale 0, raster order."""
    return layout_from_cell_scales(torch.zeros((batch_size, rows, cols), dtype=torch.int64, device=device))


def compute_layout(
    images: torch.Tensor,
    patch_size: int,
    num_scales: int,
    thresholds: Sequence[float],
    scorer: str = "entropy",
    entropy_bins: int = 512,
) -> PatchLayout:
    """APT layout of a batch of same-size (B, 3, H, W) 8-bit images (uint8 or integer-valued).

    Single-channel (B, 1, H, W) images are scored as the RGB image with R = G = B: the layout the official
    pipeline gives a greyscale photo, which it converts to RGB before scoring.
    """
    thresholds = validate_apt_fields(num_scales, thresholds, scorer, entropy_bins, patch_size)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (batch, 3, height, width) RGB or (batch, 1, height, width) greyscale "
                         f"images, got shape {tuple(images.shape)}")
    images = images.expand(-1, 3, -1, -1)  # a view; greyscale as R = G = B
    if images.dtype != torch.uint8 and images.numel() and (images.min() < 0 or images.max() > 255):
        raise ValueError(f"images: expected 8-bit values 0..255, got range [{images.min()}, {images.max()}]")
    h, w = images.shape[-2:]
    validate_image_size(h, w, patch_size)
    rows, cols = h // patch_size, w // patch_size
    # Scores are >= 0, so a threshold <= 0 can never merge: skip scoring those scales.
    active = [s for s in range(1, num_scales) if thresholds[s - 1] > 0 and (1 << s) <= min(rows, cols)]
    if not active:
        return uniform_layout(images.shape[0], rows, cols, images.device)
    scores = score_patches(images, patch_size, active, scorer, entropy_bins)
    return layout_from_cell_scales(select_cell_scales(scores, thresholds, (rows, cols)))


def concat_layouts(layouts: Sequence[PatchLayout]) -> PatchLayout:
    """Stack the layouts of consecutive image groups into one batch layout."""
    return PatchLayout(*(torch.cat([getattr(lay, k) for lay in layouts]) for k in PatchLayout.KEYS))


def base_patch_index(layout: PatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """For every base patch in token order: its flat index in the concatenated image grids, and its token.

    Image i's grid occupies [offset_i, offset_i + rows_i * cols_i) in raster order. A token of scale s
    expands to its 4**s cells in raster order inside the token.
    """
    scales, pos = layout.patch_scales, layout.patch_positions
    device = scales.device
    grid_cells = layout.image_grid_hw.prod(-1)
    offsets = torch.cumsum(grid_cells, 0) - grid_cells
    image_of_token = layout.image_of_token
    cells_per_token = 1 << (2 * scales)
    token = torch.repeat_interleave(torch.arange(len(scales), device=device), cells_per_token)
    first = torch.cumsum(cells_per_token, 0) - cells_per_token
    k = torch.arange(len(token), device=device) - first[token]
    s = scales[token]
    row = pos[token, 0] + (k >> s)
    col = pos[token, 1] + (k & ((1 << s) - 1))
    img = image_of_token[token]
    return offsets[img] + row * layout.image_grid_hw[img, 1] + col, token


def crop_to_patch_grid(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(..., H, W) images -> the top-left (H // p * p, W // p * p) region (a view): what a stock p x p convolution at
    stride p sees, trailing pixels of a side dropped (e.g. SigLIP's 384 px at patch 14: 378 px, 27 x 27 patches)."""
    h, w = images.shape[-2:]
    return images[..., : h - h % patch_size, : w - w % patch_size]


def pack_base_patches(images: torch.Tensor, layout: PatchLayout, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) same-size images -> (sum of base cells, C, p, p) base patches in token order, contiguous."""
    return gather_base_patches(images, layout, patch_size).contiguous()


def gather_base_patches(images: torch.Tensor, layout: PatchLayout, patch_size: int) -> torch.Tensor:
    """`pack_base_patches` as one gather, left in the images' memory order: a (N, C, p, p) view, channels-last where
    the images are (PIL's numpy, the torchvision processor's), so that a caller converting it anyway (to float, to
    normalize) reorders it in that same pass.

    Every base patch is p rows of p pixels: of p * C interleaved values in channels-last memory, of p values per
    channel otherwise. An overlapping view whose row k starts at element k lets index_select read each row where it
    lies (in a crop's view too), with no copy of the image in patch order.
    """
    b, ch, h, w = images.shape
    p = patch_size
    channels_last = ch > 1 and images.stride(1) == 1 and images.stride(3) == ch
    if not channels_last and images.stride(-1) != 1:  # rows of p pixels must be contiguous to gather
        images = images.contiguous()
    rows, cols = h // p, w // p
    sb, sc, sh, sw = images.stride()
    cell = base_patch_index(layout)[0]
    image, rest = cell.div(rows * cols, rounding_mode="floor"), cell.remainder(rows * cols)
    start = image * sb + rest.div(cols, rounding_mode="floor") * (p * sh) + rest.remainder(cols) * (p * sw)
    device = images.device
    last = (b - 1) * sb + (h - 1) * sh + (w - p) * sw  # where the image's last row of pixels starts (channel 0)
    if channels_last:
        starts = start.view(-1, 1) + torch.arange(p, device=device) * sh  # (N, p) rows of p * C values
        row_view = images.as_strided((last + 1, p * ch), (1, 1))
        return row_view.index_select(0, starts.flatten()).view(-1, p, p, ch).permute(0, 3, 1, 2)
    within = (torch.arange(ch, device=device) * sc).view(ch, 1) + torch.arange(p, device=device) * sh  # (C, p)
    row_view = images.as_strided((last + (ch - 1) * sc + 1, p), (1, 1))
    return row_view.index_select(0, (start.view(-1, 1, 1) + within).flatten()).view(-1, ch, p, p)


def unpack_base_patches(pixel_values: torch.Tensor, layout: PatchLayout) -> list[torch.Tensor]:
    """Inverse of `pack_base_patches`: the (C, H, W) image of every entry of the layout."""
    ch, p = pixel_values.shape[1], pixel_values.shape[-1]
    index, _ = base_patch_index(layout)
    cells = torch.empty_like(pixel_values)
    cells[index] = pixel_values
    images = []
    for (rows, cols), chunk in zip(layout.image_grid_hw.tolist(),
                                   cells.split(layout.image_grid_hw.prod(-1).tolist()), strict=True):
        images.append(chunk.view(rows, cols, ch, p, p).permute(2, 0, 3, 1, 4).reshape(ch, rows * p, cols * p))
    return images


def validate_layout(
    layout: PatchLayout, num_scales: int, num_base_patches: int | None = None
) -> None:
    """Refuse packed keys that do not describe a tiling: inconsistent counts, off-grid or bad scales."""
    scales, pos = layout.patch_scales, layout.patch_positions
    tpi, grid = layout.tokens_per_image, layout.image_grid_hw
    t = scales.shape[0]
    if scales.ndim != 1 or pos.shape != (t, 2):
        raise ValueError(
            f"patch_positions: expected shape ({t}, 2) to match patch_scales ({t},), got {tuple(pos.shape)}"
        )
    if tpi.ndim != 1 or grid.shape != (tpi.shape[0], 2):
        raise ValueError(
            f"image_grid_hw: expected shape ({tpi.shape[0]}, 2) to match tokens_per_image, got {tuple(grid.shape)}"
        )
    for name, value in (("patch_scales", scales), ("patch_positions", pos), ("tokens_per_image", tpi),
                        ("image_grid_hw", grid)):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer tensor, got dtype {value.dtype}")
    if (tpi < 0).any():
        raise ValueError(f"tokens_per_image: expected counts >= 0, got {tpi.tolist()}")
    if int(tpi.sum()) != t:
        raise ValueError(f"tokens_per_image: expected to sum to the {t} tokens of patch_scales, got {int(tpi.sum())}")
    if t and (int(scales.min()) < 0 or int(scales.max()) >= num_scales):
        raise ValueError(
            f"patch_scales: expected values in [0, {num_scales - 1}] (num_scales={num_scales}), "
            f"got range [{int(scales.min())}, {int(scales.max())}]"
        )
    if t == 0:
        return
    img = layout.image_of_token
    side = 1 << scales
    if (pos < 0).any() or ((pos + side[:, None]) > grid[img]).any() or ((pos % side[:, None]) != 0).any():
        raise ValueError("patch_positions: expected every token to lie on its image grid, aligned to its scale")
    cells = int((side * side).sum())
    if cells != int(grid.prod(-1).sum()) or base_patch_index(layout)[0].unique().numel() != cells:
        raise ValueError(
            f"patch_scales / patch_positions: tokens must tile every image grid exactly once "
            f"({int(grid.prod(-1).sum())} base cells), but they cover {cells} cells with overlaps or gaps"
        )
    raster = pos[:, 0] * grid[img, 1] + pos[:, 1]
    if ((raster[1:] <= raster[:-1]) & (img[1:] == img[:-1])).any():
        raise ValueError("patch_positions: expected tokens in raster order of their top-left cell within each image")
    if num_base_patches is not None and num_base_patches != cells:
        raise ValueError(
            f"pixel_values: expected {cells} base patches (4**scale per token), got {num_base_patches}"
        )


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(start, start + length) for each pair, vectorised."""
    first = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(int(lengths.sum()), device=lengths.device) - torch.repeat_interleave(first, lengths)
    return torch.repeat_interleave(starts, lengths) + within


def select_images(
    pixel_values: torch.Tensor, layout: PatchLayout, index: torch.Tensor
) -> tuple[torch.Tensor, PatchLayout]:
    """Take images `index` (any order, repeats allowed) of a packed batch, e.g. to expand it for beam search."""
    index = torch.as_tensor(index, dtype=torch.int64, device=layout.tokens_per_image.device)
    tokens = layout.tokens_per_image
    cells_per_token = 1 << (2 * layout.patch_scales)
    cells = torch.zeros_like(tokens).index_add_(0, layout.image_of_token, cells_per_token)
    token_index = _ranges((torch.cumsum(tokens, 0) - tokens)[index], tokens[index])
    cell_index = _ranges((torch.cumsum(cells, 0) - cells)[index], cells[index])
    picked = PatchLayout(layout.patch_scales[token_index], layout.patch_positions[token_index], tokens[index],
                         layout.image_grid_hw[index])
    return pixel_values[cell_index.to(pixel_values.device)], picked


def select_image_inputs(inputs: Mapping[str, Any], index: torch.Tensor,
                        tiles_per_image: torch.Tensor | None = None) -> dict[str, Any]:
    """A processor's image keys for images `index` (any order, repeats allowed), as it returns them for those
    images alone: the packed keys through `select_images`, every other tensor (e.g. `image_sizes`) by its rows.

    An anyres image (LLaVA-NeXT / OneVision) is several tiles, each packed as an image of its own:
    `tiles_per_image` (one count per image) moves an image's tiles together. Without it, one tile per image.
    OneVision's `batch_num_images` (images per prompt) is selectable only as it comes from a flat list of images
    (one image per entry), which is how training and evaluation call the processor.
    """
    inputs = dict(inputs)
    per_prompt = inputs.pop("batch_num_images", None)
    if per_prompt is not None and any(int(n) != 1 for n in per_prompt):
        raise ValueError(f"batch_num_images: images can be selected from a flat list of images (all ones), got "
                         f"{list(per_prompt)}; process the images as a flat list")
    layout = PatchLayout.from_inputs(inputs)
    if tiles_per_image is None and layout is not None:
        tiles_per_image = torch.ones_like(layout.tokens_per_image)
    index = torch.as_tensor(index, dtype=torch.int64)
    taken: dict[str, Any] = {}
    if layout is not None:
        tiles = torch.as_tensor(tiles_per_image, dtype=torch.int64, device=layout.tokens_per_image.device)
        if int(tiles.sum()) != len(layout.tokens_per_image):
            raise ValueError(f"tiles_per_image: expected counts that add up to the {len(layout.tokens_per_image)} "
                             f"packed tiles, got {tiles.tolist()}")
        tile_index = _ranges((torch.cumsum(tiles, 0) - tiles)[index.to(tiles.device)], tiles[index.to(tiles.device)])
        pixel_values, picked = select_images(inputs["pixel_values"], layout, tile_index)
        taken = {"pixel_values": pixel_values, **picked.as_dict()}
    num_images = None if tiles_per_image is None else len(tiles_per_image)
    for key, value in inputs.items():
        if key in taken:
            continue
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or (
                num_images is not None and value.shape[0] != num_images):
            raise ValueError(f"processor output {key!r}: expected one entry per image"
                             f"{'' if num_images is None else f' ({num_images})'} to select images, got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
        taken[key] = value[index.to(value.device)]
    if per_prompt is not None:
        ones = [1] * len(index)
        taken["batch_num_images"] = torch.tensor(ones) if isinstance(per_prompt, torch.Tensor) else ones
    return taken
