"""What the miniature reproductions (`reproduce_mini.py`, `segmentation_mini.py`) share: the flags read from a settings
dataclass, the training loop, the speed measurement and the results files."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .benchmarks.timing import timed

Settings = TypeVar("Settings")


@dataclass
class TrainingSettings:
    """The knobs both miniatures have: the model's size, the stock training and the fine-tuning, seeds and timing.
    Each experiment subclasses it with its own fields and defaults, and extends `validate`."""

    hidden_size: int = 96
    layers: int = 4
    heads: int = 4
    stock_epochs: int = 5
    finetune_epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    finetune_lr: float = 1e-4
    weight_decay: float = 0.05
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    timing_images: int = 32
    repeats: int = 4
    clock: str = "wall"
    threads: int | None = None

    def validate(self) -> None:
        """Refuse settings the run would fail on, naming the field."""
        require_positive(self, ("hidden_size", "layers", "heads", "stock_epochs", "finetune_epochs", "batch_size",
                                "timing_images", "repeats"))
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size: expected a multiple of heads={self.heads}, got {self.hidden_size}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected one or more distinct seeds, got {self.seeds}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock: expected 'wall' or 'cpu', got {self.clock!r}")


def settings_from_args(cls: type[Settings], argv: Sequence[str] | None, prog: str, description: str,
                       presets: dict[str, dict[str, Any]] | None = None) -> tuple[Settings, str | None]:
    """(settings, --output_dir) from the command line: one flag per field of the dataclass `cls`, plus `--NAME` for
    each preset (a dict of field values; flags given explicitly still win). `cls.validate()` errors are the flag's
    error message."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help="where results.json and results.md go")
    for name, values in (presets or {}).items():
        parser.add_argument(f"--{name}", action="store_true",
                            help=", ".join(f"{k}={v}" for k, v in values.items()) + " (explicit flags still win)")
    defaults = cls()
    for f in fields(cls):
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                                metavar="{true,false}")
        elif isinstance(value, list):
            parser.add_argument(f"--{f.name}", type=type(value[0]), nargs="+", default=None)
        elif f.name == "threads":
            parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all)")
        elif f.name == "clock":
            parser.add_argument("--clock", choices=("wall", "cpu"), default=None)
        else:
            parser.add_argument(f"--{f.name}", type=type(value), default=None)
    args = vars(parser.parse_args(argv))
    output_dir = args.pop("output_dir")
    base = asdict(defaults)
    for name, values in (presets or {}).items():
        if args.pop(name):
            base.update(values)
    settings = cls(**{**base, **{k: v for k, v in args.items() if v is not None}})
    try:
        settings.validate()
    except ValueError as err:
        parser.error(str(err))
    return settings, output_dir


def require_positive(settings: Any, names: Iterable[str]) -> None:
    """Refuse integer fields below 1, naming the field."""
    for name in names:
        if getattr(settings, name) < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {getattr(settings, name)}")


def fit(model: nn.Module, batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]], steps: int, lr: float,
        weight_decay: float, desc: str) -> list[float]:
    """AdamW (no decay on biases and norms; cosine schedule, 5% warm-up; grad-norm clip 1) over `steps` batches of
    (model inputs, labels); returns the losses. Leaves the model in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    model.train()
    losses: list[float] = []
    with tqdm(total=steps, desc=desc, unit="step", leave=False) as bar:
        for inputs, labels in batches:
            loss = model(**inputs, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}")
    model.eval()
    return losses


@torch.inference_mode()
def images_per_second(models: dict[str, nn.Module], inputs: dict[str, dict[str, torch.Tensor]], images: int,
                      repeats: int, clock: str) -> dict[str, float]:
    """Images/s of each model on its inputs (the same images): best of `repeats` forward passes after a warm-up,
    models interleaved so that drift hits all of them."""
    for name, model in models.items():
        model(**inputs[name])
    best = dict.fromkeys(models, math.inf)
    for _ in range(repeats):
        for name, model in models.items():
            best[name] = min(best[name], timed(lambda m=model, x=inputs[name]: m(**x), "cpu", clock))
    return {name: images / seconds for name, seconds in best.items()}


def std(values: Sequence[float]) -> float:
    """The sample standard deviation; 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def write_results(output_dir: str | Path | None, results: dict[str, Any], markdown: str) -> None:
    """Print the markdown; with `output_dir`, also write results.json and results.md there."""
    print(markdown)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(markdown + "\n")
