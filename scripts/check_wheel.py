"""Check apt_hf as a wheel installs it: only the files the wheel ships, no source tree behind them.

    python scripts/check_wheel.py build DIR        # build the wheel from a clean copy of the tree; prints its path
    pip install --no-deps --target SITE WHEEL
    cd "$(mktemp -d)" && PYTHONPATH=SITE python /path/to/scripts/check_wheel.py check --site SITE

`.ci/run` does exactly that over its venv: PYTHONPATH puts the wheel's apt_hf ahead of the editable install, and
`check` runs from a folder outside the source tree. `check` fails (non-zero exit, traceback) unless:

1. `apt_hf` is imported from SITE, and SITE holds the model-card templates;
2. every apt_hf module imports (only a module whose optional extra is missing, lmms-eval, is skipped) and every
   name in a module's `__all__` exists;
3. `apt_hf.hub.publish(..., dry_run=True)` of a tiny converted model of every card kind (llava, clip, clip_full,
   vit, vit_classifier) writes the upload folder with its README.md card;
4. published APT-CLIP and APT-ViT folders load with `trust_remote_code=True` in a process where apt_hf cannot be
   imported, and preprocess and compute what the installed apt_hf does (fp32 tolerance).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# apt_hf modules that need an optional extra; skipped when that extra's package is absent (CI's main venv: no eval).
OPTIONAL_EXTRAS = {"lmms_eval": "eval", "flash_attn": "flash"}
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SIZES = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}
APT = {"num_scales": 2, "thresholds": [5.5]}


# -- build ----------------------------------------------------------------------------------------------------------
def build_wheel(out_dir: str | Path, root: Path = ROOT) -> Path:
    """Build apt_hf's wheel into `out_dir` from a clean copy of pyproject.toml, README.md and src/ (no stale
    build/, *.egg-info or __pycache__ can leak into it), offline, with the environment's setuptools."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apt_hf_wheel_src_") as tmp:
        copy = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, copy / name)
        shutil.copytree(root / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
             "-w", str(out_dir), str(copy)],
            capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"pip wheel failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    wheels = sorted(out_dir.glob("apt_hf-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one apt_hf wheel in {out_dir}, found {[w.name for w in wheels]}")
    return wheels[0]


# -- check ----------------------------------------------------------------------------------------------------------
def check_origin(site: Path) -> None:
    import apt_hf
    from apt_hf.model_card import CARD_KINDS, TEMPLATE_DIR

    where = Path(apt_hf.__file__).resolve()
    print(f"apt_hf.__file__ = {where}")
    if not where.is_relative_to(site.resolve()):
        raise AssertionError(f"apt_hf was imported from {where}, not from the wheel's install in {site}")
    if Path.cwd().resolve().is_relative_to(ROOT):
        raise AssertionError(f"run `check` from outside the source tree ({ROOT}), not from {Path.cwd()}")
    for spec in CARD_KINDS.values():
        template = TEMPLATE_DIR / spec.template
        if not template.is_file() or not Path(str(template)).resolve().is_relative_to(site.resolve()):
            raise AssertionError(f"model card template {spec.template} is not in the installed wheel ({template})")


