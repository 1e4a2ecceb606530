"""Publishing a run's final model: hub settings taken out of TrainingArguments at start, one upload at the end.

Trainer's own push uploads pickles (training_args.bin, and optimizer.pt with hub_strategy checkpoint); here it is
turned off and the finished model is published by `apt_hf.hub.publish`, which uploads safetensors, JSON and code only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import Trainer, TrainingArguments

logger = logging.getLogger(__name__)


def pop_hub_settings(training_args: TrainingArguments, unpublishable: str | None = None) -> dict[str, Any] | None:
    """Take the hub settings out of TrainingArguments before Trainer pickles them (training_args.bin).

    The token moves to this process's HF_TOKEN, so no file under --output_dir ever holds it. Returns the push
    target ({"repo_id", "private", "revision"}) or None without --push_to_hub. `unpublishable`: why this run's
    output must not be pushed (the task's own check), or None.
    """
    if training_args.hub_token:
        os.environ["HF_TOKEN"] = training_args.hub_token
        training_args.hub_token = None
    if not training_args.push_to_hub:
        return None
    strategy = str(getattr(training_args.hub_strategy, "value", training_args.hub_strategy))
    if strategy not in ("end", "every_save"):  # both: the finished model, published once at the end
        raise ValueError(f"hub_strategy: expected 'end' or 'every_save' (the finished model, published without "
                         f"pickles), got {strategy!r}; checkpoints hold pickled optimizer and argument files, which "
                         "are never uploaded")
    if unpublishable is not None:
        raise ValueError(f"push_to_hub: {unpublishable}")
    if not training_args.hub_model_id or "/" not in training_args.hub_model_id:
        raise ValueError(f"hub_model_id: expected NAMESPACE/NAME to push to, got {training_args.hub_model_id!r}")
    training_args.push_to_hub = False
    return {"repo_id": training_args.hub_model_id, "private": training_args.hub_private_repo,
            "revision": training_args.hub_revision}


def push_outputs(trainer: Trainer, hub: dict[str, Any]) -> None:
    """Publish --output_dir (the final model, processor, code and a model card; never a pickle) to the Hub."""
    if trainer.is_world_process_zero():
        from ..hub import publish

        result = publish(trainer.args.output_dir, hub["repo_id"], private=hub["private"], revision=hub["revision"],
                         commit_message="End of training")
        logger.info("pushed %d files to %s", len(result.upload_set.files), hub["repo_id"])
    trainer.accelerator.wait_for_everyone()


__all__ = ["pop_hub_settings", "push_outputs"]
