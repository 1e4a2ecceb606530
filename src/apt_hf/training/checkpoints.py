"""Checkpoints a run can trust: complete ones to resume from, and output folders that are never silently reused.

Trainer writes a checkpoint's files in a fixed order and `trainer_state.json` last, so a save that was killed
part-way leaves a folder without a readable state, or without weights / optimizer / scheduler / RNG state.
`auto` resume skips such folders (with a warning naming them) instead of dying on them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from transformers import TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# What a sharded run writes instead of optimizer.pt: DeepSpeed's global_step*/ folder, FSDP's optimizer_* files.
OPTIMIZER_PATTERNS = ("optimizer.pt", "global_step*", "optimizer_*")
SCHEDULER_FILE = "scheduler.pt"
RNG_PATTERN = "rng_state*.pth"
# Files of a finished run's final model: a new run must not write over them without --overwrite_output_dir.
FINAL_MODEL_FILES = ("config.json", "adapter_config.json", *WEIGHT_FILES)


def missing_parts(checkpoint: str | Path, model_only: bool = False) -> list[str]:
    """What a checkpoint folder lacks to resume from (empty when complete); `model_only`: --save_only_model runs."""
    folder = Path(checkpoint)
    missing = []
    try:
        json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        missing.append(f"{STATE_FILE} (absent or unreadable)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append("model weights")
    if not model_only:
        if not any(any(folder.glob(pattern)) for pattern in OPTIMIZER_PATTERNS):
            missing.append("optimizer state")
        if not (folder / SCHEDULER_FILE).is_file():
            missing.append(SCHEDULER_FILE)
        if not any(folder.glob(RNG_PATTERN)):
            missing.append("RNG state")
    return missing


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint-N folders of `output_dir`, newest step first."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and (m := pattern.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | Path, model_only: bool = False) -> Path | None:
    """The newest checkpoint that can be resumed from; incomplete newer ones are skipped with a warning."""
    for folder in checkpoints(output_dir):
        missing = missing_parts(folder, model_only)
        if not missing:
            return folder
        logger.warning("resume_from_checkpoint=auto: skipping %s, an incomplete save (missing %s); resuming from the "
                       "checkpoint before it", folder, ", ".join(missing))
    return None


def check_output_dir(output_dir: str | Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to start a new run in a folder that holds another run's model or checkpoints.

    Resuming continues the run that is there; `overwrite` (--overwrite_output_dir) starts over and removes nothing
    but what the new run writes over. Otherwise the old run's checkpoints would later be "resumed" by mistake.
    """
    folder = Path(output_dir)
    if overwrite or resuming or not folder.is_dir():
        return
    old = [p.name for p in checkpoints(folder)] + [name for name in FINAL_MODEL_FILES if (folder / name).is_file()]
    if old:
        shown = ", ".join(sorted(old)[:4]) + (", ..." if len(old) > 4 else "")
        raise ValueError(
            f"output_dir: {folder} already holds a run ({shown}); "
            "pass --resume_from_checkpoint auto to continue it, --overwrite_output_dir to start over in it, or "
            "another --output_dir"
        )


def remove_old_checkpoints(output_dir: str | Path) -> None:
    """--overwrite_output_dir: remove the previous run's checkpoint-N folders (its final files are written over)."""
    import shutil

    for folder in checkpoints(output_dir):
        logger.warning("overwrite_output_dir: removing %s of the previous run", folder)
        shutil.rmtree(folder)


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint` path, or 'auto'/'true' for the newest complete checkpoint in --output_dir."""
    resume = training_args.resume_from_checkpoint
    if resume is None:
        return None
    if str(resume).lower() in ("auto", "true", "last"):
        last = last_complete_checkpoint(training_args.output_dir, training_args.save_only_model)
        if last is None:
            logger.warning("resume_from_checkpoint=%s: no complete checkpoint in %s, starting fresh", resume,
                           training_args.output_dir)
        return None if last is None else str(last)
    if not os.path.isdir(resume):
        raise ValueError(f"resume_from_checkpoint: expected a checkpoint folder, got {resume!r}, which does not exist")
    missing = missing_parts(resume, training_args.save_only_model)
    if missing:
        raise ValueError(f"resume_from_checkpoint: {resume} is an incomplete save (missing {', '.join(missing)}); "
                         "pass an earlier checkpoint, or 'auto' to take the newest complete one")
    return resume


def prepare_output_dir(training_args: TrainingArguments, overwrite: bool) -> str | None:
    """The checkpoint to resume from (or None), once --output_dir is known to be safe to write in.

    `overwrite` (--overwrite_output_dir) on a fresh start removes the old run's checkpoints (main process), or a
    later `auto` resume would continue the old run.
    """
    resume = resolve_resume(training_args)
    check_output_dir(training_args.output_dir, overwrite, resuming=resume is not None)
    if overwrite and resume is None and training_args.process_index == 0:
        remove_old_checkpoints(training_args.output_dir)
    return resume


__all__ = ["check_output_dir", "checkpoints", "last_complete_checkpoint", "missing_parts", "prepare_output_dir",
           "remove_old_checkpoints", "resolve_resume"]
