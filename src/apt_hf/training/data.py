"""Data helpers every task shares: datasets sources, lazy image columns, image opening, JSON records.

Images stay as references ({"bytes", "path"} dicts, paths or PIL images) until a collator opens them, so a large set
costs no image I/O before training, and an unreadable file costs one skipped sample, not the run. Every error names
the flag it is about (`argument`), so a bad input fails in seconds with a message that says what to change.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DATA_FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # what `save_to_disk` writes


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `datasets`' `save_to_disk`."""
    return path.is_dir() and any((path / marker).exists() for marker in SAVED_DATASET_MARKERS)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).suffix in DATA_FILE_FORMATS


def load_datasets_source(data_path: str, split: str, config: str | None, argument: str = "data_path") -> Any:
    """`load_from_disk` for saved folders, `load_dataset` for data files, other folders and hub ids; one split.

    Errors name `argument`; an uncached hub id under HF_HUB_OFFLINE says so and what to do.
    """
    import datasets
    from huggingface_hub import constants

    path = Path(data_path).expanduser()
    if is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
    elif path.is_file():
        fmt = DATA_FILE_FORMATS.get(path.suffix)
        if fmt is None:
            raise ValueError(f"{argument}: expected a folder, a data file ({', '.join(DATA_FILE_FORMATS)}) or a "
                             f"datasets id, got the file {data_path!r}")
        ds = datasets.load_dataset(fmt, data_files=str(path))
    elif path.is_dir():
        ds = datasets.load_dataset(str(path), config)
    elif _looks_local(data_path):
        raise ValueError(f"{argument}: {data_path!r} does not exist")
    else:
        try:  # only the split asked for: a hub dataset's other splits (ImageNet's train) are not prepared
            ds = datasets.load_dataset(data_path, config, split=split)
        except Exception as err:  # offline, missing repo, gated, unknown split: say what was tried and what to do
            if constants.HF_HUB_OFFLINE:
                raise ValueError(
                    f"{argument}: {data_path!r} is not a local folder or file, and as a datasets id it is not in the "
                    "local cache; HF_HUB_OFFLINE=1 forbids downloading it. Run once with HF_HUB_OFFLINE unset to "
                    f"download it, or pass a local folder ({type(err).__name__}: {err})") from err
            raise ValueError(f"{argument}: {data_path!r} is not a local folder or file and could not be loaded as a "
                             f"datasets id with split {split!r} ({type(err).__name__}: {err})") from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"dataset_split: {data_path!r} has splits {list(ds)}, got {split!r}")
        ds = ds[split]
    return ds


def lazy_images(ds: Any, columns: Iterable[str]) -> Any:
    """Keep `Image` columns (and lists of images) as {"bytes", "path"}, so decoding happens in the collator, one
    sample at a time."""
    from datasets import Image, List, Sequence

    for column in columns:
        if column not in ds.column_names:
            continue
        feature = ds.features[column]
        if isinstance(feature, Image):
            ds = ds.cast_column(column, Image(decode=False))
        elif isinstance(feature, (List, Sequence)) and isinstance(feature.feature, Image):
            ds = ds.cast_column(column, List(Image(decode=False)))
    return ds


def read_json_records(path: Path, argument: str = "data_path") -> list[dict[str, Any]]:
    """The records of a JSON list or a JSONL file; a malformed line or record names the file and where."""
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            rows = []
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{argument}: {path} line {number} is not JSON ({err.msg})") from None
        else:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{argument}: {path} is not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{argument}: expected a JSON list of samples (objects) in {path}, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{argument}: {path} record {i} is a {type(row).__name__}, expected an object")
    return rows


def resolve_image_path(path: str, image_folder: str | None) -> str:
    """`path` under `image_folder` when it is relative and a folder is given."""
    if image_folder is None or os.path.isabs(path):
        return path
    return os.path.join(image_folder, path)


def open_image(ref: Any, image_folder: str | None = None) -> Any:
    """Open one image reference as an RGB PIL image, fully decoded (so broken files fail here, not later)."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        image = ref
    elif isinstance(ref, dict):
        if ref.get("bytes") is not None:
            image = Image.open(io.BytesIO(ref["bytes"]))
        elif ref.get("path"):
            image = Image.open(resolve_image_path(ref["path"], image_folder))
        else:
            raise ValueError("image: expected 'bytes' or 'path', got neither")
    elif isinstance(ref, (str, os.PathLike)):
        image = Image.open(resolve_image_path(os.fspath(ref), image_folder))
    else:
        raise ValueError(f"image: expected a path, a {{'bytes', 'path'}} dict or a PIL image, got {type(ref).__name__}")
    image.load()
    return image.convert("RGB")


__all__ = ["DATA_FILE_FORMATS", "SAVED_DATASET_MARKERS", "is_saved_dataset", "lazy_images", "load_datasets_source",
           "open_image", "read_json_records", "resolve_image_path"]
