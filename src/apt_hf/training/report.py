"""What a training run tells its user: pieces of the start-of-run summary, and a loss curve in --output_dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..patchify import PatchLayout
from ..plots import save_line_chart
from .trainable import declared, select_parameters

LOSS_CURVE_FILE = "loss_curve.png"


def parts_summary(model: Any) -> str:
    """'apt 0.01M / 0.01M, ...': per declared part, its trainable / all parameters (a PEFT model: of its base)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    rows = []
    for part in declared(model, "trainable_parts"):
        params = select_parameters(model, [part]).values()
        count = sum(p.numel() for p in params if id(p) in trainable)
        rows.append(f"{part} {count / 1e6:.2f}M / {sum(p.numel() for p in params) / 1e6:.2f}M")
    return ", ".join(rows)


def tokens_kept(layout: PatchLayout, what: str = "tokens") -> str:
    """'; tokens kept 40 of 64 (62%, first 16 images)': APT's token count against the uniform grid's, on a probe."""
    tokens, grid = layout.tokens_per_image.float().mean(), layout.image_grid_hw.prod(-1).float().mean()
    images = len(layout.tokens_per_image)
    return f"; {what} kept {tokens:.0f} of {grid:.0f} ({100 * tokens / grid:.0f}%, first {images} images)"


def save_loss_curve(log_history: list[dict[str, Any]], output_dir: str | Path, title: str) -> Path | None:
    """loss (and eval_loss) against step, as a PNG in `output_dir` titled `title` (the script); None when nothing
    was logged or matplotlib is missing (a log line then says how to get it)."""
    series = {name: [(float(e["step"]), float(e[key])) for e in log_history if key in e and "step" in e]
              for name, key in (("train loss", "loss"), ("eval loss", "eval_loss"))}
    series = {name: points for name, points in series.items() if points}
    if not series:
        return None
    return save_line_chart(Path(output_dir) / LOSS_CURVE_FILE, series, title, "step", "loss")


__all__ = ["LOSS_CURVE_FILE", "parts_summary", "save_loss_curve", "tokens_kept"]
