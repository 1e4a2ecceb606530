"""The `apt_pope_local` task's functions: lmms-eval's own POPE prompt and scoring, reused as they are."""

from lmms_eval.tasks.pope.utils import (
    pope_aggregate_accuracy,
    pope_aggregate_f1_score,
    pope_aggregate_precision,
    pope_aggregate_recall,
    pope_aggregate_yes_ratio,
    pope_doc_to_text,
    pope_doc_to_visual,
    pope_process_results,
)

__all__ = [
    "pope_aggregate_accuracy",
    "pope_aggregate_f1_score",
    "pope_aggregate_precision",
    "pope_aggregate_recall",
    "pope_aggregate_yes_ratio",
    "pope_doc_to_text",
    "pope_doc_to_visual",
    "pope_process_results",
]
