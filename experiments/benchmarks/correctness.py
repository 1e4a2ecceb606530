"""Correctness on the device, before any timing: every attention backend against per-image sdpa, layouts on the
device against the CPU's, padding-free LLaVA against padded, in float32 and bfloat16.

    python scripts/benchmark.py correctness [--device cuda] [--preset small] [--json rows.json]

Checks (random weights; the zero-MLP is randomised so that merged tokens matter):
  - vision, <dtype>: a CLIP tower at 336/14 with merging, each backend this machine runs on the packed batch, vs
    each image alone on sdpa (same dtype). CUDA-only kernels (flash-attention, varlen) need half precision: in
    float32 APT runs them as sdpa, so they are checked in bfloat16 only;
  - layouts on <device>: every scorer's layout of the photos computed on the device, and the model's dense-input
    layout (patchified inside forward), equal the processor's CPU layout exactly;
  - LLaVA prefill, <dtype>: APT-LLaVA's logits on the padding-free row equal the padded batch's, per language-model
    backend;
  - LLaVA training step, <dtype>: one padding-free step's loss and gradients (apt, projector) equal the padded one's.
A row says `ok` with the largest difference found and its tolerance, or `MISMATCH`; the exit code is 1 on any
mismatch. Tolerances: float32 1e-4 (absolute, plus 1e-4 relative), bfloat16 5e-2 (both).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.utils import is_torchvision_available

from apt_hf.image_processing_apt import AptImageProcessorPil
from apt_hf.modeling_apt import split_per_image
from apt_hf.modeling_apt_clip import AptCLIPVisionModel
from apt_hf.modeling_apt_llava import AptLlavaForConditionalGeneration
from apt_hf.padding_free import flatten_padded_batch, register_packed_sdpa, unflatten
from apt_hf.patchify import SCORERS, PatchLayout, compute_layout, default_thresholds, unpack_base_patches
from apt_hf.processing_apt_llava import AptLlavaProcessor
from apt_hf.sample_images import load_photos
from apt_hf.tasks.llava.arguments import ModelArguments
from apt_hf.tasks.llava.collator import AptLlavaDataCollator
from apt_hf.tasks.llava.model import setup_trainable

from .llava import PRESETS, PROMPT, build_stock_llava
from .results import row, write_json
from .vision import ATTN_CANDIDATES, SIZES, available_attn_implementations

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
CUDA_ONLY = ("flash_attention_2", "flash_attention_3", "apt_varlen")
LM_BACKENDS = ("sdpa", "apt_sdpa_packed", "eager", "flash_attention_2")
VISION_SIZE = {"cuda": "base", "cpu": "tiny"}  # SIZES of vision.py
# Row titles (the gpu_check table's "check" column).
VISION = "correctness: vision vs each image alone on sdpa"
LAYOUTS = "correctness: layouts on {device} vs the CPU processor"
PREFILL = "correctness: LLaVA prefill, padding-free vs padded"
TRAINING = "correctness: LLaVA training step (apt, projector), padding-free vs padded"
QUESTION = "<image>\nDescribe the image in one sentence."
ANSWER = "A photograph with a few distinct regions, some of them plain and some full of detail."


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmark.py correctness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="LLaVA shapes (default: small on CUDA, tiny on the CPU)")
    parser.add_argument("--images", type=int, default=4, help="photographs per batch (up to 10)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (for gpu_check)")
    args = parser.parse_args(argv)
    if not 2 <= args.images <= 10:
        parser.error(f"--images: expected 2..10 (the bundled photographs), got {args.images}")
    args.preset = args.preset or ("small" if args.device.startswith("cuda") else "tiny")
    return args


def difference(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> tuple[float, bool]:
    """(largest |got - want|, whether every element is within the dtype's tolerance, absolute plus relative)."""
    tolerance = TOLERANCE[dtype]
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    gap = (got - want).abs()
    return float(gap.max()) if gap.numel() else 0.0, bool((gap <= tolerance + tolerance * want.abs()).all())


def verdict(gaps: list[tuple[float, bool]], dtype: torch.dtype) -> str:
    worst = max(g for g, _ in gaps)
    state = "ok" if all(ok for _, ok in gaps) else "MISMATCH"
    return f"{state}: max |diff| {worst:.2e} (tolerance {TOLERANCE[dtype]:g})"


def vision_rows(device: str, images: int) -> list[dict[str, Any]]:
    """Each backend on the packed batch vs each image alone on sdpa, per dtype."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hidden, _, heads, mlp = SIZES[VISION_SIZE[torch.device(device).type]]
    torch.manual_seed(0)
    stock = CLIPVisionModel(CLIPVisionConfig(hidden_size=hidden, num_hidden_layers=4, num_attention_heads=heads,
                                             intermediate_size=mlp, image_size=336, patch_size=14))
    model = AptCLIPVisionModel.from_clip(stock, thresholds=[5.5], attn_implementation="sdpa").to(device).eval()
    torch.nn.init.normal_(model.embeddings.zero_mlp.weight, std=0.02)
    processor = AptImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                     patch_size=14, thresholds=[5.5])
    photos = list(load_photos().values())[:images]
    batch = {k: v.to(device) for k, v in processor(photos, return_tensors="pt").items()}
    singles = [{k: v.to(device) for k, v in processor([p], return_tensors="pt").items()} for p in photos]
    backends, refused = available_attn_implementations(model, ATTN_CANDIDATES)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            reference = [model(**single) for single in singles]
            for backend in backends:
                if dtype == torch.float32 and backend in CUDA_ONLY:
                    continue  # APT runs these as sdpa in float32 (with a warning)
                model.set_attn_implementation(backend)
                out = model(**batch)
                gaps = [difference(state, ref.last_hidden_state[0], dtype)
                        for state, ref in zip(split_per_image(out.last_hidden_state, out.cu_seqlens), reference,
                                              strict=True)]
                gaps += [difference(out.pooler_output[i], ref.pooler_output[0], dtype)
                         for i, ref in enumerate(reference)]
                rows.append(row(f"{VISION}, {_name(dtype)}", backend, verdict(gaps, dtype),
                                tokens=float(out.tokens_per_image.float().mean())))
    rows += [row(VISION, name, f"not run: {why}") for name, why in refused.items()]
    return rows


def layout_rows(device: str, images: int) -> list[dict[str, Any]]:
    """Layouts computed on the device (scoring, and the dense path inside forward) equal the CPU processor's."""
    photos = list(load_photos().values())[:images]
    rows = []
    for scorer in SCORERS:
        processor = AptImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                         patch_size=14, num_scales=3, scorer=scorer,
                                         thresholds=default_thresholds(3, scorer))
        batch = processor(photos, return_tensors="pt", do_normalize=False, do_rescale=False)
        layout = PatchLayout(*(batch[k] for k in PatchLayout.KEYS))
        pixels = torch.stack(unpack_base_patches(batch["pixel_values"], layout)).round().to(torch.uint8)
        on_device = compute_layout(pixels.to(device), 14, 3, processor.thresholds, scorer).to("cpu")
        same = all(torch.equal(getattr(on_device, k), getattr(layout, k)) for k in PatchLayout.KEYS)
        rows.append(row(LAYOUTS.format(device=device), scorer, "ok: identical" if same else "MISMATCH",
                        tokens=float(layout.tokens_per_image.float().mean())))
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = AptCLIPVisionModel.from_clip(CLIPVisionModel(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=336,
        patch_size=14)), thresholds=[5.5]).to(device)
    processor = AptImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                     patch_size=14, thresholds=[5.5])
    packed = processor(photos, return_tensors="pt")
    layout = PatchLayout(*(packed[k] for k in PatchLayout.KEYS))
    dense = torch.stack(unpack_base_patches(packed["pixel_values"], layout)).to(device)
    with torch.no_grad():
        out = model(pixel_values=dense)
    same = all(torch.equal(getattr(out, k).cpu(), getattr(layout, k)) for k in PatchLayout.KEYS)
    rows.append(row(LAYOUTS.format(device=device), "dense pixel_values inside forward",
                    "ok: identical" if same else "MISMATCH"))
    if is_torchvision_available():  # the torchvision backend preprocesses on the device itself (device=)
        from apt_hf.image_processing_apt import AptImageProcessor

        processor = AptImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      patch_size=14, thresholds=[5.5])
        on_cpu = processor(photos, return_tensors="pt")
        on_device = processor(photos, return_tensors="pt", device=device)
        same = all(torch.equal(on_device[k].cpu(), on_cpu[k]) for k in PatchLayout.KEYS)
        rows.append(row(LAYOUTS.format(device=device), "torchvision processor, device=",
                        "ok: identical" if same else "MISMATCH"))
    return rows


