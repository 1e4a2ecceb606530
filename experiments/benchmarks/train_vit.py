"""ViT classification training throughput: stock dense batches vs APT-packed ones, in one run.

    python scripts/benchmark.py train_vit                       # ViT-B/16 at 384, batch 16, 3 timed steps
    python scripts/benchmark.py train_vit --device cuda --dtype bfloat16 --attn sdpa varlen

A training step is what `finetune_vit.py` runs: forward with labels, backward, AdamW step, all parameters
trainable. The batches are real photographs (scikit-image's bundled set, repeated to --batch, label = which photo)
through `AptImageClassificationCollator`, the collator finetune_vit.py trains with; the stock
`ViTForImageClassification` gets exactly the same pixels, dense. Weights are random (a config, nothing downloaded;
timing does not depend on the values). Rows: stock; APT [-1] (nothing merged: APT's overhead); APT at
--thresholds (packed: fewer tokens per image). The ideal speedup is the FLOP ratio from token counts (forward
FLOPs as `benchmark.py vision` counts them; backward costs about twice the forward for both models, so the ratio
holds for a training step). Times are the median of --steps steps after one warm-up step, runs interleaved.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import transformers

from apt_hf.dtypes import TORCH_DTYPES
from apt_hf.flops import vision_flops
from apt_hf.patchify import PatchLayout, unpack_base_patches
from apt_hf.sample_images import PHOTOS, load_photos

from .timing import add_clock_arguments, apply_clock_arguments, machine, timed
from .vision import SIZES


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py train_vit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--image_size", type=int, default=384)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[5.5])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32",
                        help="autocast dtype for the forward / backward (weights and AdamW stay float32)")
    parser.add_argument("--attn", nargs="*", default=None,
                        help="attention implementations to time APT with (default: the model's default)")
    add_clock_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch: expected >= 1")
    apply_clock_arguments(parser, args)
    return args


def batches(args: argparse.Namespace, num_scales: int) -> dict[str, dict[str, torch.Tensor]]:
    """{"[-1]": packed batch with nothing merged, "<thresholds>": packed batch} from the training collator."""
    from apt_hf.image_processing_apt import AptImageProcessorPil
    from apt_hf.tasks.classification.collator import AptImageClassificationCollator

    photos = list(load_photos(PHOTOS).values())
    rows = [{"image": photos[i % len(photos)], "label": i % len(photos)} for i in range(args.batch)]
    out = {}
    for thresholds in ([-1.0] * (num_scales - 1), list(args.thresholds)):
        processor = AptImageProcessorPil(
            size={"height": args.image_size, "width": args.image_size}, do_center_crop=False,
            image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=args.patch_size, num_scales=num_scales,
            thresholds=thresholds)
        start = time.perf_counter()
        out[str(thresholds)] = AptImageClassificationCollator(processor)(rows)
        out[str(thresholds)]["_collate_seconds"] = time.perf_counter() - start
    return out


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any], device: str,
               dtype: torch.dtype) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
        loss = model(**batch).loss
    with torch.enable_grad():
        loss.backward()
    optimizer.step()


def main(argv: Sequence[str] | None = None) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    from apt_hf.modeling_apt_vit import AptViTForImageClassification

    args = parse_args(argv)
    num_scales = len(args.thresholds) + 1
    hidden, layers, heads, mlp = SIZES[args.size]
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                       image_size=args.image_size, patch_size=args.patch_size, num_labels=len(PHOTOS))
    torch.manual_seed(0)
    stock = ViTForImageClassification(config)
    data = batches(args, num_scales)
    uniform, merged = data[str([-1.0] * (num_scales - 1))], data[str(list(args.thresholds))]
    dense = torch.stack(unpack_base_patches(uniform["pixel_values"], PatchLayout.from_inputs(uniform)))
    device, dtype = args.device, TORCH_DTYPES[args.dtype]

    def on_device(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(device) for k, v in batch.items() if not k.startswith("_")}

    runs: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {
        "stock": (stock, {"pixel_values": dense.to(device), "labels": uniform["labels"].to(device)})}
    backends = args.attn or [None]
    for backend in backends:
        suffix = f" {backend}" if backend else ""
        for name, batch in ((f"APT [-1]{suffix}", uniform), (f"APT {list(args.thresholds)}{suffix}", merged)):
            apt = AptViTForImageClassification.from_vit(copy.deepcopy(stock), image_mean=[0.5] * 3,
                                                        image_std=[0.5] * 3, num_scales=num_scales,
                                                        thresholds=list(args.thresholds))
            if backend:
                apt.set_attn_implementation(backend)
            runs[name] = (apt, on_device(batch))
    optimizers = {}
    for name, (model, _) in runs.items():
        model.to(device).train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, (model, batch) in runs.items():  # warm-up (and the optimizer's state allocation)
        train_step(model, optimizers[name], batch, device, dtype)
    for _ in range(args.steps):
        for name, (model, batch) in runs.items():
            times[name].append(timed(lambda m=model, o=optimizers[name], b=batch: train_step(m, o, b, device, dtype),
                                     device, args.clock))

    stock_flops = vision_flops(config, PatchLayout.from_inputs(uniform), apt=False)
    flops = {"uniform": vision_flops(config, PatchLayout.from_inputs(uniform), apt=True),
             "merged": vision_flops(config, PatchLayout.from_inputs(merged), apt=True)}
    cells = float(uniform["image_grid_hw"].prod(-1).double().mean())
    kept = float(merged["tokens_per_image"].double().mean())
    where = machine(device)
    print(f"## ViT classification training step: stock vs APT-packed, {args.size} {args.image_size}/{args.patch_size}, "
          f"batch {args.batch}, {args.dtype} on {device}\n")
    print(f"forward (labels) + backward + AdamW, all parameters trainable; entropy S={num_scales} {args.thresholds}; "
          f"photos: scikit-image's {len(PHOTOS)} repeated to the batch; median of {args.steps} ({args.clock} clock) "
          f"after a warm-up step; processor (in DataLoader workers when training): "
          f"{1e3 * merged['_collate_seconds']:.0f} ms per batch; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {where}\n")
    print("| run | tokens / image | kept | step s | images / s | speedup | ideal (FLOP ratio) | measured / ideal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = statistics.median(times["stock"])
    for name in runs:
        seconds = statistics.median(times[name])
        is_merged = name.startswith("APT") and "[-1]" not in name
        tokens = kept if is_merged else cells
        ideal = 1.0 if name == "stock" else stock_flops / flops["merged" if is_merged else "uniform"]
        speedup = base / seconds
        print(f"| {name} | {tokens:.1f} | {100 * tokens / cells:.1f}% | {seconds:.3f} | {args.batch / seconds:.1f} | "
              f"{speedup:.2f}x | {ideal:.2f}x | {100 * speedup / ideal:.0f}% |")


if __name__ == "__main__":
    main()
