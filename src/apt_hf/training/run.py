"""The steps every task's `main` takes around the Trainer: logging, TrainingArguments set for APT, the final save."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments

from .report import save_loss_curve


def setup_logging(training_args: TrainingArguments) -> None:
    """apt_hf and transformers log to stdout at the process's --log_level (replicas: --log_level_replica)."""
    import transformers

    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    for name in ("apt_hf", "transformers"):
        logging.getLogger(name).setLevel(level)
    transformers.utils.logging.set_verbosity(level)


def configure_training_args(training_args: TrainingArguments) -> None:
    """What APT training needs from TrainingArguments, whatever the task."""
    # The collator reads the raw columns (messages / images / labels); Trainer must not drop them as unused.
    training_args.remove_unused_columns = False
    # The skipped-sample counts (DropCounts) live in trainer_state.json and continue on resume.
    training_args.restore_callback_states_from_checkpoint = True
    # APT's new layers see no gradient in a batch where nothing merged; DDP must tolerate that.
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}  # frozen inputs need non-reentrant


def save_run_state(trainer: Trainer, processor: Any, script: str) -> None:
    """Beside the final model (main process only): the processor, trainer_state.json and loss_curve.png."""
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(trainer.args.output_dir)
    processor.save_pretrained(output_dir)
    trainer.save_state()
    curve = save_loss_curve(trainer.state.log_history, output_dir, title=script)
    if curve is not None:
        print(f"loss curve: {curve}", flush=True)


__all__ = ["configure_training_args", "save_run_state", "setup_logging"]
