"""Fine-tuning APT-LLaVA with the transformers Trainer: `accelerate launch scripts/finetune_llava.py`.

`arguments` (the script's flags), `data` (LLaVA JSON / JSONL and datasets, validated), `collator` (chat template,
assistant-only labels, packed images), `model` (load / convert, trainable parts, LoRA), `adapter` (a LoRA adapter's
base and card), `train` (`main`).
"""

from .arguments import DataArguments, ModelArguments, parse_args
from .collator import AptLlavaDataCollator
from .data import load_training_dataset, make_tiny_dataset
from .model import load_lora_model, load_model_and_processor, setup_trainable
from .train import main

__all__ = [
    "AptLlavaDataCollator", "DataArguments", "ModelArguments", "load_lora_model", "load_model_and_processor",
    "load_training_dataset", "main", "make_tiny_dataset", "parse_args", "setup_trainable",
]
