"""Stock LLaVA vs APT-LLaVA (packed and grid layouts) on real photographs, one run, random weights.

    python scripts/benchmark.py llava [--family llava|llava_next|llava_onevision] [--preset tiny|small|cpu|7b]
        [--batch_size 1 4 8] [--repeats 3] [--device cpu] [--dtype float32] [--thresholds 5.75]
        [--max_new_tokens 16] [--attn_implementation sdpa] [--prefill padding-free|padded] [--json rows.json]

`--family` picks the model: LLaVA-1.5 (a CLIP tower at 336/14, one tile per image), LLaVA-NeXT (the same tower,
anyres tiles on LLaVA-NeXT's default pinpoints up to 672 x 672 and 1008 x 336, newline after every row) or
LLaVA-OneVision (a SigLIP tower at 384/14, no class token, anyres tiles on OneVision's default pinpoints up to
2304 x 2304 with "anyres_max_9"), each at the preset's widths. APT runs on every tile.

Prefill = one forward of a batch of prompts (one photo each), logits at each prompt's last token only, as `generate`
does. By default it runs padding-free, for stock and APT alike: the padded batch is flattened into one row of the
prompts back to back (`position_ids` restarting per prompt, no mask, no cache; on sdpa the language model uses
`apt_sdpa_packed`, attention per prompt), so each prompt costs its own length and APT's shorter prompts stay short
in a batch. `--prefill padded` runs the padded batch instead (every prompt at the batch's longest). Generation =
`generate` with exactly `max_new_tokens` greedy tokens, on the padded batch (it keeps a cache). The same
`--num_images` photos run at every `--batch_size`. Throughput is images per second, median over repeats after one
warm-up, the three models interleaved. The ideal speedup is the FLOP ratio of the prefill from the token counts as
they run (tower, projector, language model; padded lengths only with `--prefill padded`), beside the measured one.
Presets (tower at 336/14, language model): tiny (32x2, 64x2; a smoke test), small (384x4, 512x4: issue 13's
reduced model), cpu (768x6, 1024x6: issue 4's), 7b (CLIP ViT-L/14-336 + Llama-2-7B's shapes, for a GPU in bf16;
built directly on the device, with the tiny tokenizer's 512-token vocabulary instead of 32000).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import transformers
from transformers import LlavaNextConfig, LlavaOnevisionConfig, SiglipVisionConfig

from apt_hf.conversion import convert
from apt_hf.families import family_of
from apt_hf.flops import llava_prefill_flops
from apt_hf.padding_free import flatten_padded_batch, register_packed_sdpa
from apt_hf.sample_images import load_photos
from apt_hf.testing import build_tiny_llava, build_tiny_llava_next, build_tiny_llava_onevision, tiny_vision_config

from .results import row, write_json
from .timing import add_clock_arguments, apply_clock_arguments, machine, peak_memory, timed

PRESETS = {  # (hidden, layers, heads, mlp) of the tower and of the language model
    "tiny": {"vision": (32, 2, 4, 128), "text": (64, 2, 4, 128)},
    "small": {"vision": (384, 4, 6, 1536), "text": (512, 4, 8, 1408)},
    "cpu": {"vision": (768, 6, 12, 3072), "text": (1024, 6, 16, 2816)},
    "7b": {"vision": (1024, 24, 16, 4096), "text": (4096, 32, 32, 11008)},
}
FAMILIES = ("llava", "llava_next", "llava_onevision")
TITLES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision"}
PROMPT = "USER: <image>\nDescribe the image in one sentence. ASSISTANT:"
PREFILL_MODES = ("padding-free", "padded")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py llava", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="llava")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[1, 4, 8],
                        help="one or more batch sizes, each run on the same --num_images photos")
    parser.add_argument("--num_images", type=int, default=8,
                        help="photos per measurement (scikit-image's ten, repeated beyond ten)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[5.75])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--prefill", choices=PREFILL_MODES, default="padding-free",
                        help="padding-free (default): each batch flattened into one row; padded: as the processor "
                             "pads it")
    parser.add_argument("--skip_generation", action="store_true")
    add_clock_arguments(parser)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (for gpu_check)")
    args = parser.parse_args(argv)
    apply_clock_arguments(parser, args)
    if args.repeats < 1 or args.num_images < 1 or args.max_new_tokens < 1:
        parser.error("--repeats, --num_images and --max_new_tokens: expected >= 1")
    bad = [b for b in args.batch_size if b < 1 or args.num_images % b]
    if bad:
        parser.error(f"--batch_size: expected divisors of --num_images {args.num_images} (so that every batch size "
                     f"runs the same photos), got {bad}")
    args.dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    return args


def build_stock_llava(preset: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      family: str = "llava") -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """A stock LLaVA-1.5 / -NeXT / -OneVision of the preset's shapes with random weights, and its processor.

    The weights are created and initialised on `device` itself (a 7B model is never materialised on the CPU,
    whose random init alone would take minutes), then cast to `dtype`.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    vision_hidden, vision_layers, vision_heads, vision_mlp = PRESETS[preset]["vision"]
    text_hidden, text_layers, text_heads, text_mlp = PRESETS[preset]["text"]
    text = {"text_hidden_size": text_hidden, "text_layers": text_layers, "text_heads": text_heads,
            "intermediate_size": text_mlp}
    if family == "llava_onevision":
        vision = SiglipVisionConfig(hidden_size=vision_hidden, num_hidden_layers=vision_layers,
                                    num_attention_heads=vision_heads, intermediate_size=vision_mlp, image_size=384,
                                    patch_size=14, vision_use_head=False)
        build = partial(build_tiny_llava_onevision, vision=vision,
                        pinpoints=LlavaOnevisionConfig().image_grid_pinpoints, **text)
    else:
        vision = tiny_vision_config(hidden_size=vision_hidden, layers=vision_layers, heads=vision_heads,
                                    image_size=336, patch_size=14, intermediate_size=vision_mlp)
        build = partial(build_tiny_llava, vision=vision, **text) if family == "llava" else partial(
            build_tiny_llava_next, vision=vision, pinpoints=LlavaNextConfig().image_grid_pinpoints, **text)
    with torch.device(device):
        stock, processor = build()
    return stock.to(dtype=dtype), processor