def _llava(preset: str, device: str, images: int) -> tuple[Any, AptLlavaProcessor, list[Any]]:
    stock, stock_processor = build_stock_llava(preset, device)
    model = AptLlavaForConditionalGeneration.from_llava(stock, thresholds=[5.75])
    torch.nn.init.normal_(model.model.vision_tower.embeddings.zero_mlp.weight, std=0.02)
    processor = AptLlavaProcessor.from_llava_processor(stock_processor, thresholds=[5.75])
    return model, processor, list(load_photos().values())[:images]


def llava_prefill_rows(preset: str, device: str, images: int) -> list[dict[str, Any]]:
    """Padding-free prefill logits equal the padded batch's (real positions), per language-model backend."""
    model, processor, photos = _llava(preset, device, images)
    model.eval()
    prompts = [PROMPT.replace("one sentence", "a few words" if i % 2 else "one sentence") for i in range(images)]
    batch = {k: v.to(device) for k, v in processor(images=photos, text=prompts, padding=True,
                                                    return_tensors="pt").items()}
    keep = batch["attention_mask"].bool()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        for backend in LM_BACKENDS:
            name = register_packed_sdpa() if backend == "apt_sdpa_packed" else backend
            try:
                model.set_attn_implementation({"text_config": name})
            except (ValueError, ImportError) as err:
                rows.append(row(f"{PREFILL}, {_name(dtype)}", backend,
                                f"not run: {str(err).split('. ')[0][:100]}"))
                continue
            if backend == "flash_attention_2" and dtype == torch.float32:
                continue  # flash-attention runs half precision only
            with torch.no_grad():
                padded = model(**batch).logits
                flat = unflatten(model(**flatten_padded_batch(dict(batch))).logits, batch["attention_mask"])
            rows.append(row(f"{PREFILL}, {_name(dtype)}", backend,
                            verdict([difference(flat[keep], padded[keep], dtype)], dtype)))
    return rows


