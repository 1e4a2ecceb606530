"""Stock Depth Anything vs APT on real photographs, in one run, at two resolutions: tokens kept, ideal and measured
speedup.

    python scripts/benchmark.py dense                       # Depth-Anything-V2-Small's shape, the 10 photos at 518
                                                            # and 1036 px, entropy S=2 [5.75] (one CPU thread, with
                                                            # --repeats 2: 30 min; most of it stock at 1036 px)
    python scripts/benchmark.py dense --batch 2 --repeats 2  # a quick look on a CPU (~2 min)
    python scripts/benchmark.py dense --device cuda --dtype bfloat16 --batch 16 --overhead
    python scripts/benchmark.py dense --model depth-anything/Depth-Anything-V2-Small-hf   # a real checkpoint

The model is built from a config with random weights (timing does not depend on the values; --model loads a real
checkpoint instead): preset "small" is Depth-Anything-V2-Small's shape (DINOv2-S backbone: 384 wide, 12 layers, 6
heads, patch 14, feature maps of layers 3, 6, 9, 12; DPT neck 48/96/192/384 -> 64 channels, head 32), "tiny" a
toy for tests. The photos (scikit-image's bundled set, repeated to --batch) are resized to each square size by the
APT DPT image processor (Depth Anything's resize, aspect ratio not kept so that the stock model can batch them,
ImageNet statistics), which also scores and packs them; the stock model gets exactly the same pixels, dense.

Rows per resolution: stock; APT (the thresholds); with --overhead also APT [-1] (nothing merged: the cost of APT's
machinery; off by default, since at 1036 px one CPU forward takes about a minute). The DPT neck and head run on the
full feature grid in both models (APT's tokens are repeated over the cells they cover), so the ideal speedup is given
twice: the backbone's FLOP ratio (`apt_hf.flops`, from token counts) and the whole model's, the head's FLOPs
(counted with torch's FlopCounterMode on the stock model) added to both sides. Times are the best of --repeats
forward passes after a warm-up, stock and APT interleaved; on a shared machine use --threads 1 --clock cpu.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

import apt_hf
from apt_hf.dtypes import TORCH_DTYPES
from apt_hf.flops import vision_flops
from apt_hf.image_processing_apt_dpt import AptDPTImageProcessorPil
from apt_hf.patchify import PatchLayout, unpack_base_patches
from apt_hf.sample_images import PHOTOS, load_photos

from .results import row, write_json
from .timing import add_clock_arguments, apply_clock_arguments, machine, peak_memory, timed

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PRESETS: dict[str, dict[str, Any]] = {
    # Depth-Anything-V2-Small-hf: DINOv2-S/14 backbone, out_indices [3, 6, 9, 12], the depth-anything-small DPT head
    "small": {"backbone": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                           "out_indices": [3, 6, 9, 12]},
              "head": {"reassemble_hidden_size": 384, "neck_hidden_sizes": [48, 96, 192, 384],
                       "fusion_hidden_size": 64, "head_hidden_size": 32}},
    "tiny": {"backbone": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                          "out_indices": [1, 2, 3, 4]},
             "head": {"reassemble_hidden_size": 32, "neck_hidden_sizes": [8, 16, 16, 32], "fusion_hidden_size": 16,
                      "head_hidden_size": 8}},
}


# ----------------------------------------------------------------------------------------------------------------
# FLOPs of dense models (also used by experiments/segmentation_mini.py)
# ----------------------------------------------------------------------------------------------------------------


def dinov2_flops(config: Dinov2Config, layout: PatchLayout, apt: bool) -> float:
    """`apt_hf.flops.vision_flops` of a DINOv2 backbone (one class token per image), whose MLP width is a ratio
    (`mlp_ratio`) rather than `intermediate_size`; a SwiGLU MLP (three matrices of width h) counts as two of 1.5 h."""
    width = int(config.hidden_size * config.mlp_ratio)
    if config.use_swiglu_ffn:
        width = 1.5 * ((int(width * 2 / 3) + 7) // 8 * 8)
    shape = SimpleNamespace(hidden_size=config.hidden_size, num_channels=config.num_channels,
                            patch_size=config.patch_size, num_hidden_layers=config.num_hidden_layers,
                            intermediate_size=width)
    return vision_flops(shape, layout, apt=apt)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (2 per multiply-add, as apt_hf.flops), by torch's FlopCounterMode."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def head_flops(stock: nn.Module, pixel_values: torch.Tensor) -> int:
    """FLOPs of a stock dense model's neck and heads on `pixel_values`: the whole forward's less its backbone's, both
    counted on a meta-device copy (shapes only, nothing computed). They are the same in the APT model, which runs
    them on the full grid too."""
    meta, pixels = copy.deepcopy(stock).to("meta"), pixel_values.to("meta")
    return count_flops(lambda: meta(pixel_values=pixels)) - count_flops(lambda: meta.backbone(pixels))


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py dense", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--model", default=None, help="a real DepthAnythingForDepthEstimation checkpoint instead of "
                                                       "random weights")
    parser.add_argument("--image_sizes", type=int, nargs="+", default=[518, 1036],
                        help="square sizes, multiples of the patch size (default: Depth Anything's 518 and twice it)")
    parser.add_argument("--batch", type=int, default=len(PHOTOS), help="images (the photos, repeated as needed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    parser.add_argument("--num_scales", type=int, default=2)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[5.75],
                        help="default: the paper's segmentation setting (S=2, 5.75)")
    parser.add_argument("--scorer", default="entropy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overhead", action="store_true",
                        help="also time APT with nothing merged (thresholds -1): the cost of APT's machinery")
    add_clock_arguments(parser)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (for gpu_check)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch: expected >= 1")
    apply_clock_arguments(parser, args)
    return args


def build_stock_model(preset: str, model: str | None = None) -> DepthAnythingForDepthEstimation:
    """A stock Depth Anything: `model` (a checkpoint) or the preset's shape with random weights."""
    if model:
        return DepthAnythingForDepthEstimation.from_pretrained(model)
    shape = PRESETS[preset]
    backbone = Dinov2Config(image_size=518, patch_size=14, reshape_hidden_states=False, **shape["backbone"])
    return DepthAnythingForDepthEstimation(DepthAnythingConfig(backbone_config=backbone, **shape["head"]))


