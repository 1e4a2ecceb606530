"""apt_hf.patchify against a brute-force reference written here from DESIGN §1 with plain Python loops.

The reference bins entropy histograms as the official APT pipeline does (float32 gray of `to_tensor(img) * 255`,
`torch.histc(bins, min=0, max=255)` per patch), scores the Laplacian in exact integer / rational arithmetic and
follows PyTorch's documented bilinear rule for upsample_mse; it enumerates
tokens by scanning base cells in raster order, which is a different formulation from the vectorised
code under test. Scores that fall within 1e-9 of a threshold are ties whose outcome depends on the last
float bit; property tests skip those examples and fixed tests assert they have none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image as Image_
from torch.overrides import TorchFunctionMode
from transformers import CLIPImageProcessorPil

from apt_hf.image_processing_apt import AptImageProcessorPil
from apt_hf.patchify import (
    SCORERS,
    PatchLayout,
    _gray_levels,
    compute_layout,
    concat_layouts,
    crop_to_patch_grid,
    entropy_scores,
    gather_base_patches,
    laplacian_scores,
    pack_base_patches,
    recover_uint8,
    score_patches,
    select_image_inputs,
    select_images,
    uniform_layout,
    unpack_base_patches,
    upsample_mse_scores,
    validate_layout,
)
from apt_hf.sample_images import load_photos

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TIE = 1e-9

Image = list[list[list[int]]]  # [channel][row][col], 8-bit values
Token = tuple[int, int, int]  # (scale, row, col) of the top-left base cell


# ----------------------------------------------------------------------------------------------------------
# Brute-force reference (DESIGN §1), plain loops
# ----------------------------------------------------------------------------------------------------------


def ref_gray_1e4(img: Image, r: int, c: int) -> int:
    """10_000 * gray, an exact integer: gray = 0.2989 R + 0.5870 G + 0.1140 B."""
    return 2989 * img[0][r][c] + 5870 * img[1][r][c] + 1140 * img[2][r][c]


def official_gray(img: Image) -> torch.Tensor:
    """(H, W) float32 gray as the official pipeline computes it: to_tensor(img) * 255, then the luma weights."""
    x = torch.tensor(img, dtype=torch.uint8).float() / 255 * 255
    return 0.2989 * x[0] + 0.5870 * x[1] + 0.1140 * x[2]


def patch_means(values: list[list], p: int, s: int, denominator: int = 1) -> dict[tuple[int, int], float]:
    """Mean of a per-pixel map over every full aligned patch of scale s (exact rational for integer maps)."""
    h, w = len(values), len(values[0])
    side = p * 2**s
    out = {}
    for i in range(h // side):
        for j in range(w // side):
            total = sum(values[r][c] for r in range(i * side, (i + 1) * side) for c in range(j * side, (j + 1) * side))
            n = side * side * denominator
            out[i, j] = float(Fraction(total, n)) if isinstance(total, int) else total / n
    return out


def ref_entropy_scores(img: Image, p: int, scales: Sequence[int], bins: int) -> dict[int, dict]:
    """H = -sum q log2 q of `torch.histc` of every full aligned patch's gray values (one histc call per patch)."""
    h, w = len(img[0]), len(img[0][0])
    gray = official_gray(img)
    out = {}
    for s in scales:
        side = p * 2**s
        out[s] = {}
        for i in range(h // side):
            for j in range(w // side):
                counts = torch.histc(gray[i * side:(i + 1) * side, j * side:(j + 1) * side], bins=bins, min=0, max=255)
                n = side * side
                out[s][i, j] = -sum(k / n * math.log2(k / n) for k in counts.tolist() if k)
    return out


def reflect(i: int, n: int) -> int:
    """Index i reflected into [0, n) without repeating the edge (torch's "reflect"; "replicate" when n == 1)."""
    if n == 1:
        return 0
    return -i if i < 0 else 2 * (n - 1) - i if i >= n else i


def ref_laplacian_scores(img: Image, p: int, scales: Sequence[int]) -> dict[int, dict]:
    """Mean |3x3 8-neighbour Laplacian (all ones, -8 centre)| of gray/255, edges reflected, in exact integers."""
    h, w = len(img[0]), len(img[0][0])
    gray = [[ref_gray_1e4(img, r, c) for c in range(w)] for r in range(h)]  # units of 1 / (255 * 10_000)
    lap = [[0] * w for _ in range(h)]
    for r in range(h):
        for c in range(w):
            total = 0
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if dr or dc:
                        total += gray[reflect(r + dr, h)][reflect(c + dc, w)]
            lap[r][c] = abs(total - 8 * gray[r][c])
    return {s: patch_means(lap, p, s, 255 * 10_000) for s in scales}


def ref_bilinear(plane: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Bilinear resize, align_corners=False, no antialias (PyTorch's rule: src = (dst + 0.5) * in/out - 0.5)."""
    in_h, in_w = len(plane), len(plane[0])

    def taps(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        src = max((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = int(src)
        return i0, min(i0 + 1, n_in - 1), src - i0

    out = [[0.0] * out_w for _ in range(out_h)]
    for y in range(out_h):
        y0, y1, ly = taps(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, lx = taps(x, in_w, out_w)
            out[y][x] = ((1 - ly) * ((1 - lx) * plane[y0][x0] + lx * plane[y0][x1])
                         + ly * ((1 - lx) * plane[y1][x0] + lx * plane[y1][x1]))
    return out


def ref_upsample_mse_scores(img: Image, p: int, scales: Sequence[int]) -> dict[int, dict]:
    """Mean over RGB in [0, 1] and pixels of (image - up(down(image, 2**-s)))**2 per full aligned patch."""
    h, w = len(img[0]), len(img[0][0])
    out = {}
    for s in scales:
        f = 2**s
        if h < f or w < f:
            out[s] = {}
            continue
        sq = [[0.0] * w for _ in range(h)]
        for ch in range(3):
            plane = [[v / 255 for v in row] for row in img[ch]]
            up = ref_bilinear(ref_bilinear(plane, h // f, w // f), h, w)
            for r in range(h):
                for c in range(w):
                    sq[r][c] += (plane[r][c] - up[r][c]) ** 2
        out[s] = patch_means(sq, p, s, 3)
    return out


def ref_scores(img: Image, p: int, scales: Sequence[int], scorer: str, bins: int) -> dict[int, dict]:
    """{scale: {(patch row, patch col): score}} for every full aligned patch."""
    if scorer == "entropy":
        return ref_entropy_scores(img, p, scales, bins)
    if scorer == "laplacian":
        return ref_laplacian_scores(img, p, scales)
    return ref_upsample_mse_scores(img, p, scales)


def ref_layout(
    img: Image, p: int, num_scales: int, thresholds: Sequence[float], scorer: str = "entropy", bins: int = 512,
    scores: dict[int, dict] | None = None,
) -> tuple[list[Token], float]:
    """Tokens (raster order of their top-left cell) and the smallest |score - threshold| seen."""
    h, w = len(img[0]), len(img[0][0])
    rows, cols = h // p, w // p
    if scores is None:
        scores = ref_scores(img, p, range(1, num_scales), scorer, bins)
    margin = min((abs(v - thresholds[s - 1]) for s in scores for v in scores[s].values()), default=math.inf)

    def cell_scale(r: int, c: int) -> int:
        best = 0
        for s in range(1, num_scales):
            # a patch that does not lie fully inside the image scores +inf
            if scores[s].get((r >> s, c >> s), math.inf) < thresholds[s - 1]:
                best = s
        return best

    covered = [[False] * cols for _ in range(rows)]
    tokens = []
    for r in range(rows):
        for c in range(cols):
            if covered[r][c]:
                continue
            s = cell_scale(r, c)
            # the first uncovered cell of a token in raster order must be its aligned top-left cell
            assert (r % 2**s, c % 2**s) == (0, 0), "reference: quadtree inconsistency"
            for rr in range(r, r + 2**s):
                for cc in range(c, c + 2**s):
                    assert not covered[rr][cc], "reference: overlap"
                    covered[rr][cc] = True
            tokens.append((s, r, c))
    return tokens, margin


def ref_batch_layout(
    images: torch.Tensor, p: int, num_scales: int, thresholds: Sequence[float], scorer: str = "entropy",
    bins: int = 512, scores: list[dict[int, dict]] | None = None,
) -> tuple[PatchLayout, float]:
    tokens, counts, margin = [], [], math.inf
    for i, img in enumerate(images.cpu().tolist()):
        t, m = ref_layout(img, p, num_scales, thresholds, scorer, bins, None if scores is None else scores[i])
        tokens += t
        counts.append(len(t))
        margin = min(margin, m)
    h, w = images.shape[-2:]
    layout = PatchLayout(
        patch_scales=torch.tensor([t[0] for t in tokens], dtype=torch.int64),
        patch_positions=torch.tensor([t[1:] for t in tokens], dtype=torch.int64).view(-1, 2),
        tokens_per_image=torch.tensor(counts, dtype=torch.int64),
        image_grid_hw=torch.tensor([[h // p, w // p]] * len(images), dtype=torch.int64),
    )
    return layout, margin


def assert_layout_equal(got: PatchLayout, want: PatchLayout) -> None:
    for name in ("patch_scales", "patch_positions", "tokens_per_image", "image_grid_hw"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == torch.int64, name
        assert torch.equal(g.cpu(), w), f"{name}: got {g.tolist()}, want {w.tolist()}"


def check_tiling(layout: PatchLayout) -> None:
    """Tokens tile every grid exactly once, keys agree, raster order, aligned, validate_layout passes."""
    scales, pos = layout.patch_scales.cpu(), layout.patch_positions.cpu()
    tpi, grid = layout.tokens_per_image.cpu(), layout.image_grid_hw.cpu()
    assert scales.shape == (int(tpi.sum()),) and pos.shape == (len(scales), 2) and grid.shape == (len(tpi), 2)
    start = 0
    for n, (rows, cols) in zip(tpi.tolist(), grid.tolist(), strict=True):
        cover = [[0] * cols for _ in range(rows)]
        flat = []
        for s, (r, c) in zip(scales[start:start + n].tolist(), pos[start:start + n].tolist(), strict=True):
            assert r % 2**s == 0 and c % 2**s == 0, "token not aligned to its scale"
            for rr in range(r, r + 2**s):
                for cc in range(c, c + 2**s):
                    cover[rr][cc] += 1
            flat.append(r * cols + c)
        assert all(v == 1 for row in cover for v in row), "tokens must cover every base cell exactly once"
        assert all(a < b for a, b in zip(flat, flat[1:], strict=False)), "tokens must be in raster order"
        start += n
    validate_layout(layout, int(scales.max()) + 1 if len(scales) else 1, int((4 ** scales).sum()))


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


def make_image(h: int, w: int, seed: int, levels: int = 256, block: int = 1, batch: int = 1) -> torch.Tensor:
    """(batch, 3, h, w) uint8: `block`-pixel squares of colours drawn from a palette of `levels` colours."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.randint(0, 256, (levels, 3), generator=g, dtype=torch.int64)
    idx = torch.randint(0, levels, (batch, -(-h // block), -(-w // block)), generator=g)
    idx = idx.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w]
    return palette[idx].permute(0, 3, 1, 2).to(torch.uint8).contiguous()


def checkerboard(h: int, w: int, period: int = 1, lo: int = 0, hi: int = 255) -> torch.Tensor:
    r = torch.arange(h).view(-1, 1) // period
    c = torch.arange(w).view(1, -1) // period
    board = torch.where((r + c) % 2 == 1, hi, lo).to(torch.uint8)
    return board.expand(1, 3, h, w).contiguous()


def structured_images(h: int, w: int) -> dict[str, torch.Tensor]:
    """Flat, smooth, blocky and noisy content, each a (1, 3, h, w) uint8 image."""
    r = torch.arange(h).view(-1, 1).expand(h, w)
    c = torch.arange(w).view(1, -1).expand(h, w)
    ramp = torch.stack([(r * 255) // max(h - 1, 1), (c * 255) // max(w - 1, 1), ((r + c) * 7) % 256])
    half = make_image(h, w, 7)
    half[..., : w // 2] = 128
    return {
        "flat": torch.full((1, 3, h, w), 77, dtype=torch.uint8),
        "ramp": ramp.to(torch.uint8)[None],
        "checker1": checkerboard(h, w, 1),
        "checker4": checkerboard(h, w, 4, 30, 200),
        "checker8": checkerboard(h, w, 8),
        "blocks": make_image(h, w, 1, levels=6, block=4),
        "blocks_fine": make_image(h, w, 2, levels=3, block=2),
        "noise": make_image(h, w, 3),
        "palette4": make_image(h, w, 4, levels=4),
        "half_flat": half,
    }


# Thresholds per scorer for S = 2, 3, 4 (scale 1, 2, 3), chosen away from the scores of the images above.
THRESHOLDS = {
    "entropy": [[2.3], [2.3, 1.7], [4.1, 2.6, 1.3]],
    "laplacian": [[0.31], [0.31, 0.17], [0.9, 0.31, 0.11]],
    "upsample_mse": [[0.017], [0.017, 0.009], [0.061, 0.023, 0.0031]],
}


# ----------------------------------------------------------------------------------------------------------
# Reference comparison
# ----------------------------------------------------------------------------------------------------------


def all_colours() -> torch.Tensor:
    """All 2**24 8-bit RGB colours in one (1, 3, 4096, 4096) image."""
    v = torch.arange(256, dtype=torch.uint8)
    return torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(1, 3, 4096, 4096)


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_bins_equal_torch_histc_for_every_8bit_colour(device: str) -> None:
    """All 2**24 RGB colours: every 64 x 64 patch's histogram equals torch.histc's on the official gray levels
    (integers, exactly), and its entropy the entropy of that histogram (floats, at float64 tolerance)."""
    rgb = all_colours()
    p = 64
    levels = _gray_levels(rgb.to(device), 512).cpu()[0]
    patches_of_levels = levels.unfold(0, p, p).unfold(1, p, p).reshape(-1, p * p).long()
    offsets = torch.arange(patches_of_levels.shape[0])[:, None] * 512
    got_counts = torch.bincount((patches_of_levels + offsets).flatten(), minlength=offsets.numel() * 512)
    gray = official_gray(rgb[0])
    patches = gray.unfold(0, p, p).unfold(1, p, p).reshape(-1, p * p)
    counts = torch.stack([torch.histc(patch, bins=512, min=0, max=255) for patch in patches])
    assert torch.equal(got_counts.view(-1, 512), counts.long())
    q = counts.double() / (p * p)
    want = -torch.special.xlogy(q, q).sum(-1) / math.log(2)
    got = entropy_scores(rgb.to(device), p, [0], 512)[0][0].cpu()
    torch.testing.assert_close(got.flatten(), want, rtol=1e-12, atol=1e-12)
    # the official binning (/255) differs from floor(gray * bins / 256): this test tells them apart
    assert not torch.equal(torch.floor(gray * 512 / 256).clamp(max=511), torch.floor(gray * 512 / 255).clamp(max=511))


class ScalarDivisions(TorchFunctionMode):
    """Counts divisions by a Python number and means (both computed on CUDA as a multiplication by a reciprocal);
    with `emulate`, computes those divisions that way, as a GPU would, on the CPU."""

    DIVISIONS = {torch.div, torch.true_divide, torch.Tensor.div, torch.Tensor.div_, torch.Tensor.true_divide,
                 torch.Tensor.__truediv__, torch.Tensor.__itruediv__}
    MEANS = {torch.mean, torch.Tensor.mean}

    def __init__(self, emulate: bool = False) -> None:
        super().__init__()
        self.emulate, self.count = emulate, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        scalar = func in self.DIVISIONS and isinstance(args[1], (int, float)) and kwargs.get("rounding_mode") is None
        if scalar or func in self.MEANS:
            self.count += 1
        if scalar and self.emulate and args[0].is_floating_point():
            one = torch.ones(1, dtype=args[0].dtype)
            reciprocal = one / torch.tensor([float(args[1])], dtype=args[0].dtype)  # correctly rounded, as CUDA's
            inplace = func in (torch.Tensor.div_, torch.Tensor.__itruediv__)
            return args[0].mul_(reciprocal) if inplace else args[0] * reciprocal
        return func(*args, **kwargs)


def test_the_emulated_gpu_division_moves_gray_levels() -> None:
    """The emulation is faithful: dividing the official gray levels by the scalar 255 as CUDA does (reciprocal
    multiplication) moves some of the 2**24 colours to another bin, the defect the scoring path must not have."""
    gray = official_gray(all_colours()[0]) * 512
    true_bins = torch.floor(gray / torch.tensor([255.0]))
    with ScalarDivisions(emulate=True) as mode:
        gpu_bins = torch.floor(gray / 255)
    assert mode.count == 1 and int((gpu_bins != true_bins).sum()) > 100


def test_scoring_has_no_division_a_gpu_would_round_differently() -> None:
    """Every scorer and the dense path's 8-bit recovery divide by tensors only: with the emulated GPU division the
    bins of every colour and the layouts are unchanged, and no division by a Python number or mean is left."""
    rgb = all_colours()
    want = _gray_levels(rgb, 512)
    with ScalarDivisions(emulate=True) as mode:
        got = _gray_levels(rgb, 512)
    assert torch.equal(got, want) and mode.count == 0
    photos = torch.stack([torch.from_numpy(np.asarray(photo.resize((256, 256)))).permute(2, 0, 1) for photo in
                          load_photos(("astronaut.png", "camera.png", "hubble_deep_field.jpg")).values()])
    normalized = (photos.float() / 255 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    for scorer, thresholds in (("entropy", [5.5, 4.0]), ("laplacian", [0.035, 0.035]),
                               ("upsample_mse", [0.000303, 0.000025])):
        want = compute_layout(photos, 16, 3, thresholds, scorer)
        with ScalarDivisions(emulate=True) as mode:
            got = compute_layout(photos, 16, 3, thresholds, scorer)
            recovered = recover_uint8(normalized, CLIP_MEAN, CLIP_STD)
        assert mode.count == 0, scorer
        assert_layout_equal(got, want)
        assert torch.equal(recovered, photos)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scorer", SCORERS)
def test_scores_match_reference(scorer: str, device: str) -> None:
    p = 4
    for h, w in ((16, 24), (32, 32), (28, 20)):
        for name, img in structured_images(h, w).items():
            got = score_patches(img.to(device), p, [1, 2, 3], scorer, 512)
            ref = ref_scores(img[0].tolist(), p, [1, 2, 3], scorer, 512)
            for s in (1, 2, 3):
                want = ref[s]
                rows, cols = h // (p << s), w // (p << s)
                assert got[s].shape == (1, rows, cols), (name, s)
                expect = torch.tensor([[want[i, j] for j in range(cols)] for i in range(rows)], dtype=torch.float64)
                torch.testing.assert_close(got[s][0].cpu().double(), expect.view(rows, cols), rtol=1e-12, atol=1e-12,
                                           msg=f"{scorer} {name} {h}x{w} scale {s}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("num_scales", [2, 3, 4])
def test_layout_matches_reference_structured(num_scales: int, scorer: str, device: str) -> None:
    p = 4
    thresholds = THRESHOLDS[scorer][num_scales - 2]
    merged = 0
    for h, w in ((16, 24), (32, 32), (28, 20)):
        images = structured_images(h, w)
        batch = torch.cat(list(images.values()))
        got = compute_layout(batch.to(device), p, num_scales, thresholds, scorer, 512)
        want, margin = ref_batch_layout(batch, p, num_scales, thresholds, scorer, 512)
        assert margin > TIE, "test thresholds must not tie with a score"
        assert_layout_equal(got, want)
        check_tiling(got)
        merged += int((got.patch_scales > 0).sum())
    assert merged > 0, "the structured images should exercise merging"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_scales", [2, 3, 4])
def test_layout_matches_reference_random(num_scales: int, device: str) -> None:
    p = 4
    for (h, w), levels, block in (((16, 24), 2, 1), ((32, 32), 5, 2), ((28, 20), 3, 4), ((32, 32), 256, 1)):
        batch = make_image(h, w, seed=h * w + levels, levels=levels, block=block, batch=3)
        for thresholds in ([0.95, 0.8, 0.6][: num_scales - 1], [3.3, 2.2, 1.4][: num_scales - 1],
                           [5.9, 5.0, 4.5][: num_scales - 1]):
            want, margin = ref_batch_layout(batch, p, num_scales, thresholds)
            assert margin > TIE
            assert_layout_equal(compute_layout(batch.to(device), p, num_scales, thresholds), want)


@pytest.mark.parametrize(("side", "p", "num_scales", "thresholds"), [
    (336, 14, 2, [5.75]),  # LLaVA-1.5
    (224, 16, 2, [5.5]),  # ViT-B/16-224
    (384, 16, 3, [5.5, 4.0]),  # the paper's 3-scale setting
])
def test_layouts_on_photographs_equal_the_official_pipeline(side: int, p: int, num_scales: int,
                                                            thresholds: list[float]) -> None:
    """The ten bundled photos, resized as the model sees them: layouts equal histc-per-patch selection."""
    photos = [photo.resize((side, side), Image_.BICUBIC) for photo in load_photos().values()]
    images = torch.stack([torch.from_numpy(np.asarray(photo)).permute(2, 0, 1) for photo in photos])
    got = compute_layout(images, p, num_scales, thresholds)
    want, _ = ref_batch_layout(images, p, num_scales, thresholds)
    assert_layout_equal(got, want)
    assert int(got.tokens_per_image.sum()) < len(photos) * (side // p) ** 2  # something merged


def test_entropy_bins_change_the_layout_as_the_reference_says() -> None:
    img = make_image(32, 32, seed=11, levels=256, block=1)
    for bins in (2, 16, 100, 512):
        want, margin = ref_batch_layout(img, 4, 3, [2.5, 3.9], "entropy", bins)
        assert margin > TIE
        assert_layout_equal(compute_layout(img, 4, 3, [2.5, 3.9], "entropy", bins), want)


# ----------------------------------------------------------------------------------------------------------
# Selection behaviour
# ----------------------------------------------------------------------------------------------------------


def uniform_token_count(rows: int, cols: int, num_scales: int) -> int:
    """Tokens of a flat image: every full aligned patch of the largest fitting scale merges, greedily down."""
    covered = [[False] * cols for _ in range(rows)]
    count = 0
    for s in range(num_scales - 1, -1, -1):
        f = 2**s
        for i in range(rows // f):
            for j in range(cols // f):
                cells = [(r, c) for r in range(i * f, i * f + f) for c in range(j * f, j * f + f)]
                if not any(covered[r][c] for r, c in cells):
                    for r, c in cells:
                        covered[r][c] = True
                    count += 1
    return count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scorer", SCORERS)
def test_uniform_image_merges_everything_it_can(scorer: str, device: str) -> None:
    thr = {"entropy": 0.5, "laplacian": 1e-6, "upsample_mse": 1e-12}[scorer]
    cases = {  # (h, w, S): exact token count, p = 4
        (32, 32, 2): 16, (32, 32, 3): 4, (32, 32, 4): 1,
        (28, 20, 2): 6 + 11, (28, 20, 3): 1 + 2 + 11, (28, 20, 4): 1 + 2 + 11,
        (16, 24, 2): 6, (16, 24, 3): 1 + 2, (12, 4, 2): 3, (4, 64, 3): 16,
    }
    for (h, w, num_scales), n_tokens in cases.items():
        assert uniform_token_count(h // 4, w // 4, num_scales) == n_tokens
        img = torch.full((2, 3, h, w), 201, dtype=torch.uint8, device=device)
        layout = compute_layout(img, 4, num_scales, [thr] * (num_scales - 1), scorer)
        assert layout.tokens_per_image.tolist() == [n_tokens, n_tokens], (h, w, num_scales)
        check_tiling(layout)


def test_uniform_image_token_scales_exact() -> None:
    layout = compute_layout(torch.full((1, 3, 28, 20), 9, dtype=torch.uint8), 4, 3, [1.0, 1.0])
    # 7x5 grid: one scale-2 token at (0,0), scale-1 tokens at (4,0), (4,2); the rest (row 6, col 4) scale 0
    tokens = list(zip(layout.patch_scales.tolist(), map(tuple, layout.patch_positions.tolist()), strict=True))
    assert tokens == [(2, (0, 0)), (0, (0, 4)), (0, (1, 4)), (0, (2, 4)), (0, (3, 4)), (1, (4, 0)), (1, (4, 2)),
                      (0, (4, 4)), (0, (5, 4)), (0, (6, 0)), (0, (6, 1)), (0, (6, 2)), (0, (6, 3)), (0, (6, 4))]


@pytest.mark.parametrize("scorer", SCORERS)
def test_noise_merges_nothing(scorer: str) -> None:
    thresholds = {"entropy": [5.5, 4.0], "laplacian": [0.05, 0.05], "upsample_mse": [0.01, 0.01]}[scorer]
    img = make_image(64, 48, seed=5, batch=2)
    layout = compute_layout(img, 8, 3, thresholds, scorer)
    assert layout.tokens_per_image.tolist() == [48, 48]
    assert (layout.patch_scales == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scorer", SCORERS)
def test_half_flat_image_merges_only_the_flat_half(scorer: str, device: str) -> None:
    thresholds = {"entropy": [5.5, 4.0], "laplacian": [0.05, 0.05], "upsample_mse": [0.01, 0.01]}[scorer]
    img = make_image(64, 64, seed=6)  # p = 8: 8x8 grid, flat half = columns 0..3
    img[..., :32] = 140
    layout = compute_layout(img.to(device), 8, 3, thresholds, scorer)
    scales, pos = layout.patch_scales.cpu(), layout.patch_positions.cpu()
    left = pos[:, 1] < 4
    # Laplacian and bilinear resampling see a little of the noise across the seam (laplacian ~0.011, mse ~1e-4
    # on the flat scale-2 patches), well below these thresholds; entropy sees none.
    assert scales[left].tolist() == [2, 2] and pos[left].tolist() == [[0, 0], [4, 0]]
    assert (scales[~left] == 0).all() and int((~left).sum()) == 32
    check_tiling(layout)


def test_partial_edge_patches_never_merge() -> None:
    # Flat everywhere: only full aligned patches merge. 20x12 at p=4 is a 5x3 grid.
    layout = compute_layout(torch.zeros((1, 3, 20, 12), dtype=torch.uint8), 4, 3, [8.0, 8.0])
    for s, (r, c) in zip(layout.patch_scales.tolist(), layout.patch_positions.tolist(), strict=True):
        if r == 4 or c == 2:
            assert s == 0, (s, r, c)
    assert layout.patch_scales.tolist() == [1, 0, 0, 1, 0, 0, 0, 0, 0]
    # A grid smaller than one coarse patch in either direction never merges.
    for h, w in ((4, 64), (64, 4), (12, 4)):
        layout = compute_layout(torch.zeros((1, 3, h, w), dtype=torch.uint8), 4, 3, [8.0, 8.0])
        assert (layout.patch_scales == 0).all() and int(layout.tokens_per_image) == (h // 4) * (w // 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scorer", SCORERS)
def test_negative_threshold_and_single_scale_keep_every_patch(scorer: str, device: str) -> None:
    img = torch.zeros((2, 3, 28, 20), dtype=torch.uint8, device=device)  # flat: would merge with any positive thr
    want = uniform_layout(2, 7, 5)
    raster = torch.stack(torch.meshgrid(torch.arange(7), torch.arange(5), indexing="ij"), -1).view(-1, 2)
    assert torch.equal(want.patch_positions, torch.cat([raster, raster]))
    for num_scales, thresholds in ((2, [-1]), (1, []), (3, [-1, -1]), (3, [-1.0, 0.0])):
        layout = compute_layout(img, 4, num_scales, thresholds, scorer)
        assert_layout_equal(layout, want)


def test_largest_scale_wins_and_strict_threshold() -> None:
    # Flat 32x32: scale 1 and 2 both pass, scale 2 wins; with scale 2 disabled, scale 1 tiles.
    img = torch.full((1, 3, 32, 32), 50, dtype=torch.uint8)
    assert compute_layout(img, 4, 3, [1.0, 1.0]).patch_scales.tolist() == [2] * 4
    assert compute_layout(img, 4, 3, [1.0, -1.0]).patch_scales.tolist() == [1] * 16
    assert compute_layout(img, 4, 3, [-1.0, 1.0]).patch_scales.tolist() == [2] * 4
    # Entropy 1 bit exactly (two levels, half each) does not merge at threshold 1 only below it.
    two = checkerboard(8, 8, 4)  # p=4: each 8x8 scale-1 patch is 4 quadrants, 2 black, 2 white
    assert entropy_scores(two, 4, [1], 512)[1].item() == pytest.approx(1.0, abs=1e-12)
    assert compute_layout(two, 4, 2, [0.999]).patch_scales.tolist() == [0, 0, 0, 0]
    assert compute_layout(two, 4, 2, [1.001]).patch_scales.tolist() == [1]


# ----------------------------------------------------------------------------------------------------------
# Scorers with known answers
# ----------------------------------------------------------------------------------------------------------

GRAY_SUM = 0.9999  # 0.2989 + 0.5870 + 0.1140: a 0/255 RGB image has gray 0 / 0.9999 in [0, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_constant_image_scores_zero(device: str) -> None:
    img = torch.full((2, 3, 32, 24), 123, dtype=torch.uint8, device=device)
    for scorer in SCORERS:
        for s, scores in score_patches(img, 4, [1, 2], scorer, 512).items():
            assert scores.shape == (2, 32 // (4 << s), 24 // (4 << s))
            # entropy and laplacian are exact; bilinear resampling of a constant is exact to ~1e-33
            assert scores.abs().max() <= (1e-30 if scorer == "upsample_mse" else 0), (scorer, s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scorer", SCORERS)
def test_scales_without_a_full_patch_score_empty(scorer: str, device: str) -> None:
    img = make_image(16, 40, seed=0, batch=2).to(device)  # p=4: 4x10 grid; scale 3 (8 cells) fits no patch
    got = score_patches(img, 4, [1, 2, 3], scorer, 512)
    assert [tuple(got[s].shape) for s in (1, 2, 3)] == [(2, 2, 5), (2, 1, 2), (2, 0, 1)]


@pytest.mark.parametrize("device", DEVICES)
def test_laplacian_checkerboard(device: str) -> None:
    img = checkerboard(24, 24).to(device)  # p=4, scale 1: 3x3 patches of 8x8 pixels
    got = laplacian_scores(img, 4, [1])[1][0].cpu()
    # Per pixel |L| = 4 everywhere: reflected edges continue a period-2 pattern exactly (replicated ones would
    # give 5 on the border); times gray 0.9999.
    torch.testing.assert_close(got, torch.full((3, 3), 4.0 * GRAY_SUM, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_laplacian_known_values(device: str) -> None:
    # A vertical step 0 -> 255 between columns 7 and 8 of a 16x16 image: |L| = 3 * 0.9999 on each of the two
    # columns next to it; p=4 scale 1 patches are 8x8 so each of the 2x2 patches has 8 such pixels of 64.
    img = torch.zeros((1, 3, 16, 16), dtype=torch.uint8)
    img[..., 8:] = 255
    got = laplacian_scores(img.to(device), 4, [1])[1][0].cpu()
    torch.testing.assert_close(got, torch.full((2, 2), 8 * 3 * GRAY_SUM / 64, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_upsample_mse_checkerboard(device: str) -> None:
    # Bilinear 2x (and 4x) down without antialias averages two opposite-colour pixels per axis -> 0.5 everywhere,
    # so the up-sampled copy is 0.5 and the error is 0.25 on every pixel of every channel.
    img = checkerboard(32, 32).to(device)
    for s, scores in upsample_mse_scores(img, 4, [1, 2]).items():
        assert scores.shape == (1, 32 // (4 << s), 32 // (4 << s))
        torch.testing.assert_close(scores.cpu(), torch.full_like(scores.cpu(), 0.25), rtol=0, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_upsample_mse_blocks_and_ramp(device: str) -> None:
    # Bilinear up-sampling blurs block edges, so blocky images have no closed form: use the loop reference.
    img = make_image(16, 16, seed=9, levels=4, block=4)
    got = upsample_mse_scores(img.to(device), 4, [1])[1][0].cpu()
    want = ref_upsample_mse_scores(img[0].tolist(), 4, [1])[1]
    torch.testing.assert_close(got, torch.tensor([[want[0, 0], want[0, 1]], [want[1, 0], want[1, 1]]],
                                                 dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # Horizontal-only ramp: bilinear reproduces a linear function away from the clamped borders.
    ramp = (torch.arange(32) * 8).to(torch.uint8).expand(1, 3, 32, 32).contiguous()
    inner = upsample_mse_scores(ramp.to(device), 4, [1])[1][0].cpu()
    assert inner[:, 1:-1].abs().max() < 1e-30


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_known_values(device: str) -> None:
    img = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
    img[:, :, :4, 4:] = 60
    img[:, :, 4:, :4] = 120
    img[:, :, 4:, 4:] = 180  # four equal quadrants of distinct gray: 2 bits
    got = entropy_scores(img.to(device), 4, [1], 512)[1]
    assert got.item() == pytest.approx(2.0, abs=1e-12)
    assert entropy_scores(checkerboard(8, 8).to(device), 4, [1], 512)[1].item() == pytest.approx(1.0, abs=1e-12)
    # 64 distinct levels in 64 pixels: log2(64) = 6 bits. With 2 bins (histc over [0, 255]) the split is
    # gray = 0.9999 v < 127.5, i.e. v <= 127: 32 of the 64 values 0, 4, ..., 252, so exactly 1 bit.
    grad = (torch.arange(64) * 4).view(8, 8).to(torch.uint8).expand(1, 3, 8, 8).contiguous()
    assert entropy_scores(grad.to(device), 4, [1], 512)[1].item() == pytest.approx(6.0, abs=1e-12)
    assert entropy_scores(grad.to(device), 4, [1], 2)[1].item() == pytest.approx(1.0, abs=1e-12)
    # 3 bins split at gray 85 and 170: v <= 85 (22 values), v <= 170 (21 more), the remaining 21
    three_bins = -sum(k / 64 * math.log2(k / 64) for k in (22, 21, 21))
    assert entropy_scores(grad.to(device), 4, [1], 3)[1].item() == pytest.approx(three_bins, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------


def ref_pack(images: torch.Tensor, tokens: list[list[Token]], p: int) -> torch.Tensor:
    patches = []
    for img, toks in zip(images, tokens, strict=True):
        for s, r, c in toks:
            for rr in range(r, r + 2**s):
                for cc in range(c, c + 2**s):
                    patches.append(img[:, rr * p:(rr + 1) * p, cc * p:(cc + 1) * p])
    return torch.stack(patches)


def tokens_of(layout: PatchLayout) -> list[list[Token]]:
    out, start = [], 0
    for n in layout.tokens_per_image.tolist():
        out.append([(s, r, c) for s, (r, c) in zip(layout.patch_scales[start:start + n].tolist(),
                                                   layout.patch_positions[start:start + n].tolist(), strict=True)])
        start += n
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_pack_unpack_roundtrip(device: str) -> None:
    p = 4
    images = make_image(28, 20, seed=12, levels=3, block=4, batch=3).to(device)
    layout = compute_layout(images, p, 3, [1.5, 1.2])
    assert (layout.patch_scales > 0).any()
    pixels = (images.float() / 255 - 0.5) / 0.25  # normalized floats, as the processor packs them
    packed = pack_base_patches(pixels, layout, p)
    assert packed.shape == (int((4 ** layout.patch_scales).sum()), 3, p, p)
    assert torch.equal(packed.cpu(), ref_pack(pixels.cpu(), tokens_of(layout.to("cpu")), p))
    validate_layout(layout, 3, packed.shape[0])
    for got, want in zip(unpack_base_patches(packed, layout), pixels, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_pack_unpack_mixed_grid_sizes(device: str) -> None:
    p = 4
    groups = [make_image(16, 24, seed=1, levels=2, block=8, batch=2), make_image(32, 32, seed=2, levels=1),
              make_image(28, 20, seed=3, levels=5, block=2, batch=2)]
    layouts = [compute_layout(g.to(device), p, 4, [1.5, 1.0, 0.5]) for g in groups]
    packed = torch.cat([pack_base_patches(g.to(device), lay, p) for g, lay in zip(groups, layouts, strict=True)])
    layout = concat_layouts(layouts)
    assert layout.image_grid_hw.tolist() == [[4, 6]] * 2 + [[8, 8]] + [[7, 5]] * 2
    validate_layout(layout, 4, packed.shape[0])
    check_tiling(layout)
    images = [img for g in groups for img in g]
    assert torch.equal(packed.cpu(), torch.cat([ref_pack(g, tokens_of(lay.to("cpu")), p)
                                                for g, lay in zip(groups, layouts, strict=True)]))
    for got, want in zip(unpack_base_patches(packed, layout), images, strict=True):
        assert torch.equal(got.cpu(), want)


# ----------------------------------------------------------------------------------------------------------
# recover_uint8
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_recover_uint8_inverts_clip_normalisation(device: str) -> None:
    levels = torch.arange(256, dtype=torch.uint8).view(16, 16)
    img = torch.stack([levels, levels.flip(0), levels.T])  # every level in every channel
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    for dtype in (torch.float32, torch.float64):
        normalized = ((img.to(dtype) * (1 / 255)) - mean.to(dtype)) / std.to(dtype)
        for x in (normalized, normalized.float()):
            out = recover_uint8(x.to(device), CLIP_MEAN, CLIP_STD)
            assert out.dtype == torch.uint8 and torch.equal(out.cpu(), img), (dtype, x.dtype)
    # Batched (B, 3, H, W) input and transformers' own CLIP processor output.
    from PIL import Image as PILImage

    pil = PILImage.fromarray(img.permute(1, 2, 0).numpy())
    processed = CLIPImageProcessorPil(do_resize=False, do_center_crop=False)(pil, return_tensors="pt")["pixel_values"]
    assert torch.equal(recover_uint8(processed.to(device), CLIP_MEAN, CLIP_STD).cpu(), img[None])
    # Rescale only, no normalisation.
    assert torch.equal(recover_uint8(img.float().to(device) / 255, None, None).cpu(), img)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

IMG = torch.zeros((1, 3, 16, 16), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_scales": 2, "thresholds": []}, "thresholds"),
        ({"num_scales": 2, "thresholds": [1.0, 2.0]}, "thresholds"),
        ({"num_scales": 3, "thresholds": [1.0]}, "thresholds"),
        ({"num_scales": 1, "thresholds": [1.0]}, "thresholds"),
        ({"num_scales": 2, "thresholds": [float("nan")]}, "thresholds"),
        ({"num_scales": 2, "thresholds": [float("inf")]}, "thresholds"),
        ({"num_scales": 3, "thresholds": [1.0, float("-inf")]}, "thresholds"),
        ({"num_scales": 2, "thresholds": ["5"]}, "thresholds"),
        ({"num_scales": 0, "thresholds": []}, "num_scales"),
        ({"num_scales": -1, "thresholds": []}, "num_scales"),
        ({"num_scales": 2.0, "thresholds": [1.0]}, "num_scales"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": -4}, "patch_size"),
        ({"scorer": "sobel"}, "scorer"),
        ({"scorer": "Entropy"}, "scorer"),
        ({"entropy_bins": 1}, "entropy_bins"),
        ({"entropy_bins": 0}, "entropy_bins"),
    ],
)
def test_bad_apt_fields(kwargs: dict, argument: str) -> None:
    args = {"patch_size": 4, "num_scales": 2, "thresholds": [1.0], "scorer": "entropy", "entropy_bins": 512}
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument) as err:
        compute_layout(IMG, **args)
    assert "expected" in str(err.value) and "got" in str(err.value)


@pytest.mark.parametrize(
    ("shape", "argument"),
    [((1, 3, 18, 16), "multiples of patch_size=4"), ((1, 3, 16, 30), "multiples of patch_size=4"),
     ((1, 3, 2, 2), "at least patch_size=4"), ((1, 3, 16, 3), "at least patch_size=4"),
     ((1, 2, 16, 16), "images"), ((1, 4, 16, 16), "images"), ((3, 16, 16), "images")],
)
def test_bad_image_shapes(shape: tuple[int, ...], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        compute_layout(torch.zeros(shape, dtype=torch.uint8), 4, 2, [1.0])


@pytest.mark.parametrize("scorer", SCORERS)
def test_greyscale_is_scored_as_rgb_with_equal_channels(scorer: str) -> None:
    grey = torch.from_numpy(np.asarray(load_photos(("camera.png",), mode="L")["camera"]))[None, None]
    rgb = grey.expand(-1, 3, -1, -1).contiguous()
    thresholds = {"entropy": [5.0, 5.5], "laplacian": [0.05, 0.035], "upsample_mse": [0.0003, 0.00003]}[scorer]
    want = compute_layout(rgb, 16, 3, thresholds, scorer)
    assert (want.patch_scales > 0).any()
    assert_layout_equal(compute_layout(grey, 16, 3, thresholds, scorer), want)


def test_bad_image_size_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"image.*18x16.*size / crop_size"):
        compute_layout(torch.zeros((1, 3, 18, 16), dtype=torch.uint8), 4, 2, [1.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_recover_uint8_refuses_non_finite(bad: float) -> None:
    x = torch.zeros((1, 3, 4, 4))
    x[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="pixel_values"):
        recover_uint8(x, CLIP_MEAN, CLIP_STD)


def good_layout() -> PatchLayout:
    """Two images: a 4x4 grid with one scale-1 token at (0,0) and a flat 2x2 grid of one scale-1 token."""
    cell = torch.zeros((1, 4, 4), dtype=torch.int64)
    cell[0, :2, :2] = 1
    from apt_hf.patchify import layout_from_cell_scales

    return concat_layouts([layout_from_cell_scales(cell), layout_from_cell_scales(torch.ones((1, 2, 2),
                                                                                             dtype=torch.int64))])


def with_(layout: PatchLayout, **changes: torch.Tensor) -> PatchLayout:
    fields = {k: getattr(layout, k) for k in ("patch_scales", "patch_positions", "tokens_per_image", "image_grid_hw")}
    fields.update(changes)
    return PatchLayout(**fields)


def test_validate_layout_accepts_good() -> None:
    layout = good_layout()
    assert layout.tokens_per_image.tolist() == [13, 1]
    validate_layout(layout, 2, 20)
    validate_layout(layout, 2)


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        # counts not adding up
        (lambda lay: {"tokens_per_image": torch.tensor([12, 1])}, "tokens_per_image"),
        (lambda lay: {"tokens_per_image": torch.tensor([14])}, "image_grid_hw"),
        (lambda lay: {"tokens_per_image": torch.tensor([15, -1])}, "tokens_per_image"),
        (lambda lay: {"patch_scales": lay.patch_scales.float()}, "patch_scales"),
        (lambda lay: {"patch_positions": lay.patch_positions.double()}, "patch_positions"),
        (lambda lay: {"patch_positions": lay.patch_positions[:-1]}, "patch_positions"),
        (lambda lay: {"image_grid_hw": lay.image_grid_hw[:1]}, "image_grid_hw"),
        # positions off grid / misaligned
        (lambda lay: {"patch_positions": lay.patch_positions + torch.tensor([0, 1])}, "patch_positions"),
        (lambda lay: {"patch_positions": lay.patch_positions - 1}, "patch_positions"),
        (lambda lay: {"patch_positions": lay.patch_positions.index_put((torch.tensor([0]),),
                                                                       torch.tensor([[1, 1]]))}, "patch_positions"),
        (lambda lay: {"image_grid_hw": torch.tensor([[4, 4], [1, 2]])}, "patch_positions"),
        # scales out of range
        (lambda lay: {"patch_scales": lay.patch_scales.index_put((torch.tensor([13]),), torch.tensor(2))},
         "patch_scales"),
        (lambda lay: {"patch_scales": lay.patch_scales - 1}, "patch_scales"),
        # overlap (same cell count): a scale-0 token moved inside the scale-1 token, leaving a gap at (0, 2)
        (lambda lay: {"patch_positions": lay.patch_positions.index_put((torch.tensor([1]),),
                                                                       torch.tensor([[1, 0]]))}, "tile"),
        # overlap (same cell count): a scale-0 token duplicated onto its neighbour
        (lambda lay: {"patch_positions": lay.patch_positions.index_put((torch.tensor([1]),),
                                                                       torch.tensor([[0, 3]]))}, "tile"),
        # gap: the scale-1 token shrunk to scale 0, so 3 cells are covered by nobody
        (lambda lay: {"patch_scales": lay.patch_scales.index_put((torch.tensor([0]),), torch.tensor(0))}, "tile"),
    ],
)
def test_validate_layout_refuses(change, argument: str) -> None:  # noqa: ANN001
    layout = good_layout()
    with pytest.raises(ValueError, match=argument):
        validate_layout(with_(layout, **change(layout)), 2, 20)


def test_validate_layout_refuses_wrong_number_of_base_patches() -> None:
    with pytest.raises(ValueError, match="pixel_values.*20.*got 19"):
        validate_layout(good_layout(), 2, 19)


# ----------------------------------------------------------------------------------------------------------
# Property tests
# ----------------------------------------------------------------------------------------------------------

THRESHOLD_RANGE = {"entropy": 7.0, "laplacian": 1.2, "upsample_mse": 0.08}


@st.composite
def apt_cases(draw: st.DrawFn) -> dict:
    p = draw(st.integers(1, 4))
    num_scales = draw(st.sampled_from([1, 2, 2, 3, 3, 4, 4]))
    scorer = draw(st.sampled_from(SCORERS))
    top = THRESHOLD_RANGE[scorer]
    # A threshold is -1, any float in the scorer's range, or a quantile of the image's own scores (resolved in
    # the test, half-way between two distinct scores) so that partial merges are common.
    thresholds = [draw(st.one_of(st.just(("fixed", -1.0)), st.tuples(st.just("fixed"), st.floats(0.0, top)),
                                 st.tuples(st.just("quantile"), st.floats(0.0, 1.0)),
                                 st.tuples(st.just("quantile"), st.floats(0.2, 0.8))))
                  for _ in range(num_scales - 1)]
    side = st.integers(1, 40 // p) | st.integers(20 // p, 40 // p)  # hypothesis favours tiny grids; add big ones
    rows, cols = draw(side), draw(side)
    return {
        "p": p, "num_scales": num_scales, "scorer": scorer, "thresholds": thresholds,
        "h": rows * p, "w": cols * p, "batch": draw(st.integers(1, 3)), "seed": draw(st.integers(0, 2**16)),
        "levels": draw(st.sampled_from([1, 2, 3, 8, 256])), "block": draw(st.sampled_from([1, 2, 4, 8])),
        "bins": draw(st.sampled_from([2, 16, 512])),
    }


def resolve_thresholds(spec: list[tuple[str, float]], scores: list[dict[int, dict]]) -> list[float]:
    out = []
    for s, (kind, value) in enumerate(spec, start=1):
        if kind == "fixed":
            out.append(value)
            continue
        values = sorted({v for per_image in scores for v in per_image[s].values()})
        k = round(value * len(values))
        if not values:
            out.append(1.0)
        elif k == 0:
            out.append(values[0] - 1.0)  # merges nothing (a negative threshold other than -1 when scores are 0)
        elif k == len(values):
            out.append(values[-1] + 1.0)  # merges every full patch of this scale
        else:
            out.append((values[k - 1] + values[k]) / 2)
    return out


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=apt_cases())
def test_property_layout(case: dict, device: str) -> None:
    images = make_image(case["h"], case["w"], case["seed"], case["levels"], case["block"], case["batch"])
    scores = [ref_scores(img, case["p"], range(1, case["num_scales"]), case["scorer"], case["bins"])
              for img in images.tolist()]
    thresholds = resolve_thresholds(case["thresholds"], scores)
    layout = compute_layout(images.to(device), case["p"], case["num_scales"], thresholds, case["scorer"],
                            case["bins"])
    check_tiling(layout)
    assert layout.tokens_per_image.shape == (case["batch"],)
    assert layout.image_grid_hw.tolist() == [[case["h"] // case["p"], case["w"] // case["p"]]] * case["batch"]
    assert int(layout.patch_scales.max()) < case["num_scales"]
    want, margin = ref_batch_layout(images, case["p"], case["num_scales"], thresholds, case["scorer"],
                                    case["bins"], scores)
    assume(margin > TIE)
    assert_layout_equal(layout, want)
    packed = pack_base_patches(images.to(device), layout, case["p"])
    validate_layout(layout, case["num_scales"], packed.shape[0])
    for got, img in zip(unpack_base_patches(packed, layout), images, strict=True):
        assert torch.equal(got.cpu(), img)


def test_interpolate_rule_matches_reference_bilinear() -> None:
    """The reference's bilinear rule is PyTorch's (including odd, non-2x sizes), so upsample_mse compares fairly."""
    g = torch.Generator().manual_seed(0)
    for (h, w), (oh, ow) in (((9, 12), (4, 6)), ((4, 6), (9, 12)), ((7, 5), (3, 2)), ((3, 2), (7, 5))):
        x = torch.rand((h, w), generator=g, dtype=torch.float64)
        want = torch.tensor(ref_bilinear(x.tolist(), oh, ow), dtype=torch.float64)
        got = F.interpolate(x[None, None], size=(oh, ow), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_recover_uint8_leaves_its_input_alone():
    from apt_hf.patchify import recover_uint8

    pixels = torch.tensor([[[[0.4, 254.6], [12.5, 3.2]]]] * 3).view(1, 3, 2, 2).float()
    before = pixels.clone()
    out = recover_uint8(pixels, None, None, 1.0)
    assert out.dtype == torch.uint8 and torch.equal(pixels, before)


def test_selecting_images_moves_each_images_tiles_together():
    """Anyres images are several packed tiles: selecting images takes all of their tiles, in the order asked,
    and per-image keys (image_sizes) by row."""
    photos = list(load_photos().values())[:5]
    inputs = dict(AptImageProcessorPil(size={"height": 56, "width": 56}, do_center_crop=False, thresholds=[4.0])(
        photos, return_tensors="pt"))
    tiles = torch.tensor([2, 1, 2])  # three images of 2, 1 and 2 tiles
    inputs["image_sizes"] = torch.tensor([[10, 20], [30, 40], [50, 60]])
    taken = select_image_inputs(inputs, torch.tensor([2, 0]), tiles)
    expected_pixels, expected_layout = select_images(inputs["pixel_values"], PatchLayout.from_inputs(inputs),
                                                     torch.tensor([3, 4, 0, 1]))
    assert torch.equal(taken["pixel_values"], expected_pixels)
    for key, value in expected_layout.as_dict().items():
        assert torch.equal(taken[key], value)
    assert taken["image_sizes"].tolist() == [[50, 60], [10, 20]]
    with pytest.raises(ValueError, match=r"tiles_per_image: expected counts that add up to the 5 packed tiles"):
        select_image_inputs(inputs, torch.tensor([0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"processor output 'image_sizes': expected one entry per image \(5\)"):
        select_image_inputs(inputs, torch.tensor([0]))


# ----------------------------------------------------------------------------------------------------------
# The fast paths (one-pass gray levels and histogram keys, the one-gather packing) against plain references
# ----------------------------------------------------------------------------------------------------------


def plain_entropy_scores(images: torch.Tensor, p: int, scales: Sequence[int], bins: int) -> dict[int, torch.Tensor]:
    """The straightforward vectorised scorer: official float32 gray, histc's bin (floor, 255 clamped into the last
    bin), one bincount per scale over a broadcast key, entropy as -sum xlogy(q, q) / ln 2 over each histogram."""
    x = images.float()
    gray = 0.2989 * x[:, 0] + 0.5870 * x[:, 1] + 0.1140 * x[:, 2]
    level = torch.floor(gray * bins / torch.tensor([255.0])).clamp(max=bins - 1).long()
    b, h, w = level.shape
    out = {}
    for s in scales:
        side = p << s
        rows, cols = h // p >> s, w // p >> s
        cropped = level[:, : rows * side, : cols * side]
        key = (cropped + torch.arange(b).view(b, 1, 1) * (rows * cols * bins)
               + (torch.arange(rows * side) // side * (cols * bins)).view(1, -1, 1)
               + (torch.arange(cols * side) // side * bins).view(1, 1, -1))
        counts = torch.bincount(key.flatten(), minlength=b * rows * cols * bins).view(b, rows, cols, bins)
        q = counts.double() / torch.tensor([float(side * side)], dtype=torch.float64)
        out[s] = -torch.special.xlogy(q, q).sum(-1) / torch.tensor([math.log(2)], dtype=torch.float64)
    return out


def memory_layouts(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same (B, C, H, W) pixels as the processors hold them: contiguous, channels-last (PIL's numpy, the
    torchvision backend's), and a crop's strided view of a larger image."""
    b, c, h, w = images.shape
    frame = torch.zeros((b, c, h + 5, w + 7), dtype=images.dtype)
    frame[:, :, 2: h + 2, 3: w + 3] = images
    return {"contiguous": images.contiguous(), "channels_last": images.contiguous(memory_format=torch.channels_last),
            "crop_view": frame[:, :, 2: h + 2, 3: w + 3]}


@pytest.mark.parametrize("size, p, num_scales, bins", [
    ((336, 336), 14, 2, 512), ((333, 301), 14, 3, 512), ((190, 250), 8, 4, 100), ((97, 61), 6, 3, 2),
])
def test_entropy_scores_equal_the_plain_scorer_bitwise(size: tuple[int, int], p: int, num_scales: int, bins: int
                                                       ) -> None:
    photos = torch.stack([torch.from_numpy(np.array(photo.resize(size[::-1]))).permute(2, 0, 1) for photo in
                          load_photos(("astronaut.png", "coffee.png", "hubble_deep_field.jpg")).values()])
    scales = list(range(1, num_scales))
    want = plain_entropy_scores(photos, p, scales, bins)
    for name, images in memory_layouts(photos).items():
        for batch in (images, images[1:2]):
            got = entropy_scores(batch, p, scales, bins)
            for s in scales:
                expected = want[s] if batch.shape[0] == 3 else want[s][1:2]
                assert got[s].dtype == torch.float64 and torch.equal(got[s], expected), (name, s)


def test_gray_levels_by_tables_equal_the_products_for_every_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table lookups (GPUs, compiled and exported graphs: no multiply a compiler could fuse into an add) and the
    eager CPU products give the same bin for all 2**24 colours; float input is left unchanged."""
    rgb = all_colours()
    products = _gray_levels(rgb, 512)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(_gray_levels(rgb, 512), products)
    monkeypatch.undo()
    floats = rgb[:, :, :64].float()
    assert torch.equal(_gray_levels(floats, 512), products[:, :64]) and torch.equal(floats, rgb[:, :, :64].float())


def test_gray_levels_stay_below_the_last_bin_edge() -> None:
    """8-bit gray is at most 0.9999 * 255: histc's clamp of the value 255 never applies, for any number of bins."""
    white = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    for bins in (2, 3, 100, 255, 256, 511, 512, 4096, 65535, 65536):
        unclamped = torch.floor(official_gray(white[0]) * bins / torch.tensor([255.0]))
        assert unclamped.item() < bins and _gray_levels(white, bins).item() == unclamped.item()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("size, p, num_scales, thresholds", [
    ((28, 20), 4, 3, [1.5, 1.2]), ((30, 23), 4, 2, [1.9]), ((17, 33), 3, 4, [1.5, 1.0, 0.5]),
])
def test_pack_equals_the_reference_for_any_memory_layout(dtype: torch.dtype, size: tuple[int, int], p: int,
                                                         num_scales: int, thresholds: list[float]) -> None:
    images = make_image(*size, seed=5, levels=3, block=4, batch=3)
    images = crop_to_patch_grid(images, p)
    layout = compute_layout(images, p, num_scales, thresholds)
    assert (layout.patch_scales > 0).any()
    pixels = images if dtype == torch.uint8 else (images.float() / 255 - 0.5) / 0.25
    want = ref_pack(pixels, tokens_of(layout), p)
    for name, view in {**memory_layouts(pixels), "greyscale_expanded": pixels[:, :1].expand(-1, 3, -1, -1)}.items():
        expected = want if name != "greyscale_expanded" else ref_pack(view.contiguous(), tokens_of(layout), p)
        got = pack_base_patches(view, layout, p)
        assert got.is_contiguous() and got.dtype == dtype and torch.equal(got, expected), name
        assert torch.equal(gather_base_patches(view, layout, p), expected), name  # the view, in the images' order


def test_pack_passes_gradients_back_to_each_pixel() -> None:
    pixels = torch.randn(2, 3, 12, 8, dtype=torch.float64, requires_grad=True)
    layout = compute_layout(make_image(12, 8, seed=2, levels=2, block=4, batch=2), 4, 2, [1.5])
    weights = torch.randn(int((4 ** layout.patch_scales).sum()), 3, 4, 4, dtype=torch.float64)
    (pack_base_patches(pixels, layout, 4) * weights).sum().backward()
    want = torch.stack(unpack_base_patches(weights, layout))
    assert torch.equal(pixels.grad, want)