def training_rows(preset: str, device: str, images: int) -> list[dict[str, Any]]:
    """One padding-free training step's loss and gradients (apt, projector) equal the padded step's."""
    model, processor, photos = _llava(preset, device, images)
    answers = [ANSWER[: 20 + 9 * i] for i in range(len(photos))]  # samples of different lengths
    samples = [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}],
                "images": [photo]} for answer, photo in zip(answers, photos, strict=True)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        results = {}
        for padding_free in (False, True):
            trained = setup_trainable(model.to(dtype), ModelArguments(trainable="apt,projector"),
                                      upcast=dtype != torch.float32).train()
            trained.set_attn_implementation({"text_config": register_packed_sdpa() if padding_free else "sdpa"})
            batch = AptLlavaDataCollator(processor, padding_free=padding_free)(samples)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            trained.zero_grad(set_to_none=True)
            autocast = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32
                        else contextlib.nullcontext())
            with autocast:
                loss = trained(**batch).loss
            loss.backward()
            results[padding_free] = (loss.detach(), {n: p.grad.detach().clone() for n, p in trained.named_parameters()
                                                     if p.grad is not None})
        (loss_a, grads_a), (loss_b, grads_b) = results[False], results[True]
        gaps = [difference(loss_b, loss_a, dtype)]
        gaps += [difference(grads_b[n], grads_a[n], dtype) for n in grads_a]
        rows.append(row(f"{TRAINING}, {_name(dtype)}",
                        f"loss + {len(grads_a)} gradients", verdict(gaps, dtype)))
    return rows


def _name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


CHECKS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "vision": lambda args: vision_rows(args.device, args.images),
    "layouts": lambda args: layout_rows(args.device, args.images),
    "llava-prefill": lambda args: llava_prefill_rows(args.preset, args.device, args.images),
    "train": lambda args: training_rows(args.preset, args.device, args.images),
}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = []
    for name, check in CHECKS.items():
        try:
            rows += check(args)
        except Exception as err:  # one broken check must not hide the others' rows
            rows.append(row(f"correctness: {name}", "error", f"MISMATCH: {type(err).__name__}: {str(err)[:160]}"))
    width = max(len(r["check"]) for r in rows)
    for r in rows:
        print(f"{r['check']:<{width}}  {r['run']:<34}  {r['result']}")
    write_json(args.json, rows, suite="correctness", device=args.device)
    if any(r["result"].startswith("MISMATCH") for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
