"""Publish an APT checkpoint (APT-LLaVA, APT-CLIP or APT-ViT) on the Hugging Face Hub.

    python scripts/push_to_hub.py --model_dir DIR --repo_id NAMESPACE/NAME [--private]
        [--eval_results lmms_eval_results.json] [--dry_run --local_dir DIR] [--revision BRANCH]
        [--commit_message MSG]

The folder is checked first (safetensors weights, an APT processor, remote code and auto_map for every Auto class
a user calls); pickled weights are converted and oversized shards re-sharded. A model card is rendered from
the templates apt_hf ships (apt_hf/model_cards/) with the APT settings, usage and, given lmms-eval's results
JSON, a model-index. `--dry_run --local_dir DIR` writes exactly the folder that would be uploaded and lists it;
without it, one commit uploads it. The token comes from HF_TOKEN or `hf auth login` and is never printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from apt_hf.hub import DEFAULT_MAX_SHARD_SIZE, publish
from apt_hf.model_card import CardOptions


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, type=Path,
                        help="folder written by save_pretrained of the model and its processor")
    parser.add_argument("--repo_id", required=True, help="NAMESPACE/NAME on the Hub")
    parser.add_argument("--private", action="store_true",
                        help="create the repository private (default: the account's default; an existing "
                             "repository keeps its visibility)")
    parser.add_argument("--eval_results", type=Path, default=None,
                        help="lmms-eval's results JSON (<date>_results.json under its --output_path): model-index "
                             "and results table on the card")
    parser.add_argument("--dry_run", action="store_true", help="write the upload set to --local_dir, upload nothing")
    parser.add_argument("--local_dir", type=Path, default=None, help="new or empty folder for --dry_run")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--speed_table", type=Path, default=None,
                        help='JSON list of rows {"column": value} (e.g. tokens kept and speedups from '
                             "scripts/benchmark.py) for the card's speed table")
    parser.add_argument("--base_model", default=None,
                        help="hub id of the model APT was converted from (card metadata; default: the one training "
                             "recorded, if any)")
    parser.add_argument("--datasets", nargs="*", default=None, help="hub ids of the fine-tuning data sets")
    parser.add_argument("--license", default=None,
                        help="card license (default: the usual base model's: llama2 for LLaVA-1.5, mit for CLIP, "
                             "apache-2.0 for ViT; set your base model's)")
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"re-shard weights whose files exceed this (default {DEFAULT_MAX_SHARD_SIZE})")
    args = parser.parse_args(argv)
    if args.dry_run and args.local_dir is None:
        parser.error("--dry_run needs --local_dir DIR: the folder it would upload is written there")
    if args.local_dir is not None and not args.dry_run:
        parser.error("--local_dir only goes with --dry_run")
    return args


def _speed_table(path: Path | None) -> object:
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"speed_table: expected a JSON file of rows, {path}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = publish(
            args.model_dir, args.repo_id, private=True if args.private else None,
            card=CardOptions(base_model=args.base_model, datasets=args.datasets, license=args.license,
                             eval_results=args.eval_results, speed_table=_speed_table(args.speed_table)),
            dry_run=args.dry_run, local_dir=args.local_dir, revision=args.revision,
            commit_message=args.commit_message, max_shard_size=args.max_shard_size,
        )
    except (ValueError, OSError) as err:  # OSError covers HTTP and token errors; no message holds the token
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.upload_set.listing())
    if result.local_dir is not None:
        print(f"dry run: wrote the upload set to {result.local_dir}; nothing was uploaded")
    else:
        print(f"uploaded to https://huggingface.co/{args.repo_id}"
              + (f" (branch {args.revision})" if args.revision else "") + f": {result.commit.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
