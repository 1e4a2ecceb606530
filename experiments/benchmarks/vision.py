"""Stock ViT / CLIP vision tower vs APT on real photographs, in one run: tokens kept, ideal and measured speedup.

    python scripts/benchmark.py vision                                  # CPU: ViT-B/16 at 384, S=2 [5.5]
    python scripts/benchmark.py vision --family clip --size large --image_size 336 --patch_size 14 \\
        --device cuda --dtype bfloat16 --batch 64 --attn all      # every backend this machine can run
    python scripts/benchmark.py vision --family siglip --size so400m --layers 6 --image_size 384 --patch_size 14
                                                                        # SigLIP so400m widths, fewer layers


Models are built from configs with random weights (timing does not depend on the values; pass --model for a
real checkpoint). The photos (scikit-image's bundled set, repeated to --batch) go through AptImageProcessor;
the stock model gets exactly the same pixels, dense. Rows:
  - APT [-1]: nothing merged, packed input: the overhead of APT's machinery (goal <= 2%);
  - APT: the chosen thresholds, packed input (the processor's output): measured speedup vs the ideal one
    (goal: measured >= 90% of ideal);
  - APT dense: the same from dense pixel_values, patchifying on the device inside forward.
Ideal speedup = FLOP ratio from token counts: per layer 12 n D^2 (projections + MLP) + 2 n^2 D (attention) with
n tokens per image, plus the patch embedding and, for APT, its merge conv / zero-MLP / resized-patch embedding.
Times are the best of --repeats forward passes after a warm-up, stock and APT interleaved; on a shared machine
use --threads 1 --clock cpu (process CPU time, insensitive to other processes; CPU device only). On CUDA each
run's peak memory (torch.cuda.max_memory_allocated over one forward) is reported too. `--attn all` times APT on
every backend of ATTN_CANDIDATES that this machine can run and lists the others with the reason.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers

import apt_hf
from apt_hf.dtypes import TORCH_DTYPES
from apt_hf.flops import vision_flops
from apt_hf.patchify import PatchLayout, unpack_base_patches
from apt_hf.sample_images import PHOTOS, load_photos

from .results import row, write_json
from .timing import add_clock_arguments, apply_clock_arguments, machine, peak_memory, timed

SIZES = {  # hidden, layers, heads, mlp
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
    "so400m": (1152, 27, 16, 4304),  # SigLIP-so400m (LLaVA-OneVision's tower)
}
FAMILIES = ("vit", "clip", "siglip")
ATTN_CANDIDATES = ("sdpa", "apt_varlen", "flash_attention_2", "flash_attention_3", "flex_attention", "eager")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py vision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="vit")
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--layers", type=int, default=None, help="encoder layers (default: the size's)")
    parser.add_argument("--image_size", type=int, default=384)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--model", default=None, help="a real checkpoint (ViT / CLIP / SigLIP vision tower) instead of "
                                                       "random weights")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    parser.add_argument("--attn", nargs="*", default=None,
                        help="attention implementations to time APT with (default: the device's default; 'all': "
                             "every one this machine can run)")
    parser.add_argument("--num_scales", type=int, default=2)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[5.5])
    parser.add_argument("--scorer", default="entropy")
    parser.add_argument("--repeats", type=int, default=3)
    add_clock_arguments(parser)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (for gpu_check)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch: expected >= 1")
    apply_clock_arguments(parser, args)
    return args


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(stock, APT) sharing the same weights, and the stock config."""
    stock_class, config_class = {
        "vit": (transformers.ViTModel, transformers.ViTConfig),
        "clip": (transformers.CLIPVisionModel, transformers.CLIPVisionConfig),
        "siglip": (transformers.SiglipVisionModel, transformers.SiglipVisionConfig),
    }[args.family]
    options = {"add_pooling_layer": False} if args.family == "vit" else {}
    if args.model:
        stock = stock_class.from_pretrained(args.model, **options)
    else:
        hidden, layers, heads, mlp = SIZES[args.size]
        config = config_class(hidden_size=hidden, num_hidden_layers=args.layers or layers, num_attention_heads=heads,
                              intermediate_size=mlp, image_size=args.image_size, patch_size=args.patch_size)
        stock = stock_class(config, **options)
    fields = {"num_scales": args.num_scales, "thresholds": args.thresholds, "scorer": args.scorer}
    apt = apt_hf.convert(stock, image_mean=[0.5] * 3, image_std=[0.5] * 3, **fields)
    dtype = TORCH_DTYPES[args.dtype]
    stock = stock.to(args.device, dtype).eval()
    apt = apt.to(args.device, dtype).eval()
    return stock, apt, stock.config


