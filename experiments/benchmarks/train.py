"""One LLaVA training step (forward + backward), nothing merged vs APT, padded vs padding-free batches, one run.

    python scripts/benchmark.py train [--preset small|tiny|cpu|7b] [--batch_size 6] [--repeats 3] [--thresholds 5.75]
        [--trainable apt,projector] [--optimizer adamw] [--device cuda] [--dtype bfloat16] [--clock cpu] [--threads 1]

The batches are what `finetune_llava.py` trains on: `AptLlavaDataCollator` over the bundled photographs at 336/14
(one question and answer each), packed layout. `[-1]` merges nothing, so it costs what stock LLaVA costs. The ideal
speedup is the FLOP ratio (tower + projector + language model, at the lengths each batch actually runs: padded to
its longest sample, or flattened). Presets as `benchmark.py llava`'s; the default, small, is issue 13's reduced model
(a 384x4 tower and a 512x4 language model); 7b has LLaVA-1.5-7B's shapes and is built on the device. `--trainable`
picks what gets gradients, as `finetune_llava.py --trainable` does (default: every part); in bfloat16 / float16 the
trained parameters are float32 and the step runs under autocast, as the Trainer does. `--optimizer adamw` adds the
optimizer step to the timed step (full AdamW on a 7B model does not fit one GPU: use `--trainable apt,projector`).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import transformers

from apt_hf.flops import llava_prefill_flops
from apt_hf.modeling_apt_llava import AptLlavaForConditionalGeneration
from apt_hf.padding_free import register_packed_sdpa
from apt_hf.patchify import PatchLayout
from apt_hf.processing_apt_llava import AptLlavaProcessor
from apt_hf.sample_images import load_photos
from apt_hf.tasks.llava.arguments import TRAINABLE_PARTS, ModelArguments
from apt_hf.tasks.llava.collator import AptLlavaDataCollator
from apt_hf.tasks.llava.model import setup_trainable

from .llava import PRESETS, attention_lengths, build_stock_llava
from .results import row, write_json
from .timing import add_clock_arguments, apply_clock_arguments, machine, peak_memory, timed

QUESTION = "<image>\nDescribe the image in one sentence."
ANSWER = "A photograph with a few distinct regions, some of them plain and some full of detail."
_HALF = (torch.bfloat16, torch.float16)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch_size", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[5.75])
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--trainable", default=",".join(TRAINABLE_PARTS),
                        help=f"comma list of {', '.join(TRAINABLE_PARTS)} (default: all of them)")
    parser.add_argument("--optimizer", choices=("none", "adamw"), default="none",
                        help="adamw: time the optimizer step too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the frozen weights (trained ones stay float32)")
    add_clock_arguments(parser)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (for gpu_check)")
    parser.add_argument("--parts", action="store_true",
                        help="also time the padding-free steps' parts: the vision tower (forward + backward) alone, "
                             "the APT embedding alone, and the rest (projector, language model, loss) by difference")
    args = parser.parse_args(argv)
    if args.repeats < 1 or not 1 <= args.batch_size <= 10:
        parser.error(f"--repeats >= 1 and --batch_size 1..10 (the bundled photographs) expected, got {args.repeats} "
                     f"and {args.batch_size}")
    apply_clock_arguments(parser, args)
    args.dtype = getattr(torch, args.dtype)
    return args


class TrainStep:
    """zero_grad, forward (under autocast for half-precision weights), backward, and the optimizer step if any."""

    def __init__(self, model: torch.nn.Module, batch: dict[str, Any], optimizer: str, device: str,
                 dtype: torch.dtype) -> None:
        self.model, self.batch = model, batch
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = (torch.optim.AdamW(params, lr=1e-5, fused=device.startswith("cuda") or None)
                          if optimizer == "adamw" else None)
        device_type = torch.device(device).type
        self.autocast = ((lambda: torch.autocast(device_type, dtype=dtype)) if dtype in _HALF else
                         contextlib.nullcontext)

    def __call__(self) -> float:
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad(), self.autocast():
            loss = self.model(**self.batch).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        return float(loss.detach())


class TowerStep:
    """The vision tower's forward + backward alone on a batch's images, or only its APT patch embedding."""

    def __init__(self, step: TrainStep, embedding_only: bool) -> None:
        self.step, self.embedding_only = step, embedding_only
        self.tower = step.model.model.vision_tower
        self.layout = {k: step.batch[k] for k in PatchLayout.KEYS}

    def __call__(self) -> None:
        self.tower.zero_grad(set_to_none=True)
        pixels = self.step.batch["pixel_values"]
        with torch.enable_grad(), self.step.autocast():
            if self.embedding_only:
                embeddings = self.tower.embeddings
                out = embeddings(*embeddings.prepare_inputs(pixels, self.layout, None))
            else:
                out = self.tower(pixel_values=pixels, **self.layout).last_hidden_state
            total = out.float().sum()
        total.backward()


def _print_parts(runs: dict[str, TrainStep], times: dict[str, list[float]], args: argparse.Namespace) -> None:
    """Where a padding-free step's time goes, [-1] vs the thresholds: tower, APT embedding, the rest by difference."""
    names = [n for n in runs if n.endswith("padding-free")]
    parts = {(n, kind): TowerStep(runs[n], kind == "embedding") for n in names for kind in ("tower", "embedding")}
    part_times: dict[tuple[str, str], list[float]] = {key: [] for key in parts}
    for step in parts.values():  # warm-up
        timed(step, args.device, args.clock)
    for _ in range(args.repeats):
        for key, step in parts.items():
            part_times[key].append(timed(step, args.device, args.clock))
    med = {key: statistics.median(v) for key, v in part_times.items()}
    whole = {n: statistics.median(times[n]) for n in names}
    rows = [("whole step (padding-free)", whole),
            ("vision tower, forward + backward", {n: med[(n, "tower")] for n in names}),
            ("of which the APT embedding", {n: med[(n, "embedding")] for n in names}),
            ("of which the encoder layers", {n: med[(n, "tower")] - med[(n, "embedding")] for n in names}),
            ("projector + language model + loss", {n: whole[n] - med[(n, "tower")] for n in names})]
    a, b = names
    print(f"\n### Where the padding-free step's time goes (median of {args.repeats}, {args.clock} clock)\n")
    print(f"| part | {a.split(' ')[0]} s | {b.split(' ')[0]} s | speedup |\n| --- | ---: | ---: | ---: |")
    for label, values in rows:
        print(f"| {label} | {values[a]:.2f} | {values[b]:.2f} | {values[a] / values[b]:.2f}x |")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    stock, stock_processor = build_stock_llava(args.preset, args.device, args.dtype)
    stock.set_attn_implementation(args.attn_implementation)
    photos = list(load_photos().values())[: args.batch_size]
    rows = [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
             "images": [photo]} for photo in photos]
    model_args = ModelArguments(trainable=args.trainable)
    runs: dict[str, TrainStep] = {}
    stats = {}
    for thresholds in ([-1.0], list(args.thresholds)):
        processor = AptLlavaProcessor.from_llava_processor(stock_processor, thresholds=thresholds)
        for padding_free in (False, True):
            model = AptLlavaForConditionalGeneration.from_llava(stock, thresholds=thresholds).train()
            if padding_free and args.attn_implementation == "sdpa":
                model.set_attn_implementation({"text_config": register_packed_sdpa()})
            model = setup_trainable(model, model_args, upcast=args.dtype in _HALF)
            batch = AptLlavaDataCollator(processor, padding_free=padding_free)(rows)
            batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            name = f"{thresholds} {'padding-free' if padding_free else 'padded'}"
            runs[name] = TrainStep(model, batch, args.optimizer, args.device, args.dtype)
            visual = int((batch["input_ids"] == stock.config.image_token_id).sum())
            flops = llava_prefill_flops(model, batch["tokens_per_image"].tolist(), attention_lengths(batch), visual)
            stats[name] = (visual / len(rows), batch["input_ids"].numel() / len(rows), flops)
    times: dict[str, list[float]] = {name: [] for name in runs}
    memory = {}
    for name, step in runs.items():  # warm-up, then peak memory (None off CUDA)
        timed(step, args.device, args.clock)
        memory[name] = peak_memory(step, args.device)
    for _ in range(args.repeats):
        for name, step in runs.items():
            times[name].append(timed(step, args.device, args.clock))

    cuda = args.device.startswith("cuda")
    dtype = str(args.dtype).split(".")[-1]
    vh, vl = PRESETS[args.preset]["vision"][:2]
    th, tl = PRESETS[args.preset]["text"][:2]
    where = machine(args.device)
    base = f"{[-1.0]} padded"
    print(f"## LLaVA training step (forward + backward{' + AdamW' if args.optimizer == 'adamw' else ''}), batch "
          f"{len(rows)}, thresholds {args.thresholds}, trainable {args.trainable}\n")
    print(f"{args.preset} preset: tower {vh}x{vl} at 336/14, language model {th}x{tl}; {args.attn_implementation}, "
          f"{dtype} on {args.device}; median of {args.repeats} ({args.clock} clock); torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {where}\n")
    header = "| batch | visual tokens / sample | LM tokens run / sample | step s | speedup | ideal (FLOP ratio) |"
    print(header + (" peak GiB |" if cuda else ""))
    print("| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if cuda else ""))
    out = []
    check = (f"LLaVA training step ({args.trainable}{', AdamW' if args.optimizer == 'adamw' else ''}), batch "
             f"{len(rows)} [{args.preset}, {dtype}, {args.attn_implementation}]")
    for name in runs:
        seconds = statistics.median(times[name])
        speedup = statistics.median(times[base]) / seconds
        ideal = stats[base][2] / stats[name][2]
        print(f"| {name} | {stats[name][0]:.0f} | {stats[name][1]:.0f} | {seconds:.2f} | {speedup:.2f}x | "
              f"{ideal:.2f}x |" + (f" {memory[name]:.2f} |" if cuda else ""))
        out.append(row(check, name, f"{seconds:.3f} s / step", tokens=stats[name][0], speedup=speedup, ideal=ideal,
                       peak_gib=memory[name]))
    write_json(args.json, out, suite="train", preset=args.preset)
    if args.parts:
        _print_parts(runs, times, args)
    return out


if __name__ == "__main__":
    main()