def prefill_kwargs(batch: dict[str, Any], padding_free: bool) -> dict[str, Any]:
    """Keyword arguments of one prefill forward of a padded processor batch, logits at each prompt's last token.

    Padded: the batch as it is, `logits_to_keep=1` (prompts are left-padded). Padding-free: one flattened row
    (`flatten_padded_batch`) and the row positions of each prompt's last token.
    """
    if not padding_free:
        return {**batch, "logits_to_keep": 1}
    last = batch["attention_mask"].sum(-1).cumsum(0) - 1
    return {**flatten_padded_batch(dict(batch)), "logits_to_keep": last}


def attention_lengths(kwargs: dict[str, Any]) -> list[int]:
    """Lengths the language model attends over in one prefill: each prompt (flattened row), or each padded row."""
    if "position_ids" in kwargs:
        starts = (kwargs["position_ids"][0] == 0).nonzero().flatten().tolist() + [kwargs["input_ids"].shape[1]]
        return [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return [int(kwargs["input_ids"].shape[1])] * kwargs["input_ids"].shape[0]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    padding_free = args.prefill == "padding-free"
    stock, stock_processor = build_stock_llava(args.preset, args.device, args.dtype, args.family)
    stock.set_attn_implementation(args.attn_implementation)
    models = {"stock": (stock, stock_processor)}
    for layout in ("packed", "grid"):
        model = convert(stock, vision_feature_layout=layout, thresholds=args.thresholds)
        processor = family_of(type(model)).processor.from_stock_processor(
            stock_processor, vision_feature_layout=layout, thresholds=args.thresholds,
            patch_size=model.config.vision_config.patch_size)
        models[f"APT {layout}"] = (model, processor)
    text_attn = args.attn_implementation
    if padding_free and args.attn_implementation == "sdpa":  # sdpa would attend over the whole flattened row
        text_attn = register_packed_sdpa()
    for model, _ in models.values():
        model.to(device=args.device, dtype=args.dtype).eval()
        if text_attn != args.attn_implementation:
            model.set_attn_implementation({"text_config": text_attn})

    photos = list(load_photos().values())
    photos = (photos * (args.num_images // len(photos) + 1))[: args.num_images]
    inputs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for size in args.batch_size:
        for name, (_, processor) in models.items():
            batches = []
            for i in range(0, args.num_images, size):
                batch = processor(images=photos[i:i + size], text=[PROMPT] * size, return_tensors="pt",
                                  padding=True).to(args.device)
                if batch["pixel_values"].is_floating_point():
                    batch["pixel_values"] = batch["pixel_values"].to(args.dtype)
                batches.append(dict(batch))
            inputs[(size, name)] = batches
    prefill_inputs = {key: [prefill_kwargs(b, padding_free) for b in batches] for key, batches in inputs.items()}

    def prefill(size: int, name: str) -> Callable[[], Any]:
        model = models[name][0]
        return lambda: [model(**kwargs) for kwargs in prefill_inputs[(size, name)]]

    def generate(size: int, name: str) -> Callable[[], Any]:
        model = models[name][0]
        return lambda: [model.generate(**batch, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                       do_sample=False) for batch in inputs[(size, name)]]

    phases = {"prefill": prefill} if args.skip_generation else {"prefill": prefill, "generation": generate}
    times: dict[tuple[str, int, str], list[float]] = {}
    memory: dict[tuple[str, int, str], float | None] = {}
    for phase, make in phases.items():
        for size in args.batch_size:
            for name in models:  # warm-up, then peak memory (None off CUDA)
                timed(make(size, name), args.device, args.clock)
                memory[(phase, size, name)] = peak_memory(make(size, name), args.device)
            for _ in range(args.repeats):
                for name in models:
                    times.setdefault((phase, size, name), []).append(timed(make(size, name), args.device, args.clock))

    image_token = stock.config.image_token_id
    class_token = args.family != "llava_onevision"  # SigLIP has none
    stats: dict[tuple[int, str], tuple[float, float, float, float]] = {}
    for (size, name), kwargs_list in prefill_inputs.items():
        batches = inputs[(size, name)]
        lm_visual = sum(int((b["input_ids"] == image_token).sum()) for b in batches)
        lengths = [n for kwargs in kwargs_list for n in attention_lengths(kwargs)]
        # tower tokens per tile: what APT kept, or (stock) every tile's full grid, the tiles read off the APT run's
        # processor output for the same photos
        tiles = batches if "tokens_per_image" in batches[0] else inputs[(size, "APT packed")]
        key = "tokens_per_image" if "tokens_per_image" in batches[0] else None
        tower_tokens = [int(t) for b in tiles for t in (b[key] if key else b["image_grid_hw"].prod(-1))]
        stats[(size, name)] = (lm_visual / args.num_images, sum(lengths) / args.num_images,
                               llava_prefill_flops(models[name][0], tower_tokens, lengths, lm_visual, class_token),
                               sum(tower_tokens) / args.num_images)

    cuda = args.device.startswith("cuda")
    dtype = str(args.dtype).split(".")[-1]
    vh, vl = PRESETS[args.preset]["vision"][:2]
    th, tl = PRESETS[args.preset]["text"][:2]
    where = machine(args.device)
    print(f"## {TITLES[args.family]} ({args.preset} preset) stock vs APT, thresholds {args.thresholds}\n")
    print(f"{args.num_images} photos at batch sizes {args.batch_size}; prefill {args.prefill} (stock and APT alike"
          f"{', language model on ' + text_attn if padding_free else ''}), generation padded with a cache; "
          f"{args.device} {dtype}, attn {args.attn_implementation}; tower {vh}x{vl} at "
          f"{stock.config.vision_config.image_size}/14, language model "
          f"{th}x{tl}; median of {args.repeats} ({args.clock} clock); torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {where}\n")
    header = ("| batch | model | tower tokens / image | visual tokens to LM / image | LM tokens run / image |"
              " ideal prefill speedup |"
              " prefill img/s | prefill speedup |" + (" prefill peak GiB |" if cuda else ""))
    if "generation" in phases:
        header += " generation img/s | generation speedup |" + (" generation peak GiB |" if cuda else "")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {(phase, size): [] for phase in phases for size in
                                                          args.batch_size}
    setting = f"{args.family}, {args.preset}, {dtype}, {args.attn_implementation}, {args.thresholds}"
    for size in args.batch_size:
        for name in models:
            visual, lm_run, flops, tower = stats[(size, name)]
            ideal = stats[(size, "stock")][2] / flops
            line = f"| {size} | {name} | {tower:.0f} | {visual:.0f} | {lm_run:.0f} | {ideal:.2f}x |"
            for phase in phases:
                seconds = statistics.median(times[(phase, size, name)])
                speedup = statistics.median(times[(phase, size, "stock")]) / seconds
                peak = memory[(phase, size, name)]
                line += f" {args.num_images / seconds:.2f} | {speedup:.2f}x |" + (f" {peak:.2f} |" if cuda else "")
                check = (f"LLaVA prefill ({args.prefill}), batch {size}" if phase == "prefill" else
                         f"LLaVA generation ({args.max_new_tokens} tokens, padded), batch {size}")
                rows[(phase, size)].append(row(
                    f"{check} [{setting}]", name, f"{args.num_images / seconds:.2f} img/s", tokens=visual,
                    speedup=speedup, ideal=ideal if phase == "prefill" else None, peak_gib=peak))
            print(line)
    flat = [r for group in rows.values() for r in group]  # grouped by phase, then batch size
    write_json(args.json, flat, suite="llava", preset=args.preset, family=args.family)
    return flat


if __name__ == "__main__":
    main()
