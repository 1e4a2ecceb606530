"""The main job on a built-in default: APT end to end on real photographs, offline, on CPU, in a few minutes.

    python scripts/demo.py [--output_dir outputs/demo] [--skip_training]

1. patchify scikit-image's photographs at LLaVA-1.5's setting (336/14, S=2, [5.75]) and the paper's 3-scale
   setting (S=3, [5.5, 4.0]); write the uniform-vs-APT pictures and print tokens kept per image;
2. convert a CLIP vision tower to APT and show that, with nothing merged, it reproduces the stock tower;
3. convert a tiny LLaVA-1.5 to APT-LLaVA (packed and grid layouts) and chat with it about a photo, then the same
   with a tiny LLaVA-NeXT (any-resolution tiles, APT on every tile);
4. fine-tune it with recipes/tiny-cpu.yaml through `accelerate launch` and chat with the result.
Real checkpoints (openai/clip-vit-large-patch14-336, llava-hf/llava-1.5-7b-hf) work the same way; see README.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlavaNextConfig

from apt_hf import (
    AptCLIPVisionModel,
    AptImageProcessor,
    AptLlavaForConditionalGeneration,
    AptLlavaNextForConditionalGeneration,
    AptLlavaNextProcessor,
    AptLlavaProcessor,
)
from apt_hf.patchify import default_thresholds
from apt_hf.sample_images import load_photos
from apt_hf.testing import build_tiny_llava, build_tiny_llava_next, tiny_vision_config
from apt_hf.visualization import processed_images, side_by_side, split_layout

ROOT = Path(__file__).resolve().parents[1]
LLAVA_THRESHOLDS = default_thresholds(2, llava=True)  # LLaVA-1.5 at 336/14: [5.75]
SETTINGS = {"llava15_s2": (2, LLAVA_THRESHOLDS), "paper_s3": (3, default_thresholds(3))}


def patch_layouts(output_dir: Path) -> None:
    photos = load_photos()
    print("\n== 1. APT patch layouts at 336/14 (tokens kept of 576) ==")
    print(f"{'photo':<20}" + "".join(f"{name:>16}" for name in SETTINGS))
    counts = {}
    for name, (num_scales, thresholds) in SETTINGS.items():
        processor = AptImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      num_scales=num_scales, thresholds=thresholds)
        batch = processor(list(photos.values()), return_tensors="pt")
        images = processed_images(batch, processor.image_mean, processor.image_std, processor.rescale_factor)
        folder = output_dir / "patches" / name
        folder.mkdir(parents=True, exist_ok=True)
        for photo, image, (scales, positions) in zip(photos, images, split_layout(batch), strict=True):
            side_by_side(image, scales, positions, 14, num_scales, upscale=2).save(folder / f"{photo}.png")
        counts[name] = batch["tokens_per_image"].tolist()
    for i, photo in enumerate(photos):
        print(f"{photo:<20}" + "".join(f"{counts[n][i]:>10} ({100 * counts[n][i] / 576:3.0f}%)" for n in SETTINGS))
    mean = {n: sum(c) / len(c) for n, c in counts.items()}
    print(f"{'mean':<20}" + "".join(f"{mean[n]:>10.0f} ({100 * mean[n] / 576:3.0f}%)" for n in SETTINGS))
    print(f"pictures: {output_dir / 'patches'}/<setting>/<photo>.png (uniform grid left, APT right)")


def vision_tower() -> None:
    print("\n== 2. CLIP vision tower -> AptCLIPVisionModel ==")
    torch.manual_seed(0)
    stock = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=336, patch_size=14)).eval()
    photos = list(load_photos().values())[:4]
    stock_inputs = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})(
        photos, return_tensors="pt")
    with torch.no_grad():
        expected = stock(**stock_inputs).pooler_output
    for thresholds in ([-1], LLAVA_THRESHOLDS):
        apt = AptCLIPVisionModel.from_clip(stock, thresholds=thresholds).eval()
        processor = AptImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      thresholds=thresholds)
        inputs = processor(photos, return_tensors="pt")
        with torch.no_grad():
            out = apt(**inputs)
        gap = (out.pooler_output - expected).abs().max().item()
        print(f"thresholds {thresholds}: tokens {inputs['tokens_per_image'].tolist()} of 576 each; "
              f"packed sequence {tuple(out.last_hidden_state.shape)}; "
              f"max |pooler - stock pooler| = {gap:.1e}" + (" (identical up to fp32)" if thresholds == [-1] else ""))


def chat(model, processor, image, question: str, max_new_tokens: int = 12) -> tuple[str, int]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    visual_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), visual_tokens


def llava(output_dir: Path) -> Path:
    print("\n== 3. tiny LLaVA-1.5 -> APT-LLaVA, chat (random weights: the words are noise, the plumbing is real) ==")
    stock, stock_processor = build_tiny_llava(vision=tiny_vision_config(image_size=336))
    photo = load_photos(("coffee.png",))["coffee"]
    answer, visual_tokens = chat(stock, stock_processor, photo, "What is in the cup?")
    print(f"stock LLaVA: {visual_tokens} visual tokens, answer {answer!r}")
    for layout in ("packed", "grid"):
        model = AptLlavaForConditionalGeneration.from_llava(stock, vision_feature_layout=layout,
                                                            thresholds=LLAVA_THRESHOLDS)
        processor = AptLlavaProcessor.from_llava_processor(stock_processor, vision_feature_layout=layout,
                                                           thresholds=LLAVA_THRESHOLDS)
        answer, visual_tokens = chat(model, processor, photo, "What is in the cup?")
        print(f"APT-LLaVA ({layout}): {visual_tokens} visual tokens (stock 576), answer {answer!r}")
        if layout == "packed":
            path = output_dir / "tiny-apt-llava"
            model.save_pretrained(path)
            processor.save_pretrained(path)
    print(f"saved {path} (loads with AutoModelForImageTextToText / AutoProcessor, trust_remote_code=True)")
    return path


def llava_next() -> None:
    print("\n== 3b. tiny LLaVA-NeXT -> APT (base tile + any-resolution crops, APT on each), chat ==")
    stock, stock_processor = build_tiny_llava_next(vision=tiny_vision_config(image_size=336),
                                                   pinpoints=LlavaNextConfig().image_grid_pinpoints)
    photo = load_photos(("coffee.png",))["coffee"]
    answer, visual_tokens = chat(stock, stock_processor, photo, "What is in the cup?")
    print(f"stock LLaVA-NeXT: {visual_tokens} visual tokens, answer {answer!r}")
    for layout in ("packed", "grid"):
        model = AptLlavaNextForConditionalGeneration.from_llava_next(stock, vision_feature_layout=layout,
                                                                     thresholds=LLAVA_THRESHOLDS)
        processor = AptLlavaNextProcessor.from_llava_next_processor(stock_processor, vision_feature_layout=layout,
                                                                    thresholds=LLAVA_THRESHOLDS)
        answer, apt_tokens = chat(model, processor, photo, "What is in the cup?")
        print(f"APT-LLaVA-NeXT ({layout}): {apt_tokens} visual tokens (stock {visual_tokens}), answer {answer!r}")


def finetune(output_dir: Path) -> None:
    recipe = ROOT / "recipes" / "tiny-cpu.yaml"
    print(f"\n== 4. fine-tune with {recipe.relative_to(ROOT)} (accelerate launch, CPU) ==")
    run_dir = output_dir / "tiny-cpu-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
               str(ROOT / "scripts" / "finetune_llava.py"), "--config", str(recipe), "--output_dir", str(run_dir)]
    print("$ " + " ".join(command[2:]))
    subprocess.run(command, check=True, cwd=ROOT)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(run_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(run_dir, trust_remote_code=True)
    settings = yaml.safe_load(recipe.read_text())
    sample = json.loads((ROOT / settings["data_path"]).read_text())[0]  # a generated training picture
    question = sample["conversations"][0]["value"].replace("<image>", "").strip()
    with Image.open(ROOT / settings["image_folder"] / sample["image"]) as image:
        answer, visual_tokens = chat(model, processor, image.convert("RGB"), question)
    print(f"fine-tuned APT-LLaVA from {run_dir} ({visual_tokens} visual tokens): {question!r} -> {answer.strip()!r} "
          f"(training answer: {sample['conversations'][1]['value']!r})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--skip_training", action="store_true", help="stop after step 3")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    patch_layouts(output_dir)
    vision_tower()
    llava(output_dir)
    llava_next()
    if not args.skip_training and (ROOT / "recipes" / "tiny-cpu.yaml").exists():
        finetune(output_dir)
    print("\ndone.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