def check_imports() -> None:
    import importlib
    import pkgutil

    import apt_hf

    def fail(name: str) -> None:
        raise ImportError(f"importing {name} failed while walking apt_hf")

    imported, skipped = 0, []
    for info in pkgutil.walk_packages(apt_hf.__path__, "apt_hf.", onerror=fail):
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as err:
            top = (err.name or "").split(".")[0]
            if top not in OPTIONAL_EXTRAS:
                raise
            skipped.append(f"{info.name} (needs {top}: the '{OPTIONAL_EXTRAS[top]}' extra)")
            continue
        missing = [name for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
        if missing:
            raise AssertionError(f"{info.name}.__all__ names {missing}, which the module does not define")
        imported += 1
    missing = [name for name in apt_hf.__all__ if getattr(apt_hf, name, None) is None]
    if missing:
        raise AssertionError(f"apt_hf.__all__ names {missing}, which apt_hf does not provide")
    print(f"imports: {imported} apt_hf modules and their __all__; skipped {skipped or 'none'}")


def save_tiny_checkpoints(root: Path) -> dict[str, Path]:
    """Tiny converted checkpoints, at least one per model-card template, each with its APT processor:
    {card kind: folder}. (Every card kind's publish dry run is also tested in the source tree.)"""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Backbone,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTForImageClassification,
        ViTModel,
    )

    from apt_hf import (
        AptCLIPModel,
        AptCLIPVisionModel,
        AptDepthAnythingForDepthEstimation,
        AptDinov2Backbone,
        AptDinov2Model,
        AptImageProcessorPil,
        AptLlavaForConditionalGeneration,
        AptLlavaNextForConditionalGeneration,
        AptLlavaNextProcessor,
        AptLlavaProcessor,
        AptViTForImageClassification,
        AptViTModel,
    )
    from apt_hf.image_processing_apt_dpt import AptDPTImageProcessorPil
    from apt_hf.testing import build_tiny_llava, build_tiny_llava_next

    torch.manual_seed(0)
    vision = {**TINY, "image_size": 64, "patch_size": 8}
    processor = AptImageProcessorPil(**SIZES, patch_size=8, **APT)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # a CLIP tokenizer built offline: characters, no merges
    vocab = {**{ch: i for i, ch in enumerate(alphabet)}, **{f"{ch}</w>": len(alphabet) + i for i, ch in
                                                            enumerate(alphabet)}}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = {**TINY, "vocab_size": len(tokenizer), "max_position_embeddings": 64, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    stock_llava, llava_processor = build_tiny_llava()
    stock_next, next_processor = build_tiny_llava_next()
    dinov2 = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "mlp_ratio": 2, "image_size": 56,
              "patch_size": 14}
    depth = DepthAnythingConfig(backbone_config={"model_type": "dinov2", **dinov2, "out_indices": [1, 2, 3, 4],
                                                 "reshape_hidden_states": False},
                                reassemble_hidden_size=32, head_hidden_size=8, neck_hidden_sizes=[8, 16, 32, 32],
                                fusion_hidden_size=16)
    dinov2_processor = AptImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                            patch_size=14, **APT)
    depth_processor = AptDPTImageProcessorPil(size={"height": 56, "width": 56}, keep_aspect_ratio=True,
                                              ensure_multiple_of=14, patch_size=14, **APT)

    checkpoints = {
        "llava": (AptLlavaForConditionalGeneration.from_llava(stock_llava, thresholds=[5.75]),
                  AptLlavaProcessor.from_llava_processor(llava_processor, backend="pil", thresholds=[5.75])),
        "clip": (AptCLIPVisionModel.from_clip(CLIPVisionModel(CLIPVisionConfig(**vision)), **APT), processor),
        "clip_full": (AptCLIPModel.from_clip(CLIPModel(CLIPConfig(text_config=text, vision_config=vision,
                                                                  projection_dim=16)), **APT),
                      CLIPProcessor(image_processor=processor, tokenizer=tokenizer)),
        "vit": (AptViTModel.from_vit(ViTModel(ViTConfig(**vision)), **APT), processor),
        "vit_classifier": (AptViTForImageClassification.from_vit(
            ViTForImageClassification(ViTConfig(**vision, num_labels=3)), **APT), processor),
        "llava_next": (AptLlavaNextForConditionalGeneration.from_llava_next(stock_next, thresholds=[5.75]),
                       AptLlavaNextProcessor.from_llava_next_processor(next_processor, backend="pil",
                                                                       thresholds=[5.75])),
        "dinov2": (AptDinov2Model.from_dinov2(Dinov2Model(Dinov2Config(**dinov2)), **APT), dinov2_processor),
        "dinov2_backbone": (AptDinov2Backbone.from_dinov2(Dinov2Backbone(Dinov2Config(**dinov2, out_indices=[2, 4])),
                                                          **APT), dinov2_processor),
        "depth_anything": (AptDepthAnythingForDepthEstimation.from_depth_anything(
            DepthAnythingForDepthEstimation(depth), **APT), depth_processor),
    }
    folders = {}
    for kind, (model, model_processor) in checkpoints.items():
        folders[kind] = root / kind
        model.eval().save_pretrained(folders[kind])
        model_processor.save_pretrained(folders[kind])
    return folders


def check_publish(checkpoints: dict[str, Path], out: Path) -> dict[str, Path]:
    """A publish dry run of every checkpoint; returns {card kind: the folder the Hub would get}."""
    from apt_hf.hub import publish
    from apt_hf.model_card import CARD_KINDS

    templates = {spec.template for spec in CARD_KINDS.values()}
    covered = {CARD_KINDS[kind].template for kind in checkpoints}
    if covered != templates:
        raise AssertionError(f"checkpoints for {sorted(checkpoints)} cover the card templates {sorted(covered)}, not "
                             f"all of {sorted(templates)}")
    published = {}
    for kind, folder in checkpoints.items():
        repo_id = f"me/apt-{kind.replace('_', '-')}"
        result = publish(folder, repo_id, dry_run=True, local_dir=out / kind)
        card = result.local_dir / "README.md"
        spec = CARD_KINDS[kind]
        if result.upload_set.kind != kind:
            raise AssertionError(f"{folder}: published as card kind {result.upload_set.kind!r}, expected {kind!r}")
        if not card.is_file():
            raise AssertionError(f"publish dry run of {kind} wrote no README.md in {result.local_dir}")
        text = card.read_text(encoding="utf-8")
        expected = (f"pipeline_tag: {spec.pipeline_tag}", f"# {spec.title}: {repo_id.split('/')[1]}",
                    "trust_remote_code=True", f'"{repo_id}"')  # the usage snippet names the repository
        if missing := [piece for piece in expected if piece not in text]:
            raise AssertionError(f"the {kind} card lacks {missing}:\n{text[:2000]}")
        files = sorted(p.name for p in result.local_dir.iterdir())
        print(f"publish dry run {kind}: {len(files)} files, card {card.stat().st_size} bytes")
        published[kind] = result.local_dir
    return published


