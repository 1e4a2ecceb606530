"""AptImageProcessor against transformers' CLIP image processor on real photographs, one run, same backend.

    python scripts/benchmark.py processor [--repeats 7] [--size 336] [--crop_size 336] [--do_pad]
        [--backend pil|torchvision] [--batch_size 1] [--device cpu] [--num_scales 2 --thresholds 5.75]

Both processors get the same kwargs and the same photos (scikit-image's bundled set, RGB). Each repeat
processes the photos `--batch_size` per call (1: each on its own, as a dataset map does; 0: all in one
call, as a collator does), APT and stock interleaved so drift hits both; times are medians over repeats,
after one warm-up. `--device cuda` preprocesses on the GPU (torchvision backend, as transformers'
`device=`). The APT steps (scoring + selection on the 8-bit crop, packing it) are also timed alone, to
show where the overhead goes. Goal: APT adds <= 15%. Timings on a shared machine are noisy: run it on a
quiet one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers
from PIL import Image

from apt_hf.patchify import compute_layout, pack_base_patches, recover_uint8
from apt_hf.sample_images import PHOTOS, load_photos

from .timing import add_clock_arguments, apply_clock_arguments, timed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py processor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=336, help="shortest edge after resize")
    parser.add_argument("--crop_size", type=int, default=336)
    parser.add_argument("--do_pad", action="store_true",
                        help="LLaVA-1.5 pad-to-square (baseline becomes LlavaImageProcessor, which has it)")
    parser.add_argument("--backend", choices=("pil", "torchvision"), default="pil")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="photos per processor call (0: all of them in one call)")
    parser.add_argument("--device", default="cpu",
                        help="where the torchvision backend preprocesses (transformers' device=), e.g. cuda")
    parser.add_argument("--patch_size", type=int, default=14)
    parser.add_argument("--num_scales", type=int, default=2)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[5.75])
    parser.add_argument("--scorer", default="entropy")
    parser.add_argument("--entropy_bins", type=int, default=512)
    add_clock_arguments(parser, threads=1)  # 1, as in DataLoader workers; the PIL path is single-threaded
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected >= 1, got {args.repeats}")
    if args.batch_size < 0:
        parser.error(f"--batch_size: expected >= 0 (0: all photos in one call), got {args.batch_size}")
    if args.device != "cpu" and args.backend != "torchvision":
        parser.error(f"--device {args.device}: only the torchvision backend preprocesses off the CPU; "
                     "add --backend torchvision")
    apply_clock_arguments(parser, args)
    return args


def build_processors(args: argparse.Namespace) -> tuple[Any, Any, str, Any]:
    """(APT, stock, stock name, APT's own base class without APT), all on the requested backend, same kwargs."""
    from apt_hf.image_processing_apt import AptImageProcessorPil

    common = {"size": {"shortest_edge": args.size}, "crop_size": {"height": args.crop_size, "width": args.crop_size}}
    apt_fields = {"patch_size": args.patch_size, "num_scales": args.num_scales, "thresholds": args.thresholds,
                  "scorer": args.scorer, "entropy_bins": args.entropy_bins}
    if args.backend == "pil":
        from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

        apt_cls, base_cls = AptImageProcessorPil, LlavaImageProcessorPil
        stock_cls = LlavaImageProcessorPil if args.do_pad else CLIPImageProcessorPil
    else:
        if not transformers.utils.is_torchvision_available():
            raise SystemExit("--backend torchvision: torchvision is not installed; use --backend pil")
        from transformers import CLIPImageProcessor, LlavaImageProcessor

        from apt_hf.image_processing_apt import AptImageProcessor

        apt_cls, base_cls = AptImageProcessor, LlavaImageProcessor
        stock_cls = LlavaImageProcessor if args.do_pad else CLIPImageProcessor
    stock_kwargs = {**common, "do_pad": True} if args.do_pad else common
    return (apt_cls(**common, do_pad=args.do_pad, **apt_fields), stock_cls(**stock_kwargs), stock_cls.__name__,
            base_cls(**common, do_pad=args.do_pad))


def time_per_image(fn: Callable[[Any], Any], batches: Sequence[Sequence[Any]], clock: str = "wall",
                   device: str = "cpu") -> float:
    """Seconds per image for one pass over the batches, one call per batch (CUDA-synchronised)."""
    return timed(lambda: [fn(batch) for batch in batches], device, clock) / sum(len(b) for b in batches)


def batched(items: Sequence[Any], batch_size: int) -> list[list[Any]]:
    """`items` in calls of `batch_size` (0: one call with all of them)."""
    size = batch_size or len(items)
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    apt, stock, stock_name, base = build_processors(args)
    photos = list(load_photos(PHOTOS).values())
    batches = batched(photos, args.batch_size)
    device_kwargs = {"device": args.device} if args.backend == "torchvision" else {}

    def run(processor: Any) -> Callable[[list[Image.Image]], Any]:
        return lambda batch: processor(batch, return_tensors="pt", **device_kwargs)

    run_apt, run_stock, run_base = run(apt), run(stock), run(base)

    # The APT-only share, as the processor runs it: score + select on the 8-bit crop, then pack it (the processor
    # normalizes the packed patches, as the stock one normalizes the image).
    processed = [run_stock([photo])["pixel_values"] for photo in photos]
    uint8 = [recover_uint8(pixels, stock.image_mean, stock.image_std, stock.rescale_factor) for pixels in processed]
    layouts = [compute_layout(u, args.patch_size, args.num_scales, args.thresholds, args.scorer, args.entropy_bins)
               for u in uint8]
    steps: dict[str, tuple[Callable[[Any], Any], list]] = {
        "score + select": (lambda u: compute_layout(u[0], args.patch_size, args.num_scales, args.thresholds,
                                                    args.scorer, args.entropy_bins), batched(uint8, 1)),
        "pack": (lambda item: pack_base_patches(item[0][0], item[0][1], args.patch_size),
                 batched(list(zip(uint8, layouts, strict=True)), 1)),
    }

    for batch in batches:  # warm-up: first-call allocations, lazy imports
        run_apt(batch)
        run_stock(batch)
    apt_times, stock_times, base_times = [], [], []
    step_times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        stock_times.append(time_per_image(run_stock, batches, args.clock, args.device))
        apt_times.append(time_per_image(run_apt, batches, args.clock, args.device))
        base_times.append(time_per_image(run_base, batches, args.clock, args.device))
        for name, (fn, items) in steps.items():
            step_times[name].append(time_per_image(fn, items, args.clock, args.device))
    stock_ms, apt_ms = 1e3 * statistics.median(stock_times), 1e3 * statistics.median(apt_times)
    step_ms = {name: 1e3 * statistics.median(times) for name, times in step_times.items()}
    base_ms = 1e3 * statistics.median(base_times)

    outputs = [run_apt([photo]) for photo in photos]
    kept = [int(o["tokens_per_image"][0]) for o in outputs]
    uniform = [int(o["image_grid_hw"][0].prod()) for o in outputs]
    names = [name.rsplit(".", 1)[0] for name in PHOTOS]
    overhead = apt_ms / stock_ms - 1

    print(f"## AptImageProcessor vs {stock_name} ({args.backend} backend)\n")
    print(f"{len(photos)} photos, {args.batch_size or len(photos)} per call on {args.device}, size {args.size} / crop "
          f"{args.crop_size}, do_pad={args.do_pad}, "
          f"{args.scorer} S={args.num_scales} {args.thresholds}, p={args.patch_size}; median of {args.repeats} "
          f"({args.clock} clock) "
          f"repeats; torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, {platform.machine()} x{os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| processor | ms / image | vs stock |")
    print("| --- | ---: | ---: |")
    print(f"| {stock_name} | {stock_ms:.2f} | 1.00x |")
    print(f"| AptImageProcessor | {apt_ms:.2f} | {apt_ms / stock_ms:.2f}x ({100 * overhead:+.1f}%) |")
    if type(base).__name__ != stock_name:
        print(f"| {type(base).__name__} (APT's base, no APT) | {base_ms:.2f} | {base_ms / stock_ms:.2f}x |")
    for name, ms in step_ms.items():
        print(f"| APT step alone: {name} | {ms:.3f} | {100 * ms / stock_ms:.1f}% of stock |")
    print(f"\nGoal: APT adds <= 15%: {'met' if overhead <= 0.15 else 'NOT met'} ({100 * overhead:+.1f}%).\n")
    print("| photo | tokens kept | uniform | kept |")
    print("| --- | ---: | ---: | ---: |")
    for name, k, u in zip(names, kept, uniform, strict=True):
        print(f"| {name} | {k} | {u} | {100 * k / u:.1f}% |")
    print(f"| **all** | {sum(kept)} | {sum(uniform)} | {100 * sum(kept) / sum(uniform):.1f}% |")


if __name__ == "__main__":
    main()
