"""Convert a CLIP, SigLIP, ViT, LLaVA (1.5, NeXT, OneVision) or dense (Depth Anything, DPT / UperNet on DINOv2)
checkpoint to APT: weights, config, processor, code.

    python scripts/convert_to_apt.py --model openai/clip-vit-large-patch14-336 --output_dir apt-clip-vit-l-336
    python scripts/convert_to_apt.py --model google/vit-base-patch16-224 --output_dir apt-vit-b16-224 \\
        --num_scales 3 --thresholds 5.5 4.0
    python scripts/convert_to_apt.py --model llava-hf/llava-1.5-7b-hf --output_dir apt-llava-1.5-7b \\
        --vision_feature_layout packed
    python scripts/convert_to_apt.py --model openai/clip-vit-base-patch16 --output_dir apt-clip-b16 --full_model
    python scripts/convert_to_apt.py --model google/siglip-so400m-patch14-384 --output_dir apt-siglip --full_model
    python scripts/convert_to_apt.py --model depth-anything/Depth-Anything-V2-Small-hf --output_dir apt-da-v2-small

The model family comes from the checkpoint (apt_hf.families; `apt_hf.convert` does the conversion). A full CLIP or
SigLIP checkpoint gives its vision tower (AptCLIPVisionModel / AptSiglipVisionModel) by default; with --full_model
(alias --full_clip) the whole model, text tower kept, for zero-shot classification (AptCLIPModel / AptSiglipModel),
saved with its tokenizer and APT image processor as a CLIPProcessor / SiglipProcessor, so that
`pipeline("zero-shot-image-classification", model=output_dir, trust_remote_code=True)` runs it. ViT checkpoints give
an AptViTForImageClassification when they have a classifier, else an AptViTModel; LLaVA-1.5 / -NeXT / -OneVision
checkpoints give their family's APT image-text-to-text model with its APT processor (chat template kept). Depth
Anything and DPT-DINOv2 checkpoints give the whole APT depth model with the APT DPT image processor, so that
`pipeline("depth-estimation", model=output_dir, trust_remote_code=True)` runs it; UperNet on DINOv2 the APT
segmentation model. Every pretrained weight is kept; APT adds a merge conv and a zero-initialised MLP, so the
converted model reproduces the stock one wherever nothing is merged. The output folder loads with the Auto classes
and `trust_remote_code=True`, or directly after `import apt_hf`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer
from transformers.utils import logging

from apt_hf.configuration_apt import VISION_FEATURE_LAYOUTS, AptCompositeConfigMixin
from apt_hf.conversion import apt_class_for, convert_to
from apt_hf.dtypes import DTYPES
from apt_hf.families import family_of, is_composite, model_classes, vlm_families
from apt_hf.image_processing_apt import AptImageProcessorPil
from apt_hf.patchify import SCORERS, default_thresholds

# Stock checkpoints that hold image and text towers: by default their vision tower converts, with --full_model all.
FULL_MODEL_TYPES = ("clip", "siglip")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="hub id or local folder of a CLIP / SigLIP / ViT / LLaVA-1.5 / -NeXT / -OneVision model, "
                             "or of Depth Anything / DPT / UperNet on a DINOv2 backbone")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="write over a folder that already holds files (refused without it)")
    parser.add_argument("--num_scales", type=int, default=2)
    parser.add_argument("--thresholds", type=float, nargs="*", default=None,
                        help="num_scales - 1 values (default: the paper's for the scorer; entropy: 5.5 for S=2 "
                             "(LLaVA-1.5: 5.75), 5.5 4.0 for S=3)")
    parser.add_argument("--vision_feature_layout", choices=VISION_FEATURE_LAYOUTS, default="packed",
                        help="LLaVA families only: packed (fewer tokens for the language model) or grid (stock counts)")
    parser.add_argument("--full_model", "--full_clip", dest="full_model", action="store_true",
                        help="CLIP / SigLIP: convert the whole model, text tower kept, for zero-shot classification "
                             "(saved with its tokenizer); default: the vision tower alone")
    parser.add_argument("--scorer", choices=SCORERS, default="entropy")
    parser.add_argument("--entropy_bins", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="weights dtype to save (default: the checkpoint's)")
    parser.add_argument("--revision", default=None)
    return parser.parse_args(argv)


def apt_fields(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    thresholds = args.thresholds
    if thresholds is None:  # vision-language families take LLaVA-1.5's defaults (their configs say so)
        try:
            thresholds = default_thresholds(args.num_scales, args.scorer,
                                            llava=getattr(cls.config_class, "llava_thresholds", False))
        except ValueError as err:
            raise SystemExit(f"--{err}") from None
    return {"num_scales": args.num_scales, "thresholds": list(thresholds), "scorer": args.scorer,
            "entropy_bins": args.entropy_bins}


def target_class(model: str, config: Any, full_model: bool) -> type:
    """The APT class this checkpoint converts to (a full CLIP / SigLIP's vision tower unless `full_model`)."""
    if full_model and config.model_type not in FULL_MODEL_TYPES:
        raise SystemExit(f"--full_model: needs a full CLIP or SigLIP checkpoint (model_type {FULL_MODEL_TYPES}), "
                         f"{model} has model_type={config.model_type!r}")
    if config.model_type in FULL_MODEL_TYPES and not full_model:
        return next(c for c in model_classes()
                    if any(container.config_class.model_type == config.model_type for container, _ in
                           c.stock_containers))
    try:
        return apt_class_for(model)
    except ValueError as err:
        raise SystemExit(f"--model: {err}") from None


def convert_model(model: str, cls: type, fields: dict[str, Any], dtype: Any, revision: str | None,
                  layout: str) -> Any:
    """Load the stock checkpoint with its own transformers class and convert it (every weight kept)."""
    options = {"vision_feature_layout": layout} if hasattr(cls.config_class, "vision_feature_layout") else {}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a full checkpoint's other tower is "unexpected" for its vision tower, by design
    try:
        return convert_to(cls, model, **fields, **options, dtype=dtype, revision=revision)
    finally:
        logging.set_verbosity(verbosity)


def convert_processor(model: str, converted: Any, revision: str | None) -> Any:
    """The checkpoint's own image processor settings plus the APT fields (a default one if it ships none), with the
    tokenizer for models that read text too."""
    config = converted.config
    family = family_of(type(converted))
    if family in vlm_families():  # tokenizer and chat template kept
        return family.processor.from_stock_processor(model, vision_feature_layout=config.vision_feature_layout,
                                                     patch_size=int(config.vision_config.patch_size),
                                                     **config.apt_fields)
    vision = config.apt_tower_config if isinstance(config, AptCompositeConfigMixin) else config
    fields = {**config.apt_fields, "patch_size": int(vision.patch_size)}
    image_processor = _image_processor(model, vision, fields, revision, family.image_processor)
    if is_composite(type(config)):  # zero-shot needs the texts' tokenizer beside the image processor
        try:
            tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        except (OSError, ValueError) as err:
            raise SystemExit(f"--model: {model} has no tokenizer, which --full_model needs to save ({err})") from None
        return family_of(type(converted)).processor(image_processor=image_processor, tokenizer=tokenizer)
    return image_processor


def _image_processor(model: str, config: Any, fields: dict[str, Any], revision: str | None,
                     family_processor: type | None) -> Any:
    """The checkpoint's image processor as the family's APT one (default: AptImageProcessorPil; depth models: the
    APT DPT processor, whose post_process_depth_estimation the depth-estimation pipeline calls)."""
    try:
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        stock = AutoImageProcessor.from_pretrained(model, revision=revision)
    except (OSError, ValueError):
        side = int(config.image_size)
        stats = {"image_mean": config.image_mean, "image_std": config.image_std}
        if family_processor is not None:  # the family's own resize, to the tower's size
            print(f"no image processor in {model}: using {family_processor.__name__} at {side} px with the config's "
                  "mean/std")
            return family_processor(size={"height": side, "width": side}, **stats, **fields)
        print(f"no image processor in {model}: using resize + crop to {side} with the config's mean/std")
        return AptImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, **stats,
                                    **fields)
    return (family_processor or AptImageProcessorPil).from_image_processor(stock, **fields)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.output_dir.is_dir() and any(args.output_dir.iterdir()) and not args.overwrite_output_dir:
        raise SystemExit(f"--output_dir: {args.output_dir} is not empty; pass --overwrite_output_dir to write over it, "
                         "or choose another folder")
    config = AutoConfig.from_pretrained(args.model, revision=args.revision)
    if config.model_type.startswith("apt_"):
        raise SystemExit(f"--model: {args.model} is already an APT checkpoint ({config.model_type})")
    cls = target_class(args.model, config, args.full_model)
    fields = apt_fields(args, cls)
    model = convert_model(args.model, cls, fields, DTYPES[args.dtype], args.revision, args.vision_feature_layout)
    processor = convert_processor(args.model, model, args.revision)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    added = sum(p.numel() for p in model.apt_parameters())
    total = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__} ({total / 1e6:.1f}M parameters, {added / 1e6:.2f}M new) and "
          f"{type(processor).__name__} with {fields} written to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    main(sys.argv[1:])
