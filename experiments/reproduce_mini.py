"""The paper's claims in miniature, on a CPU: train a stock ViT, convert it, heal it in one epoch, ablate the embedding.

    python scripts/reproduce_mini.py --output_dir outputs/reproduce_mini        # ~10 min on 2 cores (limit: 15)

The task is real photographs that ship inside scikit-image: "which photograph does this small crop come from?".
Crops are small (default 20-40 px of a photo scaled to 160 px on its short side), resized up to the model's input,
flipped and colour-jittered; validation crops come from a held-out strip of every photo (its right 30%), the same
crops for every seed. A small stock ViT is trained from scratch on it, then converted to APT and compared in
Table 7's terms, every APT row fine-tuned the same way (one epoch, all weights):

- Base: the stock model (and, as a control, the stock model after the same extra epoch: what the epoch alone buys);
- Zero (ours): E(Resize(P)) + ZeroMLP(Conv^s(E(sub-patches))), right after conversion and after one epoch;
- Resize: E(Resize(P)) alone, no detail branch;
- Residual: E(Resize(P)) + Conv^s(E(sub-patches)), no MLP;
- NonZero: the MLP at PyTorch's default (non-zero) init.

The variants are made by editing a converted model's embedding module (`apply_variant`), not by config fields: they
are ablations, not settings a checkpoint should carry. Each row is mean +- std over seeds (a seed fixes the stock
model's init, the training crops and their order, and NonZero's init). Speed is inference images/s of each model on
the same validation batch, in the same run as the stock model, beside the ideal (FLOP-ratio) speedup.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

from apt_hf.flops import vision_flops
from apt_hf.image_processing_apt import AptImageProcessorPil
from apt_hf.modeling_apt import AptPatchEmbeddings
from apt_hf.modeling_apt_vit import AptViTForImageClassification
from apt_hf.patchify import PatchLayout, select_images, uniform_layout, unpack_base_patches
from apt_hf.sample_images import load_photos

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

# Photographs (and a few photographed textures and scans) in scikit-image's data folder; the synthetic images
# (chessboard, colour wheel, logo, phantom, ...) and motorcycle_right (a near copy of motorcycle_left) are left out.
PHOTO_CLASSES = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                 "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
                 "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")
VARIANTS = ("zero", "resize", "residual", "nonzero")
ROW_NAMES = {"base": "Base (stock ViT)", "base_ft": "Base + fine-tune (control)", "zero": "Zero (ours)",
             "resize": "Resize", "residual": "Residual", "nonzero": "NonZero"}
ROW_ORDER = ("base", "base_ft", "zero", "resize", "residual", "nonzero")
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
PAPER_ORDERING = ("Paper, Table 7: the zero-initialised MLP (Zero) is the best embedding after fine-tuning; Resize, "
                  "Residual and NonZero are below it. (Its numbers could not be retrieved offline, so only that "
                  "ordering is quoted.)")


@dataclass
class MiniSettings(TrainingSettings):
    """Every knob of the experiment (the CLI's flags); the defaults are the README's run."""

    image_size: int = 64
    patch_size: int = 8
    num_scales: int = 3
    thresholds: list[float] = field(default_factory=lambda: [5.0, 3.5])
    photo_side: int = 160
    crop_min: int = 20
    crop_max: int = 40
    val_fraction: float = 0.3
    jitter: float = 0.3
    train_per_class: int = 160
    val_per_class: int = 100
    layers: int = 6
    stock_epochs: int = 8
    base_control: bool = True
    timing_images: int = 256
    repeats: int = 5

    def validate(self) -> None:
        super().validate()
        require_positive(self, ("image_size", "patch_size", "num_scales", "photo_side", "crop_min", "train_per_class",
                                "val_per_class"))
        if self.image_size % (self.patch_size << (self.num_scales - 1)):
            raise ValueError(f"image_size: expected a multiple of patch_size * 2**(num_scales - 1) = "
                             f"{self.patch_size << (self.num_scales - 1)} so that every scale can merge, got "
                             f"{self.image_size}")
        if len(self.thresholds) != self.num_scales - 1:
            raise ValueError(f"thresholds: expected {self.num_scales - 1} values (num_scales - 1), got "
                             f"{self.thresholds}")
        if not self.crop_min <= self.crop_max <= self.photo_side:
            raise ValueError(f"crop_min / crop_max: expected crop_min <= crop_max <= photo_side={self.photo_side}, "
                             f"got {self.crop_min} / {self.crop_max}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction: expected a fraction in (0, 1), got {self.val_fraction}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter: expected a colour-jitter strength in [0, 1), got {self.jitter}")


# ----------------------------------------------------------------------------------------------------------------
# The task: which photograph a small crop comes from
# ----------------------------------------------------------------------------------------------------------------


def load_class_photos(photo_side: int) -> list[torch.Tensor]:
    """The class photographs as uint8 (3, H, W) tensors, short side scaled (antialiased) to `photo_side`."""
    from PIL import Image

    photos = []
    for image in load_photos(PHOTO_CLASSES).values():
        scale = photo_side / min(image.size)
        size = (max(photo_side, round(image.width * scale)), max(photo_side, round(image.height * scale)))
        resized = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
        photos.append(torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
                      .view(size[1], size[0], 3).permute(2, 0, 1).contiguous())
    return photos


def sample_crops(
    photos: Sequence[torch.Tensor],
    per_class: int,
    settings: MiniSettings,
    generator: torch.Generator,
    split: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` square crops of every photo -> uint8 (N, 3, S, S) images at the model's input size, labels (N,).

    Crops of side U[crop_min, crop_max] lie inside the photo's `split` region ("train": the left 1 - val_fraction of
    its width, "val": the rest), resampled bilinearly to image_size. Training crops are also flipped and jittered
    (brightness, contrast, saturation). One grid_sample per photo: no loop over crops or pixels.
    """
    size = settings.image_size
    images, labels = [], []
    for label, photo in enumerate(photos):
        side = torch.empty(per_class).uniform_(settings.crop_min, settings.crop_max, generator=generator)
        x, y = torch.rand(per_class, generator=generator), torch.rand(per_class, generator=generator)
        flip = torch.ones(per_class)
        if split == "train":
            flip = torch.where(torch.rand(per_class, generator=generator) < 0.5, -1.0, 1.0)
        crops = square_crops(photo, side, x, y, flip, size, split, settings.val_fraction)
        if split == "train" and settings.jitter > 0:
            crops = _colour_jitter(crops, settings.jitter, generator)
        images.append(crops.round_().clamp_(0, 255).to(torch.uint8))
        labels.append(torch.full((per_class,), label, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def square_crops(photo: torch.Tensor, side: torch.Tensor, x: torch.Tensor, y: torch.Tensor, flip: torch.Tensor,
                 size: int, split: str, val_fraction: float) -> torch.Tensor:
    """Square crops of a uint8 (3, H, W) photo, resampled bilinearly to `size` -> float (n, 3, size, size) in 0..255.

    Crops lie inside the photo's `split` region ("train": the left 1 - val_fraction of its width, "val": the rest), so
    training and validation never share pixels. `side` is in pixels (clamped to the region), `x` / `y` in [0, 1] of
    the free range, `flip` -1 mirrors. One grid_sample for all crops: no loop over crops or pixels.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    n = len(side)
    _, h, w = photo.shape
    cut = int(w * (1 - val_fraction))
    x_lo, x_hi = (0, cut) if split == "train" else (cut, w)
    side = side.clamp(max=min(x_hi - x_lo, h))
    x0, y0 = x_lo + x * (x_hi - x_lo - side), y * (h - side)
    theta = torch.zeros(n, 2, 3)  # output [-1, 1] -> input normalised coords (align_corners=False)
    theta[:, 0, 0] = flip * side / w
    theta[:, 0, 2] = (2 * x0 + side) / w - 1
    theta[:, 1, 1] = side / h
    theta[:, 1, 2] = (2 * y0 + side) / h - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(photo.float().expand(n, -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def _colour_jitter(crops: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-crop brightness, contrast and saturation factors in [1 - strength, 1 + strength] (0..255 floats)."""
    n = crops.shape[0]

    def factor() -> torch.Tensor:
        return torch.empty(n, 1, 1, 1).uniform_(1 - strength, 1 + strength, generator=generator)

    crops = crops * factor()
    gray = (0.299 * crops[:, :1] + 0.587 * crops[:, 1:2] + 0.114 * crops[:, 2:]).clamp(0, 255)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    crops = mean + (crops - mean) * factor()
    return (gray + (crops - gray) * factor()).clamp(0, 255)


@dataclass
class EncodedSet:
    """A set of crops as both models see them: APT's packed batch (the processor's output) and the same pixels dense."""

    dense: torch.Tensor  # (N, 3, S, S), exactly the pixels of the packed patches
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None  # packed base patches (sum of cells, 3, p, p); None: stock model only
    layout: PatchLayout | None = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def packed(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.layout is None:
            raise ValueError("data: this set has dense pixels only (stock training data); encode() it for APT")
        pixels, layout = select_images(self.pixel_values, self.layout, index)
        return {"pixel_values": pixels, **layout.as_dict()}

    def tokens_kept(self) -> float:
        """Tokens the APT model runs per image, as a fraction of the stock model's."""
        return float(self.layout.tokens_per_image.sum() / self.layout.image_grid_hw.prod(-1).sum())


def make_processor(settings: MiniSettings) -> AptImageProcessorPil:
    """The APT processor for crops already at the model's size: no resize or crop, just score, select and pack."""
    return AptImageProcessorPil(do_resize=False, do_center_crop=False, image_mean=MEAN, image_std=STD,
                                patch_size=settings.patch_size, num_scales=settings.num_scales,
                                thresholds=settings.thresholds)


def encode(images: torch.Tensor, labels: torch.Tensor, processor: AptImageProcessorPil) -> EncodedSet:
    """Run the APT processor once over uint8 (N, 3, S, S) crops; the stock model gets the same pixels, unpacked."""
    out = processor(images, return_tensors="pt")
    layout = PatchLayout.from_inputs(out)
    dense = torch.stack(unpack_base_patches(out["pixel_values"], layout))
    return EncodedSet(dense, labels, out["pixel_values"], layout)


def dense_set(images: torch.Tensor, labels: torch.Tensor) -> EncodedSet:
    """uint8 crops normalised for the stock model alone (its training epochs: no layout needed, no processor)."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return EncodedSet((images.float() / 255 - mean) / std, labels)


# ----------------------------------------------------------------------------------------------------------------
# Models and the Table 7 variants
# ----------------------------------------------------------------------------------------------------------------


def vit_config(settings: MiniSettings, num_labels: int) -> ViTConfig:
    """The stock ViT's config: `hidden_size` wide, `layers` deep, MLP 4x, no dropout, sdpa attention."""
    return ViTConfig(image_size=settings.image_size, patch_size=settings.patch_size,
                     hidden_size=settings.hidden_size, num_hidden_layers=settings.layers,
                     num_attention_heads=settings.heads, intermediate_size=4 * settings.hidden_size,
                     num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation="sdpa")


def build_stock_model(settings: MiniSettings, num_labels: int, seed: int) -> ViTForImageClassification:
    """A small stock ViT classifier (transformers' own class), randomly initialised from `seed`."""
    torch.manual_seed(seed)
    return ViTForImageClassification(vit_config(settings, num_labels))


class _NoDetail(nn.Module):
    """Stands in for the zero-MLP when the detail branch is removed: adds nothing, learns nothing."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.dim)


def apply_variant(model: AptViTForImageClassification, variant: str, seed: int = 0) -> AptViTForImageClassification:
    """Turn a freshly converted APT classifier into one of Table 7's embedding variants, in place.

    zero: as converted (ZeroMLP weight and bias zero). resize: the detail branch removed, so a merged token is
    E(Resize(P)) only (neither the conv nor the MLP runs). residual: the MLP removed, Conv^s(E(sub-patches)) added
    directly. nonzero: the MLP re-initialised as PyTorch's default nn.Linear, from `seed`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    embeddings = model.vit.embeddings
    if not isinstance(embeddings, AptPatchEmbeddings):
        raise ValueError(f"model: expected an APT model (AptPatchEmbeddings), got {type(embeddings).__name__}")
    dim = model.config.hidden_size
    if variant == "resize":
        embeddings.merge_conv = nn.Identity()
        embeddings.zero_mlp = _NoDetail(dim)
    elif variant == "residual":
        embeddings.zero_mlp = nn.Identity()
    elif variant == "nonzero":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            embeddings.zero_mlp.reset_parameters()
    return model


def convert(stock: ViTForImageClassification, settings: MiniSettings, variant: str,
            seed: int = 0) -> AptViTForImageClassification:
    """The stock classifier converted to APT (a copy; the stock model is untouched), then made into `variant`."""
    apt = AptViTForImageClassification.from_vit(copy.deepcopy(stock), num_scales=settings.num_scales,
                                                thresholds=settings.thresholds, image_mean=MEAN, image_std=STD,
                                                attn_implementation="sdpa")
    return apply_variant(apt, variant, seed)


# ----------------------------------------------------------------------------------------------------------------
# Training, evaluation, timing
# ----------------------------------------------------------------------------------------------------------------


def _batch(model: nn.Module, data: EncodedSet, index: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(model, AptViTForImageClassification):
        return data.packed(index)
    return {"pixel_values": data.dense[index]}


def train(
    model: nn.Module,
    epochs: list[EncodedSet],
    lr: float,
    settings: MiniSettings,
    seed: int,
    desc: str,
) -> list[float]:
    """AdamW (cosine schedule, 5% warm-up, grad-norm clip 1) over one EncodedSet per epoch; returns the losses.

    The same loop trains the stock model and fine-tunes every row: with the same seed, every row sees the same
    batches in the same order, so rows differ only in the model.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = [(data, index) for data in epochs
               for index in torch.randperm(len(data), generator=generator).split(settings.batch_size)]
    return fit(model, ((_batch(model, data, index), data.labels[index]) for data, index in batches), len(batches),
               lr, settings.weight_decay, desc)


@torch.inference_mode()
def evaluate(model: nn.Module, data: EncodedSet, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) on `data`."""
    model.eval()
    correct = 0
    for index in torch.arange(len(data)).split(batch_size):
        logits = model(**_batch(model, data, index)).logits
        correct += int((logits.argmax(-1) == data.labels[index]).sum())
    return 100.0 * correct / len(data)


def timing_index(data: EncodedSet, count: int) -> torch.Tensor:
    """A fixed timing batch: `count` crops spread evenly over the (class-ordered) set, so every class is in it,
    sorted by APT length (a length-grouped batch: per-image attention then runs over few distinct lengths)."""
    index = torch.linspace(0, len(data) - 1, min(count, len(data))).round().long().unique()
    return index[torch.argsort(data.layout.tokens_per_image[index], stable=True)]


def measure_speed(models: dict[str, nn.Module], data: EncodedSet, index: torch.Tensor,
                  settings: MiniSettings) -> dict[str, float]:
    """Images/s of each model on the same crops (`images_per_second`)."""
    inputs = {name: _batch(model, data, index) for name, model in models.items()}
    return images_per_second(models, inputs, len(index), settings.repeats, settings.clock)


def ideal_speedup(config: ViTConfig, data: EncodedSet, index: torch.Tensor) -> float:
    """Stock / APT multiply-accumulates on the timing batch, from token counts (as `benchmark.py vision`)."""
    _, layout = select_images(data.pixel_values, data.layout, index)
    rows, cols = (int(v) for v in layout.image_grid_hw[0])
    uniform = uniform_layout(len(index), rows, cols)
    return vision_flops(config, uniform, apt=False) / vision_flops(config, layout, apt=True)


# ----------------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------------


def run_seed(seed: int, photos: list[torch.Tensor], val: EncodedSet, settings: MiniSettings,
             processor: AptImageProcessorPil) -> dict[str, Any]:
    """One seed: train the stock model, then every row; accuracies and images/s of each."""
    generator = torch.Generator().manual_seed(1000 + seed)

    def crops() -> tuple[torch.Tensor, torch.Tensor]:
        return sample_crops(photos, settings.train_per_class, settings, generator, "train")

    stock = build_stock_model(settings, len(photos), seed)
    stock_losses = train(stock, [dense_set(*crops()) for _ in range(settings.stock_epochs)], settings.lr, settings,
                         seed, desc=f"seed {seed}: stock ViT")
    # fresh crops (not seen by the stock model), the same for every row
    finetune = [encode(*crops(), processor) for _ in range(settings.finetune_epochs)]
    result: dict[str, Any] = {"seed": seed, "stock_final_loss": statistics.fmean(stock_losses[-20:]),
                              "top1": {"base": evaluate(stock, val)}, "top1_converted": {}, "train_tokens_kept":
                              statistics.fmean(d.tokens_kept() for d in finetune)}
    models: dict[str, nn.Module] = {"base": stock}
    if settings.base_control:
        control = copy.deepcopy(stock)
        train(control, finetune, settings.finetune_lr, settings, seed, desc=f"seed {seed}: base + 1 epoch")
        result["top1"]["base_ft"] = evaluate(control, val)
        models["base_ft"] = control
    for variant in VARIANTS:
        apt = convert(stock, settings, variant, seed)
        result["top1_converted"][variant] = evaluate(apt, val)
        train(apt, finetune, settings.finetune_lr, settings, seed, desc=f"seed {seed}: {variant}")
        result["top1"][variant] = evaluate(apt, val)
        models[variant] = apt
    index = timing_index(val, settings.timing_images)
    result["images_per_second"] = measure_speed(models, val, index, settings)
    return result


def summarise(per_seed: list[dict[str, Any]], val: EncodedSet, settings: MiniSettings,
              stock_config: ViTConfig) -> list[dict[str, Any]]:
    """One row per Table 7 entry: mean and std over seeds of top-1 (after conversion and after the epoch) and speed."""
    index = timing_index(val, settings.timing_images)
    ideal = ideal_speedup(stock_config, val, index)
    kept = val.tokens_kept()
    rows = []
    for key in ROW_ORDER:
        if key not in per_seed[0]["top1"]:
            continue
        apt = key in VARIANTS
        top1 = [r["top1"][key] for r in per_seed]
        speed = [r["images_per_second"][key] / r["images_per_second"]["base"] for r in per_seed]
        row = {"row": key, "name": ROW_NAMES[key], "top1_mean": statistics.fmean(top1), "top1_std": std(top1),
               "top1": top1, "tokens_kept": kept if apt else 1.0, "speedup_mean": statistics.fmean(speed),
               "speedup_std": std(speed), "ideal_speedup": ideal if apt else 1.0,
               "epochs": 0 if key == "base" else settings.finetune_epochs}
        if apt:
            converted = [r["top1_converted"][key] for r in per_seed]
            row.update(top1_converted_mean=statistics.fmean(converted), top1_converted_std=std(converted),
                       top1_converted=converted)
        rows.append(row)
    return rows


def ordering_verdict(rows: list[dict[str, Any]]) -> str:
    """Whether Zero beat every other APT variant after the epoch: paired per-seed differences (same stock model)."""
    by = {r["row"]: r for r in rows}
    if "zero" not in by:
        return "no Zero row"
    zero = by["zero"]["top1"]
    lines, behind = [], []
    for key in ("resize", "residual", "nonzero"):
        if key not in by:
            continue
        diffs = [z - o for z, o in zip(zero, by[key]["top1"], strict=True)]
        mean = statistics.fmean(diffs)
        if mean <= 0:
            behind.append(by[key]["name"])
        ahead = sum(d > 0 for d in diffs)
        lines.append(f"- Zero − {by[key]['name']}: {mean:+.1f} ± {std(diffs):.1f} points (Zero ahead on {ahead} of "
                     f"{len(diffs)} seeds)")
    if behind:
        head = f"Ordering NOT reproduced: Zero is not above {', '.join(behind)} after the epoch (mean over seeds)."
    else:
        head = "Ordering reproduced (mean over seeds): Zero is the best APT variant after the epoch."
    return "\n".join([head, *lines])


def format_table(rows: list[dict[str, Any]], settings: MiniSettings) -> str:
    """The results as a markdown table (top-1 mean +- std over seeds; tokens kept; speedup measured and ideal)."""
    n = len(settings.seeds)
    lines = [f"| row | top-1 after conversion | top-1 after {settings.finetune_epochs} epoch | tokens kept | "
             f"measured speedup | ideal speedup |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        converted = (f"{r['top1_converted_mean']:.1f} ± {r['top1_converted_std']:.1f}" if "top1_converted_mean" in r
                     else "—")
        after = f"{r['top1_mean']:.1f} ± {r['top1_std']:.1f}"
        if r["row"] == "base":
            converted, after = f"{after} (stock)", "—"
        lines.append(f"| {r['name']} | {converted} | {after} | {100 * r['tokens_kept']:.0f}% | "
                     f"{r['speedup_mean']:.2f}x ± {r['speedup_std']:.2f} | {r['ideal_speedup']:.2f}x |")
    lines.append("")
    lines.append(f"Top-1 (%) on {n} seed{'s' * (n > 1)} ({', '.join(map(str, settings.seeds))}), mean ± std.")
    return "\n".join(lines)


def run(settings: MiniSettings, output_dir: str | Path | None = None) -> dict[str, Any]:
    """The whole experiment; writes results.json and results.md to `output_dir` when given."""
    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    photos = load_class_photos(settings.photo_side)
    processor = make_processor(settings)
    val = encode(*sample_crops(photos, settings.val_per_class, settings, torch.Generator().manual_seed(0), "val"),
                 processor)
    per_seed = [run_seed(seed, photos, val, settings, processor)
                for seed in tqdm(settings.seeds, desc="seeds", unit="seed")]
    rows = summarise(per_seed, val, settings, vit_config(settings, len(photos)))
    wall = time.perf_counter() - start
    where = f"{machine('cpu')}; torch {torch.__version__}, transformers {transformers.__version__}"
    results = {"settings": asdict(settings), "classes": [Path(n).stem for n in PHOTO_CLASSES],
               "val_images": len(val), "rows": rows, "per_seed": per_seed, "wall_seconds": wall, "machine": where,
               "ordering": ordering_verdict(rows), "paper": PAPER_ORDERING}
    markdown = "\n\n".join([
        f"## The paper's claims in miniature: {len(photos)}-way photo-crop classification, ViT "
        f"{settings.hidden_size}x{settings.layers} at {settings.image_size}/{settings.patch_size}, entropy "
        f"S={settings.num_scales} {settings.thresholds}",
        format_table(rows, settings), results["ordering"], PAPER_ORDERING,
        f"{len(val)} validation crops; {wall / 60:.1f} min on {where}; speed: best of {settings.repeats} "
        f"({settings.clock} clock), {min(settings.timing_images, len(val))} crops per batch.",
    ])
    write_results(output_dir, results, markdown)
    return results


def parse_args(argv: Sequence[str] | None = None) -> tuple[MiniSettings, str | None]:
    return settings_from_args(MiniSettings, argv, "reproduce_mini.py", __doc__)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings, output_dir = parse_args(argv)
    return run(settings, output_dir)


if __name__ == "__main__":
    main()