def packed_inputs(args: argparse.Namespace, thresholds: list[float], image_size: int, patch: int) -> dict[str, Any]:
    from apt_hf.image_processing_apt import AptImageProcessorPil

    photos = list(load_photos(PHOTOS).values())
    photos = (photos * (args.batch // len(photos) + 1))[: args.batch]
    if args.family == "siglip":  # SigLIP's processors resize straight to the square, no crop
        sizes = {"size": {"height": image_size, "width": image_size}, "do_center_crop": False}
    else:
        sizes = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    processor = AptImageProcessorPil(**sizes, image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=patch,
                                     num_scales=args.num_scales, thresholds=thresholds, scorer=args.scorer)
    return dict(processor(photos, return_tensors="pt"))


def available_attn_implementations(model: torch.nn.Module, candidates: Sequence[str] = ATTN_CANDIDATES
                                   ) -> tuple[list[str], dict[str, str]]:
    """The candidates `model` accepts on this machine, and for each other one the reason it gave (its ValueError)."""
    original = model.config._attn_implementation
    available, missing = [], {}
    for name in candidates:
        try:
            model.set_attn_implementation(name)
        except (ValueError, ImportError) as err:
            missing[name] = str(err).split("; ")[0].split(" (")[0]  # the reason, without the install hint
        else:
            available.append(name)
    model.set_attn_implementation(original)
    return available, missing


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    stock, apt, config = build_models(args)
    patch, image_size = int(config.patch_size), int(config.image_size)
    merged = packed_inputs(args, args.thresholds, image_size, patch)
    uniform = packed_inputs(args, [-1.0] * (args.num_scales - 1), image_size, patch)
    dense = torch.stack(unpack_base_patches(merged["pixel_values"], PatchLayout.from_inputs(merged)))
    device = args.device
    to_device = {k: v.to(device) for k, v in merged.items()}
    to_device_uniform = {k: v.to(device) for k, v in uniform.items()}
    dense = dense.to(device)  # float32, as processors return: both models cast to their dtype, and the dense
    # APT path recovers the exact 8-bit image from it (half precision would perturb the layout)
    missing: dict[str, str] = {}
    if args.attn == ["all"]:
        backends, missing = available_attn_implementations(apt)
    else:
        backends = args.attn or [apt.config._attn_implementation]

    runs: dict[str, tuple[str | None, Callable[[], Any]]] = {"stock": (None, lambda: stock(dense))}
    for backend in backends:
        runs[f"APT [-1] {backend}"] = (backend, lambda: apt(**to_device_uniform))
        runs[f"APT {backend}"] = (backend, lambda: apt(**to_device))
        runs[f"APT dense {backend}"] = (backend, lambda: apt(dense))

    def call(name: str) -> Any:
        backend, fn = runs[name]
        if backend is not None and apt.config._attn_implementation != backend:
            apt.set_attn_implementation(backend)
        return fn()

    stock_attn = stock.config._attn_implementation
    memory: dict[str, float | None] = {}
    with torch.inference_mode():
        for name in list(runs):  # warm-up (and compile of flex attention); a backend that fails here is reported
            backend = runs[name][0]
            if backend in missing:
                del runs[name]
                continue
            try:
                call(name)
            except Exception as err:  # noqa: BLE001 - a kernel that imports but cannot run here: report, go on
                if backend is None:
                    raise
                missing[backend] = f"failed at run time: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                del runs[name]
                continue
            memory[name] = peak_memory(lambda name=name: call(name), device)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name in runs:
                times[name].append(timed(lambda name=name: call(name), device, args.clock))
    ms = {name: 1e3 * min(t) for name, t in times.items()}
    backends = [b for b in backends if b not in missing]

    cls_token = apt.embeddings.has_class_token
    stock_flops = vision_flops(config, PatchLayout.from_inputs(uniform), apt=False, class_token=cls_token)
    merged_flops = vision_flops(config, PatchLayout.from_inputs(merged), apt=True, class_token=cls_token)
    uniform_flops = vision_flops(config, PatchLayout.from_inputs(uniform), apt=True, class_token=cls_token)
    cells = int(PatchLayout.from_inputs(uniform).image_grid_hw.prod(-1).sum())
    kept = int(merged["tokens_per_image"].sum())

    size = f"{args.size}{f' ({config.num_hidden_layers} layers)' if args.layers else ''}"
    model_name = f"{args.family} {size if not args.model else args.model}"
    print(f"## APT vs stock {type(stock).__name__}: {model_name}, {image_size}/{patch}, batch {args.batch}, "
          f"{args.dtype} on {device}\n")
    where = machine(device)
    print(f"{args.scorer} S={args.num_scales} {args.thresholds}; photos: scikit-image's {len(PHOTOS)}, repeated to "
          f"the batch; best of {args.repeats} ({args.clock} clock); stock attention {stock_attn}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {where}\n")
    header = f"| run | tokens / image | kept | {args.clock} ms / batch | speedup | ideal | measured / ideal |"
    if device.startswith("cuda"):
        header += " peak GiB |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    tokens_uniform = cells / args.batch
    check = (f"vision {model_name} {image_size}/{patch}, {args.dtype}, batch {args.batch}, "
             f"{args.scorer} {args.thresholds}")
    rows = []
    for name in runs:
        is_merged = name.startswith("APT") and "[-1]" not in name
        tokens = kept / args.batch if is_merged else tokens_uniform
        ideal = stock_flops / (merged_flops if is_merged else (uniform_flops if name != "stock" else stock_flops))
        speedup = ms["stock"] / ms[name]
        line = (f"| {name} | {tokens:.1f} | {100 * tokens / tokens_uniform:.1f}% | {ms[name]:.1f} | {speedup:.3f}x | "
                f"{ideal:.3f}x | {100 * speedup / ideal:.1f}% |")
        if device.startswith("cuda"):
            line += f" {memory[name]:.2f} |"
        print(line)
        rows.append(row(check, name if name != "stock" else f"stock ({stock_attn})", f"{ms[name]:.1f} ms / batch",
                        tokens=tokens, speedup=speedup, ideal=ideal, peak_gib=memory[name]))
    print()
    for backend in backends:
        overhead = ms[f"APT [-1] {backend}"] / ms["stock"] - 1
        ratio = (ms["stock"] / ms[f"APT {backend}"]) / (stock_flops / merged_flops)
        print(f"- {backend}: overhead with nothing merged {100 * overhead:+.1f}% (goal <= 2%: "
              f"{'met' if overhead <= 0.02 else 'NOT met'}); measured speedup {100 * ratio:.0f}% of ideal "
              f"(goal >= 90%: {'met' if ratio >= 0.9 else 'NOT met'})")
    for backend, reason in missing.items():
        print(f"- {backend}: not run ({reason})")
        rows.append(row(check, f"APT {backend}", f"not run: {reason}"))
    write_json(args.json, rows, suite="vision")
    return rows


if __name__ == "__main__":
    main()
