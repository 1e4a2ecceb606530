"""`python scripts/evaluate_vit.py --model_name_or_path M --data_path D --output_dir OUT [...]`.

Top-1, top-5, images/s and tokens per image of one classifier at several threshold settings in one run, as the
paper's accuracy / throughput trade-off tables and figures report them. By default two settings: `-1` (nothing
merged: the stock model's accuracy and speed) and the model's own thresholds; `--thresholds` lists others and
`--sweep` adds a range. Every image is decoded once per batch and processed once per setting (the processor runs
in DataLoader workers); the model runs every setting on the same batch in turn, so all settings see the same
images and the same machine load. images/s is the model's forward pass alone (synchronised on CUDA; the first
batch is a warm-up and not timed), i.e. model throughput, as the paper reports it.

Writes OUT/results.json (a list of rows), OUT/results.md (the table) and OUT/accuracy_vs_speed.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...dtypes import TORCH_DTYPES
from ...flops import vision_flops
from ...patchify import PatchLayout
from ...plots import save_line_chart
from .collator import AptImageClassificationCollator
from .data import load_classification_data
from .model import load_classifier, load_image_processor, read_config

RESULTS_JSON, RESULTS_MD, PLOT_PNG = "results.json", "results.md", "accuracy_vs_speed.png"
TOP_K = 5

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate_vit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True,
                        help="APT-ViT checkpoint, or a stock ViTForImageClassification (converted on the fly)")
    parser.add_argument("--data_path", required=True,
                        help="folder of class folders (e.g. ImageNet's val/), a saved datasets folder or a datasets id")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--split", default="validation", help="split of a datasets source (default validation)")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--thresholds", nargs="+", default=None, metavar="T[,T...]",
                        help="settings to evaluate, each S-1 comma-separated thresholds; -1 merges nothing. Default: "
                             "-1 and the model's own thresholds")
    parser.add_argument("--sweep", nargs=3, type=float, default=None, metavar=("START", "STOP", "STEP"),
                        help="also evaluate thresholds START, START+STEP, ..., STOP (the same value at every scale)")
    parser.add_argument("--num_scales", type=int, default=None,
                        help="S when converting a stock model (default: from --thresholds, else 2)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_samples", type=int, default=None, help="a seeded random subset of this many images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers that decode and process the images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    parser.add_argument("--attn_implementation", default=None,
                        help="sdpa, eager, flex_attention, varlen or flash_attention_2 (default: the model's choice)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size: expected a positive int, got {args.batch_size}")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max_samples: expected a positive int, got {args.max_samples}")
    if args.sweep is not None and (args.sweep[2] <= 0 or args.sweep[1] < args.sweep[0]):
        parser.error(f"--sweep: expected START <= STOP and STEP > 0, got {args.sweep}")
    return args


def parse_setting(text: str, num_scales: int | None) -> list[float]:
    """'5.5' / '5.5,4.0' / '-1' -> thresholds; '-1' expands to S-1 values once S is known."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"thresholds: expected comma-separated numbers such as 5.5 or 5.5,4.0, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"thresholds: expected finite numbers such as 5.5 or 5.5,4.0, got {text!r}")
    if values == [-1.0] and num_scales is not None:
        return [-1.0] * (num_scales - 1)
    if num_scales is not None and len(values) != num_scales - 1:
        raise ValueError(f"thresholds: the model has num_scales={num_scales}, so each setting needs "
                         f"{num_scales - 1} value(s), got {text!r}")
    return values


def resolve_settings(args: argparse.Namespace, model_thresholds: list[float] | None,
                     num_scales: int) -> list[list[float]]:
    """The settings of the run, in order, without duplicates: given (or -1 + the model's own), then the sweep."""
    given = args.thresholds if args.thresholds is not None else ["-1"]
    settings = [parse_setting(t, num_scales) for t in given]
    if args.thresholds is None and model_thresholds is not None:
        settings.append([float(v) for v in model_thresholds])
    if args.sweep is not None:
        start, stop, step = args.sweep
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        settings += [[round(start + i * step, 6)] * (num_scales - 1) for i in range(count)]
    unique: list[list[float]] = []
    for setting in settings:
        if setting not in unique:
            unique.append(setting)
    return unique


