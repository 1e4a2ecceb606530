"""Command-line and recipe arguments of `scripts/finetune_llava.py`.

Flags are transformers' `TrainingArguments` plus the dataclasses below. A YAML recipe given with
`--config` supplies defaults; flags on the command line override it. Recipe keys are checked against the
parser so a typo fails before any model is loaded instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..configuration_apt import validate_vision_feature_layout
from ..dtypes import DTYPES
from ..modeling_apt_llava import MODEL_PARTS

TRAINABLE_PARTS = MODEL_PARTS


@dataclass
class ModelArguments:
    """Which checkpoint to start from and which of its parts train."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Stock LLaVA (converted on the fly) or APT-LLaVA: hub id or local path."}
    )
    vision_feature_layout: str | None = field(
        default=None,
        metadata={"help": "'packed' (only kept tokens reach the LM) or 'grid'. Default: the checkpoint's, "
                          "or 'packed' when converting a stock LLaVA."},
    )
    trainable: str = field(
        default="apt",
        metadata={"help": f"Comma list of {', '.join(TRAINABLE_PARTS)}. Default apt (zero-MLP + conv), as in "
                          "the paper."},
    )
    lora_r: int = field(default=0, metadata={"help": "> 0: PEFT LoRA of this rank on the language model."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (LLaVA's LoRA recipe: 2 * r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma list of linear-layer names inside the language model that get LoRA."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an --output_dir that holds another run (its checkpoint-* "
                                         "folders are removed). Without it such a folder is refused."}
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "Also save the LoRA-merged full model in --output_dir (the adapter goes to "
                          "--output_dir/adapter)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": f"Dtype of the loaded weights, one of {tuple(DTYPES)}. Trainable parameters are kept in "
                          "float32 so tiny learning rates are not lost to bfloat16 rounding."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "'eager', 'sdpa' or 'flash_attention_2' for the whole model; default: flash_attention_2 "
                          "for the language model when flash-attn and a GPU are available, else transformers' "
                          "default (sdpa)."},
    )
    trust_remote_code: bool = field(default=True, metadata={"help": "Allow the checkpoint's own model code."})
    tiny_demo: bool = field(
        default=False,
        metadata={"help": "Build a tiny random stock LLaVA at --model_name_or_path and a generated data set at "
                          "--data_path / --image_folder when they do not exist (recipes/tiny-cpu.yaml)."},
    )


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


@dataclass
class DataArguments:
    """Where the conversations and images are, and how many of them to use."""

    data_path: str | None = field(
        default=None,
        metadata={"help": "LLaVA-format JSON / JSONL (mix665k schema), a saved datasets folder, a local data "
                          "file, or a hub dataset id with `messages` + `images` columns."},
    )
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Evaluation data in any form --data_path takes (same --image_folder); reports eval_loss "
                          "at --eval_strategy steps / epoch."},
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the LLaVA-format `image` paths are relative to."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a datasets data set."})
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of a hub data set."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many samples."})
    sample_fraction: float | None = field(
        default=None,
        metadata={"help": "Use a seeded random fraction of the data (the paper: 0.05 of mix665k). Seed: "
                          "--data_seed, else --seed."},
    )
    model_max_length: int = field(
        default=2048, metadata={"help": "Longest tokenized sample (image tokens included); longer ones are cut."}
    )
    append_eos: bool = field(
        default=True,
        metadata={"help": "End every assistant turn with the eos token when the chat template does not (LLaVA-1.5 "
                          "trains on `</s>` after each answer; llava-hf's template omits it)."},
    )
    padding_free: bool = field(
        default=True,
        metadata={"help": "Flatten each batch into one row (position_ids restart per sample, no attention mask, no "
                          "cache), so APT's shorter prompts are not padded back to the longest one; false: padded "
                          "batches."},
    )


ARGUMENT_CLASSES = (ModelArguments, AptArguments, DataArguments, TrainingArguments)


