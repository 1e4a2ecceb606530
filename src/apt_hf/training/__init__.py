"""Fine-tuning APT-LLaVA with the transformers Trainer: `accelerate launch scripts/finetune_llava.py`.

`arguments` (flags + YAML recipes), `data` (LLaVA JSON / datasets, validated), `collator` (chat template,
assistant-only labels, packed images), `model` (load / convert, trainable parts, LoRA), `train` (`main`).
Needs the `train` extra: pip install 'apt-hf[train]'.
"""

from .arguments import AptArguments, DataArguments, ModelArguments, parse_args
from .collator import AptLlavaDataCollator
from .data import load_training_dataset, make_tiny_dataset
from .model import load_lora_model, load_model_and_processor, setup_trainable
from .train import AptLlavaTrainer, main

__all__ = [
    "AptArguments", "AptLlavaDataCollator", "AptLlavaTrainer", "DataArguments", "ModelArguments",
    "load_lora_model", "load_model_and_processor", "load_training_dataset", "main", "make_tiny_dataset",
    "parse_args", "setup_trainable",
]