def _num_scales_for(args: argparse.Namespace, config: Any) -> int:
    if getattr(config, "model_type", None) == "apt_vit" and args.num_scales is None:
        return int(config.num_scales)
    if args.num_scales is not None:
        return args.num_scales
    lengths = {len(parse_setting(t, None)) for t in (args.thresholds or []) if parse_setting(t, None) != [-1.0]}
    if len(lengths) > 1:
        raise ValueError(f"thresholds: settings of different lengths {sorted(lengths)}; all need num_scales - 1 values")
    return lengths.pop() + 1 if lengths else 2


class MultiSettingCollator:
    """Open a batch's images once, then run the APT processor once per setting (in the DataLoader worker)."""

    def __init__(self, processor: Any, settings: list[list[float]], image_column: str, label_column: str) -> None:
        self.collator = AptImageClassificationCollator(processor, image_column, label_column)
        self.settings = settings

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        broken = self.collator.broken_images
        images, labels = self.collator.examples(features)
        processor = self.collator.processor
        per_setting = [dict(processor(images, thresholds=t, return_tensors="pt")) for t in self.settings]
        return {"labels": torch.tensor(labels), "inputs": per_setting,
                "broken_images": self.collator.broken_images - broken}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def evaluate(model: torch.nn.Module, processor: Any, data: Any, settings: list[list[float]], batch_size: int,
             num_workers: int, device: str, dtype: torch.dtype) -> tuple[list[dict[str, Any]], int]:
    """(one row of accuracy / speed / tokens per setting, images skipped as broken)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    collate = MultiSettingCollator(processor, settings, data.image_column, data.label_column)
    loader = DataLoader(data.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate, persistent_workers=False)
    k = min(TOP_K, int(model.config.num_labels))
    stats = [{"top1": 0, "top5": 0, "images": 0, "seconds": 0.0, "tokens": 0, "cells": 0, "flops": 0.0}
             for _ in settings]
    broken = 0
    warm = False
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"evaluating {len(settings)} setting(s)", unit="batch"):
            broken += int(batch["broken_images"])
            labels = batch["labels"].to(device)
            inputs = [{key: (v.to(device, dtype) if key == "pixel_values" else v.to(device)) for key, v in s.items()}
                      for s in batch["inputs"]]
            if not warm:  # first batch: kernels, caches and allocator warm up, untimed
                for x in inputs:
                    model(**x)
                warm = True
            for stat, x in zip(stats, inputs, strict=True):
                _sync(device)
                start = time.perf_counter()
                logits = model(**x).logits
                _sync(device)
                stat["seconds"] += time.perf_counter() - start
                top = logits.float().topk(k, dim=-1).indices
                hits = top == labels[:, None]
                stat["top1"] += int(hits[:, 0].sum())
                stat["top5"] += int(hits.any(-1).sum())
                stat["images"] += len(labels)
                stat["tokens"] += int(x["tokens_per_image"].sum())
                stat["cells"] += int(x["image_grid_hw"].prod(-1).sum())
                stat["flops"] += float(vision_flops(model.config, PatchLayout.from_inputs(x), apt=True))
    rows = []
    for setting, stat in zip(settings, stats, strict=True):
        n = max(stat["images"], 1)
        rows.append({
            "thresholds": setting, "num_scales": int(model.config.num_scales), "scorer": model.config.scorer,
            "top1": stat["top1"] / n, "top5": stat["top5"] / n, "images": stat["images"],
            "images_per_second": stat["images"] / stat["seconds"] if stat["seconds"] > 0 else float("nan"),
            "tokens_per_image": stat["tokens"] / n, "tokens_kept": stat["tokens"] / max(stat["cells"], 1),
            "flops": stat["flops"],
        })
    base = next((r for r in rows if max(r["thresholds"], default=-1.0) <= 0), None)
    for row in rows:
        row["speedup"] = row["images_per_second"] / base["images_per_second"] if base else None
        row["ideal_speedup"] = base["flops"] / row["flops"] if base and row["flops"] > 0 else None
    return rows, broken


def _label(thresholds: list[float]) -> str:
    return "[-1] (nothing merged)" if max(thresholds, default=-1.0) <= 0 else str(thresholds)


def write_results(rows: list[dict[str, Any]], output_dir: Path, header: dict[str, Any]) -> dict[str, Path]:
    """results.json (rows), results.md (header + table) and accuracy_vs_speed.png (one point per setting; only with
    matplotlib, the plot extra)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / RESULTS_JSON, "md": output_dir / RESULTS_MD, "png": output_dir / PLOT_PNG}
    paths["json"].write_text(json.dumps(rows, indent=2))
    lines = [f"## {header['model']} on {header['data']}", "",
             f"{header['images']} images ({header['broken']} broken, skipped); {header['device']}, {header['dtype']}, "
             f"batch {header['batch_size']}; images/s: the model's forward pass (processor excluded), first batch "
             f"untimed; torch {torch.__version__}, transformers {header['transformers']}", "",
             "| thresholds | top-1 (%) | top-5 (%) | images/s | speedup | ideal (FLOP ratio) | tokens / image | "
             "tokens kept |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "–"
        ideal = f"{r['ideal_speedup']:.2f}x" if r.get("ideal_speedup") is not None else "–"
        lines.append(f"| {_label(r['thresholds'])} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} | "
                     f"{r['images_per_second']:.1f} | {speedup} | {ideal} | {r['tokens_per_image']:.1f} | "
                     f"{100 * r['tokens_kept']:.1f}% |")
    paths["md"].write_text("\n".join(lines) + "\n")
    series = {"top-1": [(r["images_per_second"], 100 * r["top1"]) for r in rows],
              "top-5": [(r["images_per_second"], 100 * r["top5"]) for r in rows]}
    title = f"{Path(header['model']).name}: accuracy vs images/s ({len(rows)} threshold settings)"
    labels = {"top-1": [_label(r["thresholds"]).split(" ")[0] for r in rows]}
    if save_line_chart(paths["png"], series, title, "images / s", "accuracy %", point_labels=labels) is None:
        del paths["png"]
    return paths


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    import transformers

    args = parse_args(argv)
    config = read_config(args.model_name_or_path)
    num_scales = _num_scales_for(args, config)
    # A stock model is converted with S scales and that S's default thresholds ("the model's own" row); the
    # processor applies each setting in turn, so every row runs the same weights.
    fields = {"num_scales": num_scales} if config.model_type != "apt_vit" or args.num_scales is not None else {}
    model, converted = load_classifier(args.model_name_or_path, apt_fields=fields,
                                       attn_implementation=args.attn_implementation)
    processor = load_image_processor(args.model_name_or_path, model)
    settings = resolve_settings(args, list(model.config.thresholds), num_scales)
    data = load_classification_data(args.data_path, args.image_column, args.label_column, args.split,
                                    args.dataset_config, args.max_samples, args.seed)
    if len(data.class_names) != model.config.num_labels:
        raise ValueError(f"data_path: {args.data_path!r} has {len(data.class_names)} classes but the model's head has "
                         f"{model.config.num_labels}; evaluate on data with the head's classes (ids in the same order)")
    model = model.to(args.device, TORCH_DTYPES[args.dtype]).eval()
    print(f"{'stock ViT converted to APT' if converted else 'APT-ViT'} {args.model_name_or_path}: {len(data)} images, "
          f"settings {[_label(s) for s in settings]}", flush=True)
    rows, broken = evaluate(model, processor, data, settings, args.batch_size, args.num_workers, args.device,
                            TORCH_DTYPES[args.dtype])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.machine()} x{os.cpu_count()}, {torch.get_num_threads()} threads)"
    header = {"model": args.model_name_or_path, "data": args.data_path, "images": rows[0]["images"] if rows else 0,
              "broken": broken, "device": device, "dtype": args.dtype, "batch_size": args.batch_size,
              "transformers": transformers.__version__}
    paths = write_results(rows, args.output_dir, header)
    print(paths["md"].read_text())
    print(f"wrote {paths['json']}, {paths['md']} and {paths['png']}", flush=True)
    return rows


__all__ = ["MultiSettingCollator", "evaluate", "main", "parse_setting", "resolve_settings", "write_results"]
