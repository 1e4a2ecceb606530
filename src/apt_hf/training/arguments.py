"""Flags and YAML recipes for every task's training script, and the APT fields they all take.

A task's flags are transformers' `TrainingArguments` plus its own dataclasses (and `AptArguments`). A YAML recipe
given with `--config` supplies defaults; flags on the command line override it. Recipe keys are checked against the
parser so a typo fails before any model is loaded instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments


@dataclass
class AptArguments:
    """APT fields; unset ones keep the checkpoint's values (or the model's defaults)."""

    num_scales: int | None = field(default=None, metadata={"help": "Number of patch scales S."})
    thresholds: list[float] | None = field(
        default=None,
        metadata={"help": "S - 1 thresholds; the paper uses 5.5 for ViTs (S=2) and 5.75 for LLaVA-1.5 at 336/14."}
    )
    scorer: str | None = field(default=None, metadata={"help": "entropy | laplacian | upsample_mse."})
    entropy_bins: int | None = field(default=None, metadata={"help": "Histogram bins of the entropy scorer."})

    def given(self) -> dict[str, Any]:
        """Only the fields the user set, so a checkpoint's own values are not overwritten by None."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def infer_num_scales(self) -> None:
        """One threshold per scale above the base one: `--thresholds a b` alone implies S = 3."""
        if self.thresholds is not None and self.num_scales is None:
            self.num_scales = len(self.thresholds) + 1


def check_eval_data(training_args: TrainingArguments, eval_data_path: str | None) -> None:
    """An --eval_strategy other than 'no' needs evaluation data."""
    eval_strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
    if eval_strategy != "no" and not eval_data_path:
        raise ValueError(f"eval_strategy: {eval_strategy!r} needs evaluation data; pass --eval_data_path (or "
                         "--eval_strategy no)")


def build_parser(argument_classes: tuple[type, ...]) -> HfArgumentParser:
    """The flags of `argument_classes` plus --config."""
    parser = HfArgumentParser(argument_classes)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML recipe whose keys are these flags; command-line flags override it.")
    return parser


def _known_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}


def recipe_to_argv(recipe: dict[str, Any], parser: argparse.ArgumentParser, source: str, script: str) -> list[str]:
    """Turn a recipe mapping into flags, refusing keys that are not arguments (a typo would be ignored)."""
    known = _known_keys(parser)
    argv: list[str] = []
    for key, value in recipe.items():
        if key == "config":
            raise ValueError(f"{source}: key 'config' cannot appear inside a recipe (recipes do not nest)")
        if key not in known:
            close = [k for k in known if key.replace("-", "_") == k or key in k]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{source}: unknown key {key!r}: it is not an argument of {script}{hint}")
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(value, bool):
            argv += [flag, "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            if known[key].nargs not in ("+", "*"):
                raise ValueError(f"{source}: key {key!r} takes one value, got the list {value!r}")
            argv += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe's {flag: value} mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: expected a YAML recipe file, got {str(path)!r}, which does not exist")
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"config: expected a mapping of flag: value in {path}, got {type(recipe).__name__}")
    return recipe


def parse_args(
    argv: list[str] | None,
    argument_classes: tuple[type, ...],
    check: Callable[..., None],
    script: str,
) -> tuple[Any, ...]:
    """Parse recipe + flags (flags win) into `argument_classes` and check them.

    `argv` None: the command line. `check` is called with the parsed dataclasses; `script` is named in recipe errors.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argument_classes)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    recipe_argv: list[str] = []
    if known.config:
        recipe_argv = recipe_to_argv(load_recipe(known.config), parser, f"config {known.config}", script)
    # argparse keeps the last occurrence of a flag, so command-line flags placed after the recipe win.
    parsed = parser.parse_args_into_dataclasses(args=recipe_argv + argv, look_for_args_file=False)[:-1]
    check(*parsed)
    return tuple(parsed)


__all__ = ["AptArguments", "build_parser", "check_eval_data", "load_recipe", "parse_args", "recipe_to_argv"]


