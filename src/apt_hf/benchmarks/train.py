"""One LLaVA training step (forward + backward), nothing merged vs APT, padded vs padding-free batches, one run.

    python scripts/benchmark.py train [--batch_size 6] [--repeats 3] [--thresholds 5.75] [--clock cpu] [--threads 1]

The batches are what `finetune_llava.py` trains on: `AptLlavaDataCollator` over the bundled photographs at 336/14
(one question and answer each), packed layout. `[-1]` merges nothing, so it costs what stock LLaVA costs. The ideal
speedup is the FLOP ratio (tower + projector + language model, at the lengths each batch actually runs: padded to
its longest sample, or flattened). The model is issue 13's reduced one: a 384x4 tower and a 512x4 language model.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Sequence

import torch
import transformers

from ..modeling_apt_llava import AptLlavaForConditionalGeneration
from ..processing_apt_llava import AptLlavaProcessor
from ..sample_images import load_photos
from ..tiny import build_tiny_llava, tiny_vision_config
from ..training.collator import AptLlavaDataCollator
from ..training.packed_lm_attention import register as register_packed_sdpa
from .llava import prefill_flops
from .timing import timed

QUESTION = "<image>\nDescribe the image in one sentence."
ANSWER = "A photograph with a few distinct regions, some of them plain and some full of detail."


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[5.75])
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def step(model: torch.nn.Module, batch: dict) -> None:
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        model(**batch).loss.backward()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vision = tiny_vision_config(hidden_size=384, layers=4, heads=6, image_size=336, patch_size=14,
                                intermediate_size=1536)
    stock, stock_processor = build_tiny_llava(vision=vision, text_hidden_size=512, text_layers=4, text_heads=8,
                                              intermediate_size=1408)
    stock.set_attn_implementation(args.attn_implementation)
    photos = list(load_photos().values())[: args.batch_size]
    rows = [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
             "images": [photo]} for photo in photos]
    runs, stats = {}, {}
    for thresholds in ([-1.0], list(args.thresholds)):
        processor = AptLlavaProcessor.from_llava_processor(stock_processor, thresholds=thresholds)
        for padding_free in (False, True):
            model = AptLlavaForConditionalGeneration.from_llava(stock, thresholds=thresholds).train()
            if padding_free and args.attn_implementation == "sdpa":
                model.set_attn_implementation({"text_config": register_packed_sdpa()})
            batch = AptLlavaDataCollator(processor, padding_free=padding_free)(rows)
            name = f"{thresholds} {'padding-free' if padding_free else 'padded'}"
            runs[name] = (model, batch)
            visual = int((batch["input_ids"] == stock.config.image_token_id).sum())
            stats[name] = (visual / len(rows), batch["input_ids"].numel() / len(rows),
                           prefill_flops(model, batch["tokens_per_image"].tolist(), _attention_lengths(batch),
                                         visual))
    times = {name: [] for name in runs}
    for model, batch in runs.values():  # warm-up
        timed(lambda m=model, b=batch: step(m, b), "cpu", args.clock)
    for _ in range(args.repeats):
        for name, (model, batch) in runs.items():
            times[name].append(timed(lambda m=model, b=batch: step(m, b), "cpu", args.clock))

    base = f"{[-1.0]} padded"
    print(f"## LLaVA training step (forward + backward), batch {len(rows)}, thresholds {args.thresholds}\n")
    print(f"tower 384x4 at 336/14, language model 512x4; {args.attn_implementation}, fp32; median of {args.repeats} "
          f"({args.clock} clock); torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, {platform.machine()} x{os.cpu_count()}\n")
    print("| batch | visual tokens / sample | LM tokens run / sample | step s | speedup | ideal (FLOP ratio) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in runs:
        seconds = statistics.median(times[name])
        speedup = statistics.median(times[base]) / seconds
        print(f"| {name} | {stats[name][0]:.0f} | {stats[name][1]:.0f} | {seconds:.2f} | {speedup:.2f}x | "
              f"{stats[base][2] / stats[name][2]:.2f}x |")


def _attention_lengths(batch: dict) -> list[int]:
    """The sequence lengths attention runs over: every padded row, or each flattened sample."""
    if "position_ids" in batch:
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        return [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return [int(batch["input_ids"].shape[1])] * batch["input_ids"].shape[0]


if __name__ == "__main__":
    main()
