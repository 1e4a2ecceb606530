"""Command-line and recipe arguments of `scripts/finetune_llava.py`: transformers' `TrainingArguments`, the APT
fields (`AptArguments`) and the dataclasses below; `--config` takes a YAML recipe (`apt_hf.training.arguments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ...configuration_apt import validate_vision_feature_layout
from ...dtypes import DTYPES
from ...modeling_apt_llava import AptLlavaForConditionalGeneration
from ...training import arguments as toolkit
from ...training.arguments import AptArguments, check_eval_data
from ...training.trainable import parse_parts

SCRIPT = "finetune_llava.py"
TRAINABLE_PARTS = tuple(AptLlavaForConditionalGeneration.trainable_parts)


@dataclass
class ModelArguments:
    """Which checkpoint to start from and which of its parts train."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Stock LLaVA-1.5 / -NeXT / -OneVision (converted on the fly) or an APT "
                                               "conversion of one: hub id or local path."}
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


def check_args(model_args: ModelArguments, apt_args: AptArguments, data_args: DataArguments,
               training_args: TrainingArguments) -> None:
    """Everything that can be checked without touching files: clear errors before any loading."""
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path: expected a LLaVA or APT-LLaVA hub id or path, got nothing")
    if not data_args.data_path:
        raise ValueError("data_path: expected a LLaVA-format JSON/JSONL file or a datasets id/path, got nothing")
    check_eval_data(training_args, data_args.eval_data_path)
    parts = parse_parts(model_args.trainable, TRAINABLE_PARTS)
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
    apt_args.infer_num_scales()


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, AptArguments, DataArguments, TrainingArguments]:
    """Parse recipe + flags (flags win) into the four argument dataclasses and check them."""
    model_args, apt_args, data_args, training_args = toolkit.parse_args(argv, ARGUMENT_CLASSES, check_args, SCRIPT)
    return model_args, apt_args, data_args, training_args


__all__ = ["ARGUMENT_CLASSES", "AptArguments", "DataArguments", "ModelArguments", "TRAINABLE_PARTS", "check_args",
           "parse_args"]