REMOTE = textwrap.dedent("""
    import sys
    sys.modules["apt_hf"] = None  # apt_hf cannot be imported: only the folders' own code is available
    import torch
    import transformers
    from PIL import Image
    from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level one needs torchvision

    clip_dir, vit_dir, image_path, out_path = sys.argv[1:5]
    image = Image.open(image_path).convert("RGB")
    out = {}
    for name, folder, auto in (("clip", clip_dir, transformers.AutoModel),
                               ("vit", vit_dir, transformers.AutoModelForImageClassification)):
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        for obj in (processor, model):
            module = type(obj).__module__
            assert module.startswith("transformers_modules."), f"{name}: {type(obj)} is not the folder's code"
        inputs = dict(processor([image], return_tensors="pt"))
        with torch.no_grad():
            outputs = model(**inputs)
        out[name] = {"inputs": inputs, "output": outputs.pooler_output if name == "clip" else outputs.logits}
    torch.save(out, out_path)
""")


def check_remote_code(published: dict[str, Path], work: Path) -> None:
    """Load the published CLIP and ViT folders where apt_hf cannot be imported; compare with the installed apt_hf."""
    import numpy as np
    import torch
    from PIL import Image

    from apt_hf import AptCLIPVisionModel, AptImageProcessorPil, AptViTForImageClassification

    # half flat (merged into large patches), half noise (kept at the base size): both paths of APT run
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (40, 120, 200)
    Image.fromarray(pixels).save(work / "image.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(work / "hf_modules")}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE, str(published["clip"]), str(published["vit_classifier"]),
         str(work / "image.png"), str(work / "remote.pt")], env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"loading with trust_remote_code=True without apt_hf failed:\n{result.stderr[-6000:]}")
    remote = torch.load(work / "remote.pt")
    image = Image.open(work / "image.png").convert("RGB")
    for name, folder, cls in (("clip", published["clip"], AptCLIPVisionModel),
                              ("vit", published["vit_classifier"], AptViTForImageClassification)):
        processor = AptImageProcessorPil.from_pretrained(folder)
        model = cls.from_pretrained(folder).eval()
        inputs = dict(processor([image], return_tensors="pt"))
        if set(inputs) != set(remote[name]["inputs"]):
            raise AssertionError(f"{name}: remote processor gave {sorted(remote[name]['inputs'])}, "
                                 f"apt_hf gave {sorted(inputs)}")
        for key, value in inputs.items():  # integer layouts must match exactly; pixels to fp32 precision
            torch.testing.assert_close(remote[name]["inputs"][key], value, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            outputs = model(**inputs)
        local = outputs.pooler_output if name == "clip" else outputs.logits
        torch.testing.assert_close(remote[name]["output"], local, rtol=1e-5, atol=1e-5)
        scales = inputs["patch_scales"]
        print(f"remote code {name}: {tuple(local.shape)} output matches apt_hf; {len(scales)} tokens, "
              f"{int((scales > 0).sum())} merged")
        if not bool((scales > 0).any()):
            raise AssertionError(f"{name}: no patch was merged, so the check exercised only the base-size path")


def check(site: Path) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    check_origin(site)
    check_imports()
    with tempfile.TemporaryDirectory(prefix="apt_hf_check_wheel_") as tmp:
        work = Path(tmp)
        published = check_publish(save_tiny_checkpoints(work / "checkpoints"), work / "published")
        check_remote_code(published, work)
    print("wheel check passed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the wheel into DIR and print its path")
    build.add_argument("out_dir", type=Path)
    run = commands.add_parser("check", help="check the apt_hf that `import apt_hf` finds (installed in --site)")
    run.add_argument("--site", type=Path, required=True, help="the folder the wheel was installed into (--target)")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build_wheel(args.out_dir))
    else:
        check(args.site)
    return 0


if __name__ == "__main__":
    sys.exit(main())
