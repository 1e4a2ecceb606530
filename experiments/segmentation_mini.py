"""Table 5 in miniature, on a CPU: UperNet on a DINOv2-shaped ViT, trained from scratch, converted to APT, healed in
one epoch, at two resolutions.

    python scripts/segmentation_mini.py --output_dir outputs/segmentation_mini    # ~9 min on 2 cores (limit: 10)
    python scripts/segmentation_mini.py --toy --output_dir /tmp/seg               # ~10 s: the pipeline only

The task has exact labels and downloads nothing: 1-4 objects per image painted onto crops of the photographs that
ship inside scikit-image, so that the background is real texture. An object's class is its colour family (red,
yellow, green, blue; with the background, 5 classes): two shades of one hue from the class's band, with random
saturation and brightness, in a random material (flat paint with a gentle gradient, stripes, checks or dots) and a
random outline (disc, square, triangle, ring), place, size and angle. Red objects on the retina or the astronaut's
suit, say, need their outline, not only their colour. A scene is drawn in continuous coordinates and rasterised
at any resolution with hard edges, the label of a pixel being the object at its centre. Validation scenes use a
held-out strip of every photo (its right 30%) and are the same for every seed; training scenes come from the rest.
(Classes by outline instead, with random colours, did not train in this budget: the triangles' and rings' IoU was
still 0 after 180 steps.)

The model is transformers' own `UperNetForSemanticSegmentation` with a `Dinov2Backbone` (default: 96 wide, 4 layers,
4 heads, patch 8, the feature maps of every layer, layernormed; a 64-channel UperNet head, no auxiliary head). The
paper's models are separate fine-tunes at 512 and 640 px (patch 16: grids of 32 and 40); here one model per seed is
trained on both of two resolutions (default 128 and 160 px at patch 8: grids of 16 and 20, the same ratio), each
batch at one of them (5 epochs over 384 scenes), and evaluated at each. Rows, each fine-tuned the same way (one epoch
over the same training scenes, all weights, a tenth of the training learning rate, as the paper heals):

- Stock: the trained model, and, as a control, the stock model after the same extra epoch (what the epoch alone buys);
- APT with the paper's scorer (entropy; threshold 4.5 on the 16 px patches merges about the paper's 28-32% of the
  tokens on the training scenes), right after conversion (`apt_hf.convert`: the zero-initialised MLP makes it "resize
  only") and after one epoch;
- Resizing: the same layout with E(Resize(P)) alone (the detail branch frozen at zero), after one epoch;
- APT with the appendix's upsample_mse scorer at its official threshold (0.000303), converted and after one epoch
  (`--alt_scorer none` leaves it out).

Each cell is mean +- std over seeds (a seed fixes the stock model's init and its training scenes; the validation
scenes are fixed). aAcc is pixel accuracy; mIoU the mean over classes of intersection / union accumulated over the
whole validation set. Speed is inference images/s of the stock and APT models on the same validation images, in the
same run (APT on the packed batch its processor would give, the layout computed beforehand), beside the ideal speedup:
the FLOP ratio of the whole model, backbone (`apt_hf.flops`) plus the head, which runs on the full feature grid in
both models.

What the default run showed (9.8 min on 2 cores; the table is in the README): the paper's claim did not carry over
with its own scorer. Entropy APT merged 37-39% of the validation tokens and lost 3-4 mIoU against the stock model
(4 against the control); its epoch gained +0.5, less than the same epoch gave the stock model (+0.7-0.8), and
Resizing was as good (APT ahead by 0.03-0.14 on every seed and resolution). The run says why: about a third of the
tokens entropy merges straddle an object's edge. A 16 px block holding the edge between two flat regions (a painted
object on a smooth background, or a two-colour pattern) has a low-entropy histogram, so the merged token can place
that edge no finer than 16 px. The upsample_mse scorer at its official threshold,
which measures what downsampling destroys, merged as many tokens (33-41%), only 2% of them on edges, and stayed
within 0.1-0.5 mIoU of the stock model on every seed (1 below the control). Measured speedups were +10% (128 px)
and +20% (160 px) against an ideal of +26-38%, beside the paper's +11%.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import Dinov2Config, UperNetConfig, UperNetForSemanticSegmentation

import apt_hf
from apt_hf.modeling_apt_dense import AptUperNetForSemanticSegmentation
from apt_hf.patchify import SCORERS, PatchLayout, compute_layout, pack_base_patches, uniform_layout

from .benchmarks.dense import dinov2_flops, head_flops
from .benchmarks.timing import machine
from .miniature import (
    TrainingSettings,
    fit,
    images_per_second,
    require_positive,
    settings_from_args,
    std,
    write_results,
)
from .reproduce_mini import PHOTO_CLASSES, load_class_photos, square_crops

CLASSES = ("background", "red", "yellow", "green", "blue")  # an object's class is its colour family
HUES = (0.0, 55.0, 120.0, 225.0)  # degrees: the centre of each class's band of hues
MATERIALS = ("paint", "stripes", "checks", "dots")
OUTLINES = ("disc", "square", "triangle", "ring")
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
# {scorer}: the row's scorer ("apt" rows use `scorer`, the paper's entropy; "alt" rows `alt_scorer`); {epochs}: the
# fine-tuning, e.g. "1 epoch"
ROW_NAMES = {"stock": "Stock", "stock_ft": "Stock + {epochs} (control)", "resizing": "Resizing, {scorer} ({epochs})",
             "apt_converted": "APT, {scorer}, converted", "apt": "APT, {scorer} ({epochs})",
             "alt_converted": "APT, {scorer}, converted", "alt": "APT, {scorer} ({epochs})"}
FINETUNED = ("stock_ft", "resizing", "apt", "alt")
APT_ROWS = {"resizing": "apt", "apt_converted": "apt", "apt": "apt", "alt_converted": "alt", "alt": "alt"}
# EVA-02-L + UperNet on ADE20K (paper Table 5): resolution -> row -> (img/s, aAcc, mIoU)
PAPER_TABLE_5 = {512: {"stock": (4.40, 86.67, 59.77), "resizing": (4.87, 86.09, 58.81), "apt": (4.87, 86.68, 59.70)},
                 640: {"stock": (2.55, 86.83, 60.05), "resizing": (2.83, 86.06, 58.83), "apt": (2.83, 86.82, 60.01)}}


@dataclass
class SegSettings(TrainingSettings):
    """Every knob of the experiment (the CLI's flags); the defaults are the README's run."""

    image_sizes: list[int] = field(default_factory=lambda: [128, 160])
    patch_size: int = 8
    num_scales: int = 2
    thresholds: list[float] = field(default_factory=lambda: [4.5])
    scorer: str = "entropy"
    alt_scorer: str = "upsample_mse"
    alt_thresholds: list[float] = field(default_factory=lambda: [0.000303])
    photo_side: int = 256
    crop_min: float = 0.35
    crop_max: float = 0.7
    val_fraction: float = 0.3
    max_shapes: int = 4
    radius_min: float = 0.1
    radius_max: float = 0.26
    hue_jitter: float = 20.0
    period_min: float = 0.05
    period_max: float = 0.1
    train_images: int = 384
    val_images: int = 96
    head_channels: int = 64
    batch_size: int = 16
    stock_control: bool = True
    resizing: bool = True

    def validate(self) -> None:
        super().validate()
        require_positive(self, ("patch_size", "num_scales", "photo_side", "max_shapes", "train_images", "val_images",
                                "head_channels"))
        merge = self.patch_size << (self.num_scales - 1)
        if not self.image_sizes or len(set(self.image_sizes)) != len(self.image_sizes) or any(
                size % merge for size in self.image_sizes):
            raise ValueError(f"image_sizes: expected distinct multiples of patch_size * 2**(num_scales - 1) = {merge} "
                             f"so that every scale can merge, got {self.image_sizes}")
        for name, scorer, thresholds in (("", self.scorer, self.thresholds),
                                         ("alt_", self.alt_scorer, self.alt_thresholds)):
            if scorer not in SCORERS and not (name and scorer == "none"):
                raise ValueError(f"{name}scorer: expected one of {SCORERS}{' or none' if name else ''}, got {scorer!r}")
            if scorer != "none" and len(thresholds) != self.num_scales - 1:
                raise ValueError(f"{name}thresholds: expected {self.num_scales - 1} values (num_scales - 1), got "
                                 f"{thresholds}")
        if not 0 < self.crop_min <= self.crop_max <= 1:
            raise ValueError(f"crop_min / crop_max: expected 0 < crop_min <= crop_max <= 1 (fractions of a photo's "
                             f"height), got {self.crop_min} / {self.crop_max}")
        if not 0 < self.radius_min <= self.radius_max < 0.5:
            raise ValueError(f"radius_min / radius_max: expected 0 < radius_min <= radius_max < 0.5 (fractions of the "
                             f"image side), got {self.radius_min} / {self.radius_max}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction: expected a fraction in (0, 1), got {self.val_fraction}")
        if not 0 < self.period_min <= self.period_max:
            raise ValueError(f"period_min / period_max: expected 0 < period_min <= period_max (fractions of the image "
                             f"side), got {self.period_min} / {self.period_max}")


# The CI-sized run (--toy): every step of the default run, on a model and data too small to learn anything.
TOY = {"image_sizes": [32, 48], "photo_side": 64, "train_images": 16, "val_images": 8, "hidden_size": 16, "layers": 2,
       "heads": 2, "head_channels": 8, "stock_epochs": 1, "batch_size": 8, "seeds": [0, 1], "timing_images": 4,
       "repeats": 1, "threads": 1}  # one thread: tiny ops gain nothing from more, and lose much on a busy machine


# ----------------------------------------------------------------------------------------------------------------
# The task: shapes on photographs, drawn once, rasterised at any resolution
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Scenes:
    """Scenes in continuous coordinates ([0, 1] across the image): a photo crop, then `max_shapes` object slots
    painted in order (later ones on top; a slot is empty where `active` is False). An object's class is its colour
    family; its material (the pattern of its surface) and outline are drawn independently of it."""

    photo: torch.Tensor  # (N,) index into the photos
    crop: torch.Tensor  # (N, 3): side (fraction of the photo's height), x and y (fractions of the free range)
    flip: torch.Tensor  # (N,) +1 or -1 (mirrored crop)
    active: torch.Tensor  # (N, K) bool
    label: torch.Tensor  # (N, K) class index 1..4 (CLASSES)
    material: torch.Tensor  # (N, K) index into MATERIALS
    outline: torch.Tensor  # (N, K) index into OUTLINES
    geometry: torch.Tensor  # (N, K, 4): centre x, centre y, radius, angle
    colours: torch.Tensor  # (N, K, 2, 3): the pattern's two colours, 0..255
    pattern: torch.Tensor  # (N, K, 4): period (fraction of the side), angle, shading gradient along x and y

    def __len__(self) -> int:
        return self.photo.shape[0]

    def take(self, index: torch.Tensor) -> Scenes:
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def draw_scenes(n: int, num_photos: int, settings: SegSettings, generator: torch.Generator) -> Scenes:
    """`n` random scenes: 1..max_shapes objects each, of random class, material, outline, place, size and angle.

    An object's colours are two shades of one hue inside its class's band (HUES +- hue_jitter degrees; saturation
    0.55..1; value 0.45..1, the second shade 40..70% of the first), so the class shows in every pixel of it while
    its brightness, saturation and pattern vary."""
    k = settings.max_shapes

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.empty(shape).uniform_(low, high, generator=generator)

    count = torch.randint(1, k + 1, (n,), generator=generator)
    label = torch.randint(1, len(CLASSES), (n, k), generator=generator)
    hue = torch.tensor(HUES)[label - 1] + uniform(n, k, low=-settings.hue_jitter, high=settings.hue_jitter)
    saturation, value = uniform(n, k, low=0.55, high=1.0), uniform(n, k, low=0.45, high=1.0)
    shade = torch.stack([value, value * uniform(n, k, low=0.4, high=0.7)], -1)  # (n, k, 2)
    colours = 255 * hsv_to_rgb(hue[..., None], saturation[..., None], shade)  # (n, k, 2, 3)
    return Scenes(
        photo=torch.randint(num_photos, (n,), generator=generator),
        crop=torch.stack([uniform(n, low=settings.crop_min, high=settings.crop_max), uniform(n), uniform(n)], -1),
        flip=torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0),
        active=torch.arange(k) < count[:, None],
        label=label,
        material=torch.randint(len(MATERIALS), (n, k), generator=generator),
        outline=torch.randint(len(OUTLINES), (n, k), generator=generator),
        geometry=torch.stack([uniform(n, k, low=0.1, high=0.9), uniform(n, k, low=0.1, high=0.9),
                              uniform(n, k, low=settings.radius_min, high=settings.radius_max),
                              uniform(n, k, high=2 * math.pi)], -1),
        colours=colours,
        pattern=torch.stack([uniform(n, k, low=settings.period_min, high=settings.period_max),
                             uniform(n, k, high=math.pi), uniform(n, k, low=-60.0, high=60.0),
                             uniform(n, k, low=-60.0, high=60.0)], -1),
    )


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """HSV (hue in degrees, saturation and value in [0, 1]) -> RGB in [0, 1], stacked on a new last dimension."""
    hue, saturation, value = torch.broadcast_tensors(hue % 360, saturation, value)
    channel = torch.stack([(5 + hue / 60) % 6, (3 + hue / 60) % 6, (1 + hue / 60) % 6], -1)  # R, G, B
    ramp = torch.minimum(channel, 4 - channel).clamp(0, 1)
    return value[..., None] * (1 - saturation[..., None] * ramp)


def outline_mask(outline: str, a: torch.Tensor, b: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Pixels inside an outline, in its own rotated coordinates (a, b) around its centre."""
    if outline in ("disc", "ring"):  # the ring: the disc without its inner 55%
        d2 = a.square() + b.square()
        inside = d2 < radius.square()
        return inside & (d2 > (0.55 * radius).square()) if outline == "ring" else inside
    if outline == "square":  # about the disc's area
        return torch.maximum(a.abs(), b.abs()) < 0.85 * radius
    if outline != "triangle":
        raise ValueError(f"outline: expected one of {OUTLINES}, got {outline!r}")
    inside = torch.ones_like(a, dtype=torch.bool)  # equilateral: three half-planes, circumradius 1.25 r
    for j in range(3):
        phi = math.pi / 2 + 2 * math.pi * j / 3
        inside &= a * math.cos(phi) + b * math.sin(phi) < 0.625 * radius
    return inside


def material_fill(material: str, dx: torch.Tensor, dy: torch.Tensor, colours: torch.Tensor,
                  pattern: torch.Tensor) -> torch.Tensor:
    """(m, 3, S, S) pixel values of a material at offsets (dx, dy) from the object's centre (image-side units):
    paint, one colour shaded by a gentle gradient (flat: APT merges it); stripes, checks and dots, two colours in a
    pattern of the object's period and angle (busy: APT keeps it fine)."""
    period, angle, gx, gy = (v[:, None, None] for v in pattern.unbind(-1))
    first, second = colours[:, 0, :, None, None], colours[:, 1, :, None, None]
    if material == "paint":
        return first + (gx * dx + gy * dy)[:, None]
    u = (angle.cos() * dx + angle.sin() * dy) / period  # pattern coordinates, in periods
    v = (angle.cos() * dy - angle.sin() * dx) / period
    if material == "stripes":
        weight = 0.5 + 0.5 * torch.sin(2 * math.pi * u)
    elif material == "checks":
        weight = ((u.floor() + v.floor()) % 2).float()
    elif material == "dots":
        weight = ((u - u.floor() - 0.5).square() + (v - v.floor() - 0.5).square() < 0.09).float()
    else:
        raise ValueError(f"material: expected one of {MATERIALS}, got {material!r}")
    return first + (second - first) * weight[:, None]


def render(photos: Sequence[torch.Tensor], scenes: Scenes, size: int, split: str,
           val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterise scenes at `size` x `size` -> uint8 images (N, 3, S, S), int64 labels (N, S, S).

    The background is the scene's crop of its photo, inside the photo's `split` region ("train": the left
    1 - val_fraction of its width, "val": the rest), resampled bilinearly (one grid_sample per photo). Objects are
    tested at pixel centres, so the labels are exact at every resolution.
    """
    n = len(scenes)
    images = torch.empty(n, 3, size, size)
    for p, photo in enumerate(photos):
        index = (scenes.photo == p).nonzero()[:, 0]
        if len(index):
            side, x, y = (scenes.crop[index, 0] * photo.shape[1]), scenes.crop[index, 1], scenes.crop[index, 2]
            images[index] = square_crops(photo, side, x, y, scenes.flip[index], size, split, val_fraction)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    centres = (torch.arange(size) + 0.5) / size
    for slot in range(scenes.active.shape[1]):
        index = scenes.active[:, slot].nonzero()[:, 0]
        cx, cy, radius, angle = (v[:, None, None] for v in scenes.geometry[index, slot].unbind(-1))
        dx, dy = centres.view(1, 1, -1) - cx, centres.view(1, -1, 1) - cy  # (m, 1, S), (m, S, 1)
        a, b = angle.cos() * dx + angle.sin() * dy, angle.cos() * dy - angle.sin() * dx
        mask = torch.zeros(len(index), size, size, dtype=torch.bool)
        for o, outline in enumerate(OUTLINES):
            group = (scenes.outline[index, slot] == o).nonzero()[:, 0]
            mask[group] = outline_mask(outline, a[group], b[group], radius[group])
        fill = torch.empty(len(index), 3, size, size)
        material = scenes.material[index, slot]
        for m, name in enumerate(MATERIALS):
            group = (material == m).nonzero()[:, 0]
            fill[group] = material_fill(name, dx[group], dy[group], scenes.colours[index[group], slot],
                                        scenes.pattern[index[group], slot])
        images[index] = torch.where(mask[:, None], fill, images[index])
        labels[index] = torch.where(mask, scenes.label[index, slot, None, None], labels[index])
    return images.round_().clamp_(0, 255).to(torch.uint8), labels


@dataclass
class SegSet:
    """Scenes rasterised at one resolution: uint8 images and their exact labels."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N, S, S) int64

    def __len__(self) -> int:
        return self.labels.shape[0]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the models' input (mean / std 0.5: [-1, 1])."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def apt_fields(settings: SegSettings, key: str) -> dict[str, Any]:
    """The APT fields of the "apt" rows (`scorer`, `thresholds`) or of the "alt" rows (`alt_scorer`, ...)."""
    prefix = "alt_" if key == "alt" else ""
    return {"num_scales": settings.num_scales, "scorer": getattr(settings, f"{prefix}scorer"),
            "thresholds": getattr(settings, f"{prefix}thresholds")}


def layout_for(images: torch.Tensor, patch_size: int, fields: dict[str, Any]) -> PatchLayout:
    """The layout the APT processor gives these 8-bit images (`compute_layout`, as AptImageProcessor scores)."""
    return compute_layout(images, patch_size, fields["num_scales"], fields["thresholds"], fields["scorer"])


def model_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each model takes: dense pixels (stock), or APT's packed batch with the layout of the model's own APT
    fields (what its processor would give)."""
    pixels = normalise(images)
    if not isinstance(model, AptUperNetForSemanticSegmentation):
        return {"pixel_values": pixels}
    config = model.config.backbone_config
    patch = int(config.patch_size)
    layout = layout_for(images, patch, {k: getattr(config, k) for k in ("num_scales", "thresholds", "scorer")})
    return {"pixel_values": pack_base_patches(pixels, layout, patch), **layout.as_dict()}


def tokens_kept(data: SegSet, patch_size: int, fields: dict[str, Any]) -> float:
    """Tokens the APT backbone runs per image, as a fraction of the stock backbone's."""
    layout = layout_for(data.images, patch_size, fields)
    return float(layout.tokens_per_image.sum() / layout.image_grid_hw.prod(-1).sum())


def edge_share(data: SegSet, patch_size: int, fields: dict[str, Any]) -> float:
    """Of the tokens APT merges, the share whose block holds more than one label: an object's edge that the merged
    token can no longer place finer than its own size."""
    layout = layout_for(data.images, patch_size, fields)
    merged = layout.patch_scales > 0
    if not bool(merged.any()):
        return 0.0
    straddles = torch.zeros_like(merged)
    for s in range(1, int(layout.patch_scales.max()) + 1):
        side = patch_size << s
        blocks = data.labels.unfold(1, side, side).unfold(2, side, side).flatten(-2)  # (N, rows, cols, side**2)
        mixed = blocks.amax(-1) != blocks.amin(-1)
        token = (layout.patch_scales == s).nonzero()[:, 0]
        rows, cols = (layout.patch_positions[token] >> s).unbind(-1)
        straddles[token] = mixed[layout.image_of_token[token], rows, cols]
    return float(straddles[merged].float().mean())


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def upernet_config(settings: SegSettings) -> UperNetConfig:
    """The stock model's config: a DINOv2 backbone (MLP 4x, no dropout, sdpa) whose every layer feeds UperNet (at
    most the last four), position table for the first resolution (DINOv2 interpolates it for the others)."""
    layers = settings.layers
    backbone = Dinov2Config(hidden_size=settings.hidden_size, num_hidden_layers=layers,
                            num_attention_heads=settings.heads, patch_size=settings.patch_size,
                            image_size=settings.image_sizes[0], out_indices=list(range(max(1, layers - 3), layers + 1)),
                            reshape_hidden_states=True, apply_layernorm=True, attn_implementation="sdpa")
    return UperNetConfig(backbone_config=backbone, hidden_size=settings.head_channels, num_labels=len(CLASSES),
                         use_auxiliary_head=False)


def build_stock_model(settings: SegSettings, seed: int) -> UperNetForSemanticSegmentation:
    """transformers' own UperNet on a DINOv2 backbone, randomly initialised from `seed`."""
    torch.manual_seed(seed)
    return UperNetForSemanticSegmentation(upernet_config(settings))


def convert(stock: UperNetForSemanticSegmentation, settings: SegSettings, key: str = "apt",
            resizing: bool = False) -> AptUperNetForSemanticSegmentation:
    """The stock model converted to APT with the fields of `key` ("apt" or "alt"; a copy: the stock model is
    untouched). `resizing`: the paper's Resizing baseline, APT's layout with E(Resize(P)) alone: the detail branch
    (merge conv, zero-MLP) frozen, so the zero-MLP stays zero through fine-tuning and adds nothing."""
    apt = apt_hf.convert(copy.deepcopy(stock), **apt_fields(settings, key), image_mean=MEAN, image_std=STD)
    if resizing:
        for param in apt.apt_parameters():
            param.requires_grad_(False)
    return apt


# ----------------------------------------------------------------------------------------------------------------
# Training, evaluation, timing
# ----------------------------------------------------------------------------------------------------------------


def epoch_batches(sets: Sequence[SegSet], batch_size: int,
                  generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch: every set's images shuffled into batches of one resolution, the batches of all sets interleaved in
    random order, each image mirrored with probability 1/2 (labels with it)."""
    batches = [(data, index) for data in sets
               for index in torch.randperm(len(data), generator=generator).split(batch_size)]
    for b in torch.randperm(len(batches), generator=generator).tolist():
        data, index = batches[b]
        flip = torch.rand(len(index), generator=generator) < 0.5
        images, labels = data.images[index], data.labels[index]
        images[flip], labels[flip] = images[flip].flip(-1), labels[flip].flip(-1)
        yield images, labels


def train(model: nn.Module, sets: Sequence[SegSet], epochs: int, lr: float, settings: SegSettings, seed: int,
          desc: str) -> list[float]:
    """`fit` for `epochs` over `sets`; returns the losses.

    The same loop trains the stock model and fine-tunes every row: with the same seed, every row sees the same
    batches in the same order, so rows differ only in the model.
    """
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * sum(math.ceil(len(d) / settings.batch_size) for d in sets)
    batches = ((model_inputs(model, images), labels) for _ in range(epochs)
               for images, labels in epoch_batches(sets, settings.batch_size, generator))
    return fit(model, batches, steps, lr, settings.weight_decay, desc)


@torch.inference_mode()
def evaluate(model: nn.Module, data: SegSet, batch_size: int = 32) -> dict[str, Any]:
    """aAcc and mIoU (%) on `data`: per-class intersections and unions accumulated over every validation pixel (as
    mmsegmentation does), classes absent from both labels and predictions left out of the mean."""
    model.eval()
    classes = len(CLASSES)
    confusion = torch.zeros(classes * classes, dtype=torch.long)
    for index in torch.arange(len(data)).split(batch_size):
        logits = model(**model_inputs(model, data.images[index])).logits
        confusion += torch.bincount((data.labels[index] * classes + logits.argmax(1)).flatten(),
                                    minlength=classes * classes)
    confusion = confusion.view(classes, classes)  # rows: label, columns: prediction
    hits = confusion.diagonal().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diagonal()
    iou = hits / union.clamp(min=1)
    return {"aAcc": 100 * float(hits.sum() / confusion.sum()), "mIoU": 100 * float(iou[union > 0].mean()),
            "IoU": {name: 100 * float(v) for name, v in zip(CLASSES, iou, strict=True)}}


def measure_speed(models: dict[str, nn.Module], images: torch.Tensor, settings: SegSettings) -> dict[str, float]:
    """Images/s of each model on the same images (`images_per_second`)."""
    inputs = {name: model_inputs(model, images) for name, model in models.items()}
    return images_per_second(models, inputs, len(images), settings.repeats, settings.clock)


def ideal_speedup(stock: UperNetForSemanticSegmentation, images: torch.Tensor, fields: dict[str, Any]) -> float:
    """Stock / APT FLOPs on `images`: the backbone from token counts (`apt_hf.flops`), plus the head's, which is the
    same in both (counted once, on the stock model)."""
    backbone = stock.config.backbone_config
    layout = layout_for(images, int(backbone.patch_size), fields)
    rows, cols = (int(v) for v in layout.image_grid_hw[0])
    head = head_flops(stock, normalise(images))
    return ((dinov2_flops(backbone, uniform_layout(len(images), rows, cols), apt=False) + head)
            / (dinov2_flops(backbone, layout, apt=True) + head))


# ----------------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------------


def training_sets(photos: Sequence[torch.Tensor], settings: SegSettings, seed: int) -> list[SegSet]:
    """The seed's training scenes, split evenly over the resolutions (each scene rasterised at one of them)."""
    scenes = draw_scenes(settings.train_images, len(photos), settings, torch.Generator().manual_seed(1000 + seed))
    parts = torch.arange(len(scenes)).tensor_split(len(settings.image_sizes))
    return [SegSet(*render(photos, scenes.take(part), size, "train", settings.val_fraction))
            for part, size in zip(parts, settings.image_sizes, strict=True)]


def row_name(key: str, settings: SegSettings) -> str:
    """A row's name, with its scorer where it has one."""
    scorer = apt_fields(settings, APT_ROWS[key])["scorer"] if key in APT_ROWS else ""
    epochs = settings.finetune_epochs
    return ROW_NAMES[key].format(scorer=scorer, epochs=f"{epochs} epoch{'s' * (epochs > 1)}")


def run_seed(seed: int, photos: Sequence[torch.Tensor], val: dict[int, SegSet],
             settings: SegSettings) -> dict[str, Any]:
    """One seed: train the stock model, then every row; aAcc / mIoU at each resolution and images/s of each model."""
    train_sets = training_sets(photos, settings, seed)
    stock = build_stock_model(settings, seed)
    losses = train(stock, train_sets, settings.stock_epochs, settings.lr, settings, seed,
                   desc=f"seed {seed}: stock")
    models: dict[str, nn.Module] = {"stock": stock}
    metrics: dict[str, dict[int, dict[str, Any]]] = {"stock": {s: evaluate(stock, d) for s, d in val.items()}}
    finetune: dict[str, nn.Module] = {}
    if settings.stock_control:
        finetune["stock_ft"] = copy.deepcopy(stock)
    if settings.resizing:
        finetune["resizing"] = convert(stock, settings, resizing=True)
    for key in ("apt", "alt") if settings.alt_scorer != "none" else ("apt",):
        finetune[key] = convert(stock, settings, key)
        metrics[f"{key}_converted"] = {s: evaluate(finetune[key], d) for s, d in val.items()}
    for key, model in finetune.items():
        # the same batches for every row (generator seeded by the seed alone), none of them the stock's order
        train(model, train_sets, settings.finetune_epochs, settings.finetune_lr, settings, 2000 + seed,
              desc=f"seed {seed}: {row_name(key, settings)}")
        metrics[key] = {s: evaluate(model, d) for s, d in val.items()}
        models[key] = model
    timed_models = {k: m for k, m in models.items() if k != "stock_ft"}  # the control is the stock architecture
    speed = {s: measure_speed(timed_models, d.images[: settings.timing_images], settings) for s, d in val.items()}
    return {"seed": seed, "stock_final_loss": statistics.fmean(losses[-20:]), "metrics": metrics,
            "images_per_second": speed}


def summarise(per_seed: list[dict[str, Any]], val: dict[int, SegSet], settings: SegSettings,
              stock: UperNetForSemanticSegmentation) -> list[dict[str, Any]]:
    """One row per (model, resolution): mean and std over seeds of aAcc, mIoU, images/s and speedup."""
    order = ("stock", "stock_ft", "resizing", "apt_converted", "apt", "alt_converted", "alt")
    rows = []
    for size, data in val.items():
        timing = data.images[: settings.timing_images]
        kept, ideal, edges = {}, {}, {}
        for key in ("apt", "alt") if settings.alt_scorer != "none" else ("apt",):
            kept[key] = tokens_kept(data, settings.patch_size, apt_fields(settings, key))
            ideal[key] = ideal_speedup(stock, timing, apt_fields(settings, key))
            edges[key] = edge_share(data, settings.patch_size, apt_fields(settings, key))
        for key in (k for k in order if k in per_seed[0]["metrics"]):
            fields_key = APT_ROWS.get(key)
            row: dict[str, Any] = {"row": key, "name": row_name(key, settings), "resolution": size,
                                   "tokens_kept": kept[fields_key] if fields_key else 1.0,
                                   "merged_on_edges": edges[fields_key] if fields_key else 0.0,
                                   "ideal_speedup": ideal[fields_key] if fields_key else 1.0,
                                   "epochs": settings.finetune_epochs if key in FINETUNED else 0}
            for metric in ("aAcc", "mIoU"):
                values = [r["metrics"][key][size][metric] for r in per_seed]
                row.update({metric: values, f"{metric}_mean": statistics.fmean(values), f"{metric}_std": std(values)})
            timed_key = key.removesuffix("_converted")  # the same model before and after its epoch
            if timed_key in per_seed[0]["images_per_second"][size]:
                speed = [r["images_per_second"][size][timed_key] for r in per_seed]
                ratio = [r["images_per_second"][size][timed_key] / r["images_per_second"][size]["stock"]
                         for r in per_seed]
                row.update(images_per_second=speed, images_per_second_mean=statistics.fmean(speed),
                           images_per_second_std=std(speed), speedup=ratio, speedup_mean=statistics.fmean(ratio),
                           speedup_std=std(ratio))
            rows.append(row)
    return rows


def verdict(rows: list[dict[str, Any]], per_seed: list[dict[str, Any]], settings: SegSettings) -> str:
    """What reproduced: each fine-tuned APT row's mIoU against the stock model's (and the control's), APT's against
    Resizing's, as paired per-seed differences (the rows of a seed share its stock model), and the speedups."""
    lines = []
    for size in dict.fromkeys(r["resolution"] for r in rows):
        by = {r["row"]: r for r in rows if r["resolution"] == size}
        for key in (k for k in ("apt", "alt") if k in by):
            parts = []
            for other, label in (("stock", "Stock"), ("stock_ft", "control"), ("resizing", "Resizing")):
                if other in by and not (other == "resizing" and key == "alt"):
                    diffs = [r["metrics"][key][size]["mIoU"] - r["metrics"][other][size]["mIoU"] for r in per_seed]
                    parts.append(f"{label} {statistics.fmean(diffs):+.2f} ± {std(diffs):.2f}")
            apt = by[key]
            lines.append(f"- {size} px, {row_name(key, settings)}: mIoU vs {', vs '.join(parts)}; "
                         f"{100 * (1 - apt['tokens_kept']):.0f}% fewer tokens ({100 * apt['merged_on_edges']:.0f}% of "
                         f"the merged ones straddle an object's edge), {100 * (apt['speedup_mean'] - 1):+.0f}% img/s "
                         f"measured ({100 * (apt['ideal_speedup'] - 1):+.0f}% ideal)")
    return "\n".join(lines)


def paper_table() -> str:
    """Table 5's numbers (EVA-02-L + UperNet, ADE20K), for the reader to set beside ours."""
    lines = ["| paper, EVA-02-L + UperNet, ADE20K | res | img/s | speedup | aAcc | mIoU |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for size, table in PAPER_TABLE_5.items():
        base = table["stock"][0]
        for key, (speed, acc, miou) in table.items():
            name = {"stock": "EVA-02-L", "resizing": "Resizing", "apt": "APT"}[key]
            speedup = "—" if key == "stock" else f"{100 * (speed / base - 1):+.0f}%"
            lines.append(f"| {name} | {size} | {speed:.2f} | {speedup} | {acc:.2f} | {miou:.2f} |")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]], settings: SegSettings) -> str:
    """The results as a markdown table, Table 5's columns plus tokens kept and the ideal speedup."""
    lines = ["| model | res | tokens kept | img/s | speedup | ideal | aAcc | mIoU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "images_per_second_mean" in r:
            speed = f"{r['images_per_second_mean']:.0f} ± {r['images_per_second_std']:.0f}"
            speedup = ("—" if r["row"] == "stock" else
                       f"{100 * (r['speedup_mean'] - 1):+.0f}% ± {100 * r['speedup_std']:.0f}")
        else:
            speed, speedup = "(as stock)", "—"
        ideal = "—" if r["row"] in ("stock", "stock_ft") else f"{100 * (r['ideal_speedup'] - 1):+.0f}%"
        lines.append(f"| {r['name']} | {r['resolution']} | {100 * r['tokens_kept']:.0f}% | {speed} | {speedup} | "
                     f"{ideal} | {r['aAcc_mean']:.2f} ± {r['aAcc_std']:.2f} | {r['mIoU_mean']:.2f} ± "
                     f"{r['mIoU_std']:.2f} |")
    n = len(settings.seeds)
    lines += ["", f"Mean ± std over {n} seed{'s' * (n > 1)} ({', '.join(map(str, settings.seeds))}); aAcc and mIoU "
              f"in % on the validation scenes; tokens kept: over the validation scenes; speedup: images/s against the "
              f"stock model's, measured in the same run; ideal: FLOP ratio (backbone + head). Converted rows are the "
              f"fine-tuned model before its epoch (same speed)."]
    return "\n".join(lines)


def run(settings: SegSettings, output_dir: str | Path | None = None) -> dict[str, Any]:
    """The whole experiment; writes results.json and results.md to `output_dir` when given."""
    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    photos = load_class_photos(settings.photo_side)
    scenes = draw_scenes(settings.val_images, len(photos), settings, torch.Generator().manual_seed(0))
    scenes.flip.fill_(1.0)  # validation crops are not mirrored
    val = {size: SegSet(*render(photos, scenes, size, "val", settings.val_fraction)) for size in settings.image_sizes}
    per_seed = [run_seed(seed, photos, val, settings) for seed in tqdm(settings.seeds, desc="seeds", unit="seed")]
    rows = summarise(per_seed, val, settings, build_stock_model(settings, settings.seeds[0]))
    wall = time.perf_counter() - start
    where = f"{machine('cpu')}; torch {torch.__version__}, transformers {transformers.__version__}"
    results = {"settings": asdict(settings), "classes": list(CLASSES),
               "photos": [Path(n).stem for n in PHOTO_CLASSES], "rows": rows, "per_seed": per_seed,
               "wall_seconds": wall, "machine": where, "verdict": verdict(rows, per_seed, settings),
               "paper": {str(k): v for k, v in PAPER_TABLE_5.items()}}
    sizes = " and ".join(f"{s} px" for s in settings.image_sizes)
    scorers = [apt_fields(settings, k) for k in ("apt", "alt") if k == "apt" or settings.alt_scorer != "none"]
    markdown = "\n\n".join([
        f"## Table 5 in miniature: {len(CLASSES)}-class segmentation of painted objects on photographs, UperNet "
        f"({settings.head_channels} channels) on a DINOv2-shaped ViT ({settings.hidden_size} wide, {settings.layers} "
        f"layers, patch {settings.patch_size}) at {sizes}; APT S={settings.num_scales}, "
        + " and ".join(f"{f['scorer']} {f['thresholds']}" for f in scorers),
        format_table(rows, settings), results["verdict"], paper_table(),
        f"{settings.train_images} training scenes ({settings.stock_epochs} epochs, then {settings.finetune_epochs} for "
        f"each fine-tuned row), {settings.val_images} validation scenes at each resolution; {wall / 60:.1f} min on "
        f"{where}; speed: best of {settings.repeats} ({settings.clock} clock), "
        f"{min(settings.timing_images, settings.val_images)} images per batch.",
    ])
    write_results(output_dir, results, markdown)
    return results


def parse_args(argv: Sequence[str] | None = None) -> tuple[SegSettings, str | None]:
    return settings_from_args(SegSettings, argv, "segmentation_mini.py", __doc__, presets={"toy": TOY})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings, output_dir = parse_args(argv)
    return run(settings, output_dir)


if __name__ == "__main__":
    main()
