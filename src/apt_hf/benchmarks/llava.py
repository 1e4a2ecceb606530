"""Stock LLaVA vs APT-LLaVA (packed and grid layouts) on real photographs, one run, random weights.

    python scripts/benchmark.py llava [--preset cpu|7b] [--batch_size 4] [--repeats 3] [--device cpu]
        [--dtype float32] [--thresholds 5.75] [--max_new_tokens 16] [--attn_implementation sdpa]

Prefill = one forward of a batch of prompts (one photo each), logits for the last position only, as
`generate` does; generation = `generate` with exactly `max_new_tokens` greedy tokens. Throughput is images
per second, median over repeats after one warm-up, the three models interleaved. The ideal speedup is the
FLOP ratio of the prefill from the actual token counts (tower, projector, language model), beside the
measured one; "with batch padding" counts the language model at each batch's padded length, as it runs
(packed prompts differ in length, so batches of several images pad to the longest). Presets: cpu = the
reduced model of issue 4 (768x6 tower at 336/14, 1024x6 language model); 7b = LLaVA-1.5-7B's shapes
(CLIP ViT-L/14-336 + Llama-2-7B), for a GPU in bf16.
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

from ..modeling_apt_llava import AptLlavaForConditionalGeneration
from ..processing_apt_llava import AptLlavaProcessor
from ..sample_images import load_photos
from ..tiny import build_tiny_llava, tiny_vision_config
from .timing import timed

PRESETS = {
    "cpu": {"vision": (768, 6, 12, 3072), "text": (1024, 6, 16, 2816)},
    "7b": {"vision": (1024, 24, 16, 4096), "text": (4096, 32, 32, 11008)},
}
PROMPT = "USER: <image>\nDescribe the image in one sentence. ASSISTANT:"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py llava", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[5.75])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--skip_generation", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock time, or this process's CPU time (robust on a busy machine; CPU only)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu: only meaningful with --device cpu")
    args.dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    return args


def layer_flops(tokens: Sequence[int], hidden: int, intermediate: int, mlp_matrices: int) -> float:
    """Multiply-adds x2 of one transformer layer over sequences of the given lengths."""
    linear = 2 * sum(tokens) * (4 * hidden * hidden + mlp_matrices * hidden * intermediate)
    return linear + 4 * hidden * sum(t * t for t in tokens)


def prefill_flops(model: Any, vision_tokens: Sequence[int], text_lengths: Sequence[int], lm_tokens: int) -> float:
    """Tower (CLS included) + projector + language model prefill, from actual token counts."""
    vc, tc = model.config.vision_config, model.config.text_config
    tower = vc.num_hidden_layers * layer_flops([t + 1 for t in vision_tokens], vc.hidden_size, vc.intermediate_size, 2)
    projector = 2 * lm_tokens * (vc.hidden_size * tc.hidden_size + tc.hidden_size ** 2)
    text = tc.num_hidden_layers * layer_flops(text_lengths, tc.hidden_size, tc.intermediate_size, 3)
    return tower + projector + text


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vision_hidden, vision_layers, vision_heads, vision_mlp = PRESETS[args.preset]["vision"]
    text_hidden, text_layers, text_heads, text_mlp = PRESETS[args.preset]["text"]
    vision = tiny_vision_config(hidden_size=vision_hidden, layers=vision_layers, heads=vision_heads, image_size=336,
                                patch_size=14, intermediate_size=vision_mlp)
    stock, stock_processor = build_tiny_llava(vision=vision, text_hidden_size=text_hidden, text_layers=text_layers,
                                              text_heads=text_heads, intermediate_size=text_mlp)
    stock.set_attn_implementation(args.attn_implementation)
    models = {"stock": (stock, stock_processor)}
    for layout in ("packed", "grid"):
        model = AptLlavaForConditionalGeneration.from_llava(stock, vision_feature_layout=layout,
                                                            thresholds=args.thresholds)
        processor = AptLlavaProcessor.from_llava_processor(stock_processor, vision_feature_layout=layout,
                                                           thresholds=args.thresholds)
        models[f"APT {layout}"] = (model, processor)
    for model, _ in models.values():
        model.to(device=args.device, dtype=args.dtype).eval()

    photos = list(load_photos().values())
    batches = [photos[i:i + args.batch_size] for i in range(0, len(photos) - args.batch_size + 1, args.batch_size)]
    inputs = {name: [processor(images=b, text=[PROMPT] * len(b), return_tensors="pt", padding=True)
                     .to(args.device) for b in batches] for name, (_, processor) in models.items()}
    for batch_inputs in inputs.values():
        for batch in batch_inputs:
            if batch["pixel_values"].is_floating_point():
                batch["pixel_values"] = batch["pixel_values"].to(args.dtype)
    n_images = sum(len(b) for b in batches)

    def prefill(name: str) -> Callable[[], Any]:
        model = models[name][0]
        return lambda: [model(**batch, logits_to_keep=1) for batch in inputs[name]]

    def generate(name: str) -> Callable[[], Any]:
        model = models[name][0]
        return lambda: [model.generate(**batch, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                       do_sample=False) for batch in inputs[name]]

    phases = {"prefill": prefill} if args.skip_generation else {"prefill": prefill, "generation": generate}
    times: dict[tuple[str, str], list[float]] = {(p, n): [] for p in phases for n in models}
    for phase, make in phases.items():
        for name in models:  # warm-up
            timed(make(name), args.device, args.clock)
        for _ in range(args.repeats):
            for name in models:
                times[(phase, name)].append(timed(make(name), args.device, args.clock))

    image_token = stock.config.image_token_id
    stats = {}
    for name, (model, _) in models.items():
        lm_visual = sum(int((b["input_ids"] == image_token).sum()) for b in inputs[name])
        lengths = [int(n) for b in inputs[name] for n in b["attention_mask"].sum(-1)]
        tower_tokens = ([int(t) for b in inputs[name] for t in b["tokens_per_image"]] if "tokens_per_image" in
                        inputs[name][0] else [24 * 24] * n_images)
        padded = [b["input_ids"].shape[1] for b in inputs[name] for _ in range(b["input_ids"].shape[0])]
        stats[name] = (lm_visual / n_images, prefill_flops(model, tower_tokens, lengths, lm_visual),
                       prefill_flops(model, tower_tokens, padded, lm_visual))

    print(f"## LLaVA-1.5 ({args.preset} preset) stock vs APT, thresholds {args.thresholds}\n")
    print(f"{n_images} photos in batches of {args.batch_size}; {args.device} {str(args.dtype).split('.')[-1]}, "
          f"attn {args.attn_implementation}; tower {vision_hidden}x{vision_layers} at 336/14, language model "
          f"{text_hidden}x{text_layers}; median of {args.repeats} ({args.clock} clock); torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {platform.machine()} "
          f"x{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}\n")
    header = "| model | visual tokens to LM / image | ideal prefill speedup | ideal with batch padding |"
    header += "".join(f" {p} img/s | {p} speedup |" for p in phases)
    print(header)
    print("| --- " * (4 + 2 * len(phases)) + "|")
    for name in models:
        row = (f"| {name} | {stats[name][0]:.0f} | {stats['stock'][1] / stats[name][1]:.2f}x | "
               f"{stats['stock'][2] / stats[name][2]:.2f}x |")
        for phase in phases:
            seconds = statistics.median(times[(phase, name)])
            speedup = statistics.median(times[(phase, "stock")]) / seconds
            row += f" {n_images / seconds:.2f} | {speedup:.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