def build_parser(argument_classes: tuple[type, ...] = ARGUMENT_CLASSES) -> HfArgumentParser:
    """The flags of `argument_classes` (finetune_llava.py's by default) plus --config."""
    parser = HfArgumentParser(argument_classes)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML recipe whose keys are these flags; command-line flags override it.")
    return parser


def _known_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}


def recipe_to_argv(recipe: dict[str, Any], parser: argparse.ArgumentParser, source: str,
                   script: str = "finetune_llava.py") -> list[str]:
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
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: expected a YAML recipe file, got {str(path)!r}, which does not exist")
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"config: expected a mapping of flag: value in {path}, got {type(recipe).__name__}")
    return recipe


def parse_args(
    argv: list[str] | None = None,
    argument_classes: tuple[type, ...] = ARGUMENT_CLASSES,
    check: Any = None,
    script: str = "finetune_llava.py",
) -> tuple[Any, ...]:
    """Parse recipe + flags (flags win) into the argument dataclasses and check them.

    Defaults: finetune_llava.py's four dataclasses and `check_args`. Another trainer (finetune_vit.py) passes its
    own `argument_classes`, `check` (called with the parsed dataclasses) and `script` (named in recipe errors).
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
    (check_args if check is None else check)(*parsed)
    return tuple(parsed)


def parse_trainable(trainable: str) -> list[str]:
    parts = [p.strip() for p in trainable.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"trainable: expected a comma list of {', '.join(TRAINABLE_PARTS)}, got {trainable!r}")
    unknown = [p for p in parts if p not in TRAINABLE_PARTS]
    if unknown:
        raise ValueError(
            f"trainable: unknown part(s) {unknown}; expected a comma list of {', '.join(TRAINABLE_PARTS)}"
        )
    return parts


def check_args(model_args: ModelArguments, apt_args: AptArguments, data_args: DataArguments,
               training_args: TrainingArguments) -> None:
    """Everything that can be checked without touching files: clear errors before any loading."""
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path: expected a LLaVA or APT-LLaVA hub id or path, got nothing")
    if not data_args.data_path:
        raise ValueError("data_path: expected a LLaVA-format JSON/JSONL file or a datasets id/path, got nothing")
    eval_strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
    if eval_strategy != "no" and not data_args.eval_data_path:
        raise ValueError(f"eval_strategy: {eval_strategy!r} needs evaluation data; pass --eval_data_path (or "
                         "--eval_strategy no)")
    parts = parse_trainable(model_args.trainable)
    if model_args.lora_r < 0:
        raise ValueError(f"lora_r: expected 0 (no LoRA) or a positive rank, got {model_args.lora_r}")
    if model_args.lora_r > 0 and "language_model" in parts:
        raise ValueError("trainable: 'language_model' trains the whole language model, which --lora_r > 0 "
                         "adapts with LoRA; pick one")
    if model_args.merge_lora and model_args.lora_r == 0:
        raise ValueError("merge_lora: expected --lora_r > 0 (there is no adapter to merge), got lora_r 0")
    if model_args.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {model_args.dtype!r}")
    if model_args.vision_feature_layout is not None:
        validate_vision_feature_layout(model_args.vision_feature_layout)
    if data_args.sample_fraction is not None and not 0 < data_args.sample_fraction <= 1:
        raise ValueError(f"sample_fraction: expected a number in (0, 1], got {data_args.sample_fraction}")
    if data_args.max_samples is not None and data_args.max_samples < 1:
        raise ValueError(f"max_samples: expected a positive int, got {data_args.max_samples}")
    if data_args.model_max_length < 1:
        raise ValueError(f"model_max_length: expected a positive int, got {data_args.model_max_length}")
    if apt_args.thresholds is not None and apt_args.num_scales is None:
        # One threshold per scale above the base one: infer S so `--thresholds a b` alone is enough.
        apt_args.num_scales = len(apt_args.thresholds) + 1