def processor_for(args: argparse.Namespace, size: int, thresholds: list[float], patch: int) -> AptDPTImageProcessorPil:
    """The APT DPT processor resizing to `size` x `size` (multiple of the patch) with these thresholds."""
    return AptDPTImageProcessorPil(size={"height": size, "width": size}, keep_aspect_ratio=False,
                                   ensure_multiple_of=patch, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                                   patch_size=patch, num_scales=args.num_scales, thresholds=thresholds,
                                   scorer=args.scorer)


def benchmark_size(args: argparse.Namespace, stock: nn.Module, apt: nn.Module, size: int
                   ) -> tuple[list[dict[str, Any]], float]:
    """Time stock, APT (and APT [-1] with --overhead) at one square size; print their table rows, return them and
    the head's share of the stock model's FLOPs."""
    config = stock.config.backbone_config
    patch = int(config.patch_size)
    photos = list(load_photos(PHOTOS).values())
    photos = (photos * (args.batch // len(photos) + 1))[: args.batch]
    merged = dict(processor_for(args, size, args.thresholds, patch)(photos, return_tensors="pt"))
    uniform = dict(processor_for(args, size, [-1.0] * (args.num_scales - 1), patch)(photos, return_tensors="pt"))
    dense = torch.stack(unpack_base_patches(merged["pixel_values"], PatchLayout.from_inputs(merged)))
    device = args.device
    inputs = {"merged": {k: v.to(device) for k, v in merged.items()},
              "uniform": {k: v.to(device) for k, v in uniform.items()}}
    dense = dense.to(device)
    runs: dict[str, Callable[[], Any]] = {"stock": lambda: stock(pixel_values=dense)}
    if args.overhead:
        runs["APT [-1]"] = lambda: apt(**inputs["uniform"])
    runs["APT"] = lambda: apt(**inputs["merged"])
    memory: dict[str, float | None] = {}
    with torch.inference_mode():
        for name, fn in runs.items():  # warm-up
            fn()
            memory[name] = peak_memory(fn, device)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn, device, args.clock))
    ms = {name: 1e3 * min(t) for name, t in times.items()}

    layouts = {"stock": PatchLayout.from_inputs(uniform), "APT [-1]": PatchLayout.from_inputs(uniform),
               "APT": PatchLayout.from_inputs(merged)}
    backbone = {name: dinov2_flops(config, layouts[name], apt=name != "stock") for name in runs}
    head = head_flops(stock, dense)
    cells = float(layouts["stock"].image_grid_hw.prod(-1).sum()) / args.batch
    check = (f"dense depth-anything {args.model or args.preset} {size}/{patch}, {args.dtype}, batch {args.batch}, "
             f"{args.scorer} {args.thresholds}")
    rows = []
    for name in runs:
        tokens = float(layouts[name].tokens_per_image.float().mean())
        speedup = ms["stock"] / ms[name]
        ideal_backbone = backbone["stock"] / backbone[name]
        ideal = (backbone["stock"] + head) / (backbone[name] + head)
        line = (f"| {name} | {size} | {tokens:.0f} | {100 * tokens / cells:.1f}% | {ms[name]:.1f} | {speedup:.3f}x | "
                f"{ideal_backbone:.3f}x | {ideal:.3f}x | {100 * speedup / ideal:.0f}% |")
        if device.startswith("cuda"):
            line += f" {memory[name]:.2f} |"
        print(line)
        rows.append(row(check, name, f"{ms[name]:.1f} ms / batch", tokens=tokens, speedup=speedup, ideal=ideal,
                        peak_gib=memory[name]))
    return rows, head / (backbone["stock"] + head)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    dtype = TORCH_DTYPES[args.dtype]
    stock = build_stock_model(args.preset, args.model).eval()
    apt = apt_hf.convert(stock, num_scales=args.num_scales, thresholds=args.thresholds, scorer=args.scorer,
                         image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).to(args.device, dtype).eval()
    stock = stock.to(args.device, dtype)
    config = stock.config.backbone_config
    patch = int(config.patch_size)
    for size in args.image_sizes:
        if size % patch:
            raise SystemExit(f"--image_sizes: expected multiples of the patch size {patch}, got {size}")
    name = args.model or f"{args.preset} (random weights: {config.hidden_size} wide, {config.num_hidden_layers} layers)"
    print(f"## APT vs stock DepthAnythingForDepthEstimation: {name}, batch {args.batch}, {args.dtype} on "
          f"{args.device}\n")
    attention = f"{config._attn_implementation} (stock), {apt.config.backbone_config._attn_implementation} (APT)"
    print(f"{args.scorer} S={args.num_scales} {args.thresholds}; photos: scikit-image's {len(PHOTOS)}, repeated to the "
          f"batch; best of {args.repeats} ({args.clock} clock); attention {attention}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {machine(args.device)}\n")
    header = (f"| run | res | tokens / image | kept | {args.clock} ms / batch | speedup | ideal (backbone) | "
              "ideal (model) | measured / ideal |")
    if args.device.startswith("cuda"):
        header += " peak GiB |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    rows, head_share = [], {}
    for size in args.image_sizes:
        size_rows, head_share[size] = benchmark_size(args, stock, apt, size)
        rows += size_rows
    print("\nNeck and head (the same in both models, on the full grid): " + ", ".join(
        f"{100 * share:.0f}% of the stock model's FLOPs at {size} px" for size, share in head_share.items()))
    write_json(args.json, rows, suite="dense")
    return rows


if __name__ == "__main__":
    main()
