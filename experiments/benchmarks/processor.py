"""AptImageProcessor against transformers' CLIP image processor on real photographs: both backends, both call shapes.

    python scripts/benchmark.py processor --clock cpu --threads 1 [--repeats 7] [--size 336] [--crop_size 336]
        [--do_pad] [--backend all|pil|torchvision] [--batch_size 1 0] [--device cpu]
        [--num_scales 2 --thresholds 5.75]

Both processors of a backend get the same kwargs and the same photos (scikit-image's bundled set, RGB). By default one
run covers the PIL backend and, where torchvision imports, the torchvision one (it says so otherwise), each in both
call shapes: one photo per call (`--batch_size 1`, as a dataset map does) and all photos in one call (`0`, as a
collator does). Every repeat times every (backend, call shape) with stock and APT interleaved, so drift hits both;
times are medians over repeats, after one warm-up. `--device cuda` preprocesses on the GPU (torchvision backend, as
transformers' `device=`). The APT steps (scoring, selection, packing, rescale / normalize of the packed patches) are
also timed alone, per backend, on that backend's own 8-bit crops, to show where APT's cost goes. Goal: APT adds
<= 15%. Use `--clock cpu` on a shared machine (this process's CPU time).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import transformers
from PIL import Image

from apt_hf.patchify import (
    crop_to_patch_grid,
    gather_base_patches,
    layout_from_cell_scales,
    score_patches,
    select_cell_scales,
)
from apt_hf.sample_images import PHOTOS, load_photos

from .results import row, write_json
from .timing import add_clock_arguments, apply_clock_arguments, timed

BACKENDS = ("pil", "torchvision")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py processor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=336, help="shortest edge after resize")
    parser.add_argument("--crop_size", type=int, default=336)
    parser.add_argument("--do_pad", action="store_true",
                        help="LLaVA-1.5 pad-to-square (baseline becomes LlavaImageProcessor, which has it)")
    parser.add_argument("--backend", choices=("all", *BACKENDS), default="all",
                        help="all: PIL, and torchvision where it imports")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[1, 0],
                        help="photos per processor call, one call shape each (0: all of them in one call)")
    parser.add_argument("--device", default="cpu",
                        help="where the torchvision backend preprocesses (transformers' device=), e.g. cuda")
    parser.add_argument("--patch_size", type=int, default=14)
    parser.add_argument("--num_scales", type=int, default=2)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[5.75])
    parser.add_argument("--scorer", default="entropy")
    parser.add_argument("--entropy_bins", type=int, default=512)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (for gpu_check)")
    add_clock_arguments(parser, threads=1)  # 1, as in DataLoader workers; the PIL path is single-threaded
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected >= 1, got {args.repeats}")
    if any(b < 0 for b in args.batch_size):
        parser.error(f"--batch_size: expected >= 0 (0: all photos in one call), got {args.batch_size}")
    if args.device != "cpu" and args.backend == "pil":
        parser.error(f"--device {args.device}: only the torchvision backend preprocesses off the CPU; "
                     "use --backend torchvision (or all)")
    apply_clock_arguments(parser, args)
    return args


def backends_to_run(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The backends this run times, and why one asked for is left out (torchvision not importable; PIL off the CPU)."""
    wanted = list(BACKENDS) if args.backend == "all" else [args.backend]
    notes = []
    if "torchvision" in wanted and not transformers.utils.is_torchvision_available():
        wanted.remove("torchvision")
        notes.append("torchvision backend: not timed, torchvision does not import here")
    if args.device != "cpu" and "pil" in wanted:
        wanted.remove("pil")
        notes.append(f"PIL backend: not timed, it preprocesses on the CPU only (--device {args.device})")
    return wanted, "; ".join(notes) or None


