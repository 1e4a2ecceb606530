"""What a training run tells its user: a start-of-run summary and a loss-curve picture in --output_dir."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..modeling_apt_llava import MODEL_PARTS
from ..patchify import PatchLayout
from .data import image_counts, open_image

logger = logging.getLogger(__name__)

LOSS_CURVE_FILE = "loss_curve.png"


def _base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model


def run_summary(dataset: Any, model: Any, processor: Any, converted: bool, image_folder: str | None,
                eval_dataset: Any = None, probe: int = 16) -> str:
    """Samples, images, trainable parameters by part, whether the stock model was converted, visual tokens kept.

    Image counts come from the data's image references (no image is decoded); tokens kept are measured on the
    first `probe` images.
    """
    images = sum(image_counts(dataset, "images"))
    base = _base_model(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    parts = []
    for part in MODEL_PARTS:
        params = base.parameters_of(part)
        count = sum(p.numel() for p in params if id(p) in trainable)
        parts.append(f"{part} {count / 1e6:.2f}M / {sum(p.numel() for p in params) / 1e6:.2f}M")
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    probe_images = []
    for row_refs in dataset.select(range(min(len(dataset), probe)))["images"]:
        for ref in row_refs:
            if len(probe_images) < probe:
                try:
                    probe_images.append(open_image(ref, image_folder))
                except (OSError, ValueError):
                    continue
    kept = ""
    if probe_images:
        layout = PatchLayout.from_inputs(processor.image_processor(probe_images, return_tensors="pt"))
        tokens, grid = layout.tokens_per_image.float().mean(), layout.image_grid_hw.prod(-1).float().mean()
        kept = (f"; visual tokens kept {tokens:.0f} of {grid:.0f} ({100 * tokens / grid:.0f}%, first "
                f"{len(probe_images)} images)")
    config = base.config
    return (f"training {len(dataset)} samples with {images} images"
            + (f", evaluating on {len(eval_dataset)}" if eval_dataset is not None else "")
            + f"; {'stock LLaVA converted to APT on the fly' if converted else 'APT-LLaVA checkpoint'} "
            f"(thresholds {config.thresholds}, {config.vision_feature_layout} layout){kept}; trainable: "
            + ", ".join(parts) + (f", LoRA {lora / 1e6:.2f}M" if lora else ""))


def save_loss_curve(log_history: list[dict[str, Any]], output_dir: str | Path,
                    title: str = "finetune_llava.py") -> Path | None:
    """loss (and eval_loss) against step, as a PNG in `output_dir`; None when nothing was logged."""
    from ..visualization import line_chart

    series = {name: [(float(e["step"]), float(e[key])) for e in log_history if key in e and "step" in e]
              for name, key in (("train loss", "loss"), ("eval loss", "eval_loss"))}
    series = {name: points for name, points in series.items() if points}
    if not series:
        return None
    path = Path(output_dir) / LOSS_CURVE_FILE
    line_chart(series, title, "step", "loss").save(path)
    return path


__all__ = ["LOSS_CURVE_FILE", "run_summary", "save_loss_curve"]