def build_processors(args: argparse.Namespace, backend: str) -> tuple[Any, Any, str, Any]:
    """(APT, stock, stock name, APT's own base class without APT), all on `backend`, same kwargs."""
    from apt_hf.image_processing_apt import AptImageProcessorPil

    common = {"size": {"shortest_edge": args.size}, "crop_size": {"height": args.crop_size, "width": args.crop_size}}
    apt_fields = {"patch_size": args.patch_size, "num_scales": args.num_scales, "thresholds": args.thresholds,
                  "scorer": args.scorer, "entropy_bins": args.entropy_bins}
    if backend == "pil":
        from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

        apt_cls, base_cls = AptImageProcessorPil, LlavaImageProcessorPil
        stock_cls = LlavaImageProcessorPil if args.do_pad else CLIPImageProcessorPil
    else:
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


def call_shape(batch_size: int, count: int) -> str:
    """The table's name for a call shape (`count`: the photos in all)."""
    return "1 photo / call" if batch_size == 1 else f"{batch_size or count} photos / call"


def apt_steps(args: argparse.Namespace, apt: Any, photos: list[Image.Image], device_kwargs: dict
              ) -> dict[str, tuple[Callable[[Any], Any], list]]:
    """The APT steps as the processor runs them, each alone, on the backend's own resized 8-bit crops (its memory
    layout included): {step: (function of one item, one item per photo)}."""
    p, scales = args.patch_size, list(range(1, args.num_scales))
    crops: list[torch.Tensor] = []
    score_and_pack = apt._score_and_pack

    def capture(resized: list[torch.Tensor], *rest: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        crops.extend(crop_to_patch_grid(image, p)[None] for image in resized)
        return score_and_pack(resized, *rest, **kwargs)

    apt._score_and_pack = capture  # this instance only, for one pass: what the processor scores and packs
    try:
        for photo in photos:
            apt([photo], return_tensors="pt", **device_kwargs)
    finally:
        del apt._score_and_pack
    scores = [score_patches(c, p, scales, args.scorer, args.entropy_bins) for c in crops]
    grid = [(c.shape[-2] // p, c.shape[-1] // p) for c in crops]
    layouts = [layout_from_cell_scales(select_cell_scales(s, args.thresholds, g)) for s, g in zip(scores, grid,
                                                                                                  strict=True)]
    cells = [gather_base_patches(c, lay, p) for c, lay in zip(crops, layouts, strict=True)]
    return {
        "score": (lambda c: score_patches(c, p, scales, args.scorer, args.entropy_bins), crops),
        "select (layout)": (lambda sg: layout_from_cell_scales(select_cell_scales(sg[0], args.thresholds, sg[1])),
                            list(zip(scores, grid, strict=True))),
        "pack": (lambda cl: gather_base_patches(cl[0], cl[1], p), list(zip(crops, layouts, strict=True))),
        "rescale / normalize (packed)": (lambda c: apt._rescale_and_normalize(
            c, apt.do_rescale, apt.rescale_factor, apt.do_normalize, apt.image_mean, apt.image_std), cells),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    backends, note = backends_to_run(args)
    if not backends:  # e.g. --device cuda where torchvision does not import: a row saying so, not a failure
        print(f"Nothing to time: {note}.")
        write_json(args.json, [row(f"processor on {args.device}", "APT", f"not run: {note}")], suite="processor")
        return
    photos = list(load_photos(PHOTOS).values())
    device_kwargs = {"device": args.device} if args.device != "cpu" else {}
    runs: dict[tuple[str, int, str], Callable[[list[Image.Image]], Any]] = {}  # (backend, batch size, which)
    names, steps, kept = {}, {}, {}
    for backend in backends:
        apt, stock, stock_name, base = build_processors(args, backend)
        names[backend] = stock_name, type(apt).__name__, type(base).__name__
        kwargs = device_kwargs if backend == "torchvision" else {}
        for which, processor in (("stock", stock), ("apt", apt), ("base", base)):
            for batch_size in args.batch_size:
                runs[backend, batch_size, which] = partial(processor, return_tensors="pt", **kwargs)
        steps[backend] = apt_steps(args, apt, photos, kwargs)
        outputs = [apt([photo], return_tensors="pt", **kwargs) for photo in photos]
        kept[backend] = [(int(o["tokens_per_image"][0]), int(o["image_grid_hw"][0].prod())) for o in outputs]
    batches = {b: batched(photos, b) for b in args.batch_size}

    for (_, batch_size, _), run in runs.items():  # warm-up: first-call allocations, lazy imports
        for batch in batches[batch_size]:
            run(batch)
    times: dict[Any, list[float]] = {key: [] for key in runs}
    step_times: dict[tuple[str, str], list[float]] = {(b, name): [] for b in steps for name in steps[b]}
    for _ in range(args.repeats):  # every setting once per round, stock and APT side by side
        for key, run in runs.items():
            times[key].append(time_per_image(run, batches[key[1]], args.clock, args.device))
        for backend, named in steps.items():
            for name, (fn, items) in named.items():
                step_times[backend, name].append(time_per_image(lambda one, fn=fn: fn(one[0]), batched(items, 1),
                                                                args.clock, args.device))
    ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    step_ms = {key: 1e3 * statistics.median(t) for key, t in step_times.items()}

    print("## AptImageProcessor vs the stock CLIP image processor, per backend\n")
    print(f"{len(photos)} photos on {args.device}, size {args.size} / crop {args.crop_size}, do_pad={args.do_pad}, "
          f"{args.scorer} S={args.num_scales} {args.thresholds}, p={args.patch_size}; median of {args.repeats} "
          f"repeats ({args.clock} clock); torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, {platform.machine()} x{os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    if note:
        print(f"Note: {note}.\n")
    print("| backend | call shape | stock | ms / photo | APT | ms / photo | APT / stock | APT adds ms / photo | "
          "APT's base (no APT) / stock | goal <= 1.15x |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    met, rows = True, []
    for backend in backends:
        stock_name, apt_name, base_name = names[backend]
        tokens = statistics.mean(k for k, _ in kept[backend])
        for batch_size in args.batch_size:
            stock_ms, apt_ms = ms[backend, batch_size, "stock"], ms[backend, batch_size, "apt"]
            ratio = apt_ms / stock_ms
            met &= ratio <= 1.15
            check = f"processor, {backend} on {args.device}, {call_shape(batch_size, len(photos))}"
            rows += [row(check, stock_name, f"{stock_ms:.2f} ms / photo", tokens=kept[backend][0][1], speedup=1.0),
                     row(check, apt_name, f"{apt_ms:.2f} ms / photo ({apt_ms - stock_ms:+.2f})", tokens=tokens,
                         speedup=stock_ms / apt_ms)]
            print(f"| {backend} | {call_shape(batch_size, len(photos))} | {stock_name} | {stock_ms:.2f} | {apt_name} | "
                  f"{apt_ms:.2f} | {ratio:.2f}x | {apt_ms - stock_ms:+.2f} | "
                  f"{ms[backend, batch_size, 'base'] / stock_ms:.2f}x ({base_name}) | "
                  f"{'met' if ratio <= 1.15 else 'NOT met'} |")
    print(f"\nGoal, every row: APT costs <= 1.15x its stock processor: {'met' if met else 'NOT met'}.\n")
    write_json(args.json, rows, suite="processor")
    print("APT's steps alone, ms / photo (one photo at a time, on each backend's own 8-bit crop):\n")
    print("| step | " + " | ".join(backends) + " |")
    print("| --- |" + " ---: |" * len(backends))
    for name in steps[backends[0]]:
        print(f"| {name} | " + " | ".join(f"{step_ms[b, name]:.3f}" for b in backends) + " |")
    print("| **sum** | " + " | ".join(f"{sum(step_ms[b, n] for n in steps[b]):.3f}" for b in backends) + " |")
    print("\n| photo | tokens kept | uniform | kept |")
    print("| --- | ---: | ---: | ---: |")
    layout_of = kept[backends[0]]
    for name, (k, u) in zip([n.rsplit(".", 1)[0] for n in PHOTOS], layout_of, strict=True):
        print(f"| {name} | {k} | {u} | {100 * k / u:.1f}% |")
    total_kept, total = sum(k for k, _ in layout_of), sum(u for _, u in layout_of)
    print(f"| **all** | {total_kept} | {total} | {100 * total_kept / total:.1f}% |")


if __name__ == "__main__":
    main()
