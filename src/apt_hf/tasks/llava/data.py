"""Training data: LLaVA-format JSON / JSONL and `datasets` data sets, validated up front, images opened lazily.

Two schemas are read (and may be mixed in one JSON file):

* LLaVA / mix665k: ``{"id", "image": "relative/path.jpg" (optional, or a list), "conversations":
  [{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}]}``, paths relative to ``--image_folder``;
* llava-instruct-mix-vsft: ``{"messages": [{"role", "content": str | [{"type": "image" | "text", "text"}]}],
  "images": [PIL image | {"bytes", "path"} | path]}``.

Both are normalised to ``messages`` whose content is a list of ``{"type", "text"}`` parts (what LLaVA's chat
templates iterate over) and ``images``. Images stay as references until the collator opens them, so a 665k-row
set costs no image I/O before training, and an unreadable file costs one skipped sample, not the run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...training.data import lazy_images, load_datasets_source, read_json_records

IMAGE_TOKEN = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_JSON_SUFFIXES = (".json", ".jsonl")

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- normalisation


def _text_parts(text: str) -> list[dict[str, Any]]:
    """Split a text with `<image>` placeholders into image parts first, then the text (LLaVA-1.5's order)."""
    count = text.count(IMAGE_TOKEN)
    rest = text.replace(IMAGE_TOKEN, "").strip() if count else text
    parts: list[dict[str, Any]] = [{"type": "image", "text": None} for _ in range(count)]
    if rest or not count:
        parts.append({"type": "text", "text": rest})
    return parts


def normalize_content(content: Any) -> list[dict[str, Any]]:
    """Content as a list of {"type", "text"} parts, `<image>` placeholders in text turned into image parts."""
    if content is None:
        return [{"type": "text", "text": ""}]
    if isinstance(content, str):
        return _text_parts(content)
    if not isinstance(content, list):
        raise ValueError(f"message content: expected a string or a list of parts, got {type(content).__name__} "
                         f"{content!r:.80}")
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            raise ValueError(f"message content: expected parts {{'type': ..., 'text': ...}}, got "
                             f"{type(part).__name__} {part!r:.80}")
        kind = part.get("type")
        if kind == "image":
            parts.append({"type": "image", "text": None})
        elif kind == "text":
            parts.extend(_text_parts(part.get("text") or ""))
        else:
            raise ValueError(f"messages: expected content parts of type 'image' or 'text', got {kind!r}")
    return parts


def normalize_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation of a row of either schema as chat-template messages."""
    if row.get("messages") is not None:
        key, role_key, content_key = "messages", "role", "content"
    elif row.get("conversations") is not None:
        key, role_key, content_key = "conversations", "from", "value"
    else:
        raise ValueError("data_path: expected each sample to have `conversations` (LLaVA format) or `messages`, "
                         f"got keys {sorted(row)}")
    if not isinstance(row[key], list):
        raise ValueError(f"{key}: expected a list of turns, got {type(row[key]).__name__} {row[key]!r:.80}")
    turns = []
    for turn in row[key]:
        if not isinstance(turn, dict):
            raise ValueError(f"{key}: expected each turn to be an object with {role_key!r} and {content_key!r}, got "
                             f"{type(turn).__name__} {turn!r:.80}")
        content = turn.get(content_key)
        if key == "conversations" and content is not None and not isinstance(content, str):
            raise ValueError(f"conversations: expected 'value' to be a string, got {type(content).__name__} "
                             f"{content!r:.80}")
        turns.append((turn.get(role_key), content))
    messages = []
    for role, content in turns:
        if role not in ROLE_NAMES:
            raise ValueError(f"conversation role: expected one of {sorted(ROLE_NAMES)}, got {role!r}")
        messages.append({"role": ROLE_NAMES[role], "content": normalize_content(content)})
    return messages


def image_refs(row: dict[str, Any]) -> list[Any]:
    """The row's image references (paths, {"bytes", "path"} dicts or PIL images), in placeholder order."""
    images = row.get("images", row.get("image"))
    if images is None:
        return []
    if isinstance(images, (str, dict)) or not isinstance(images, Sequence):
        return [images]
    return list(images)


def count_image_parts(messages: Iterable[dict[str, Any]]) -> int:
    return sum(1 for m in messages for part in m["content"] if part["type"] == "image")


def check_sample(messages: list[dict[str, Any]], num_images: int, name: str) -> None:
    """Refuse samples the collator could not turn into a correct training example."""
    placeholders = count_image_parts(messages)
    if placeholders != num_images:
        raise ValueError(
            f"data_path: sample {name} has {placeholders} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s); "
            f"each image needs exactly one {IMAGE_TOKEN} in the conversation"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"data_path: sample {name} has no assistant (gpt) turn, so nothing to train on")


# --------------------------------------------------------------------------------------------- sampling


def sample_indices(n: int, sample_fraction: float | None, max_samples: int | None, seed: int) -> list[int] | None:
    """Seeded subset: a random `sample_fraction` of the rows, then at most `max_samples`; None keeps all rows."""
    if sample_fraction is None and (max_samples is None or max_samples >= n):
        return None
    if sample_fraction is not None:
        order = np.random.default_rng(seed).permutation(n)[: max(1, round(n * sample_fraction))]
    else:
        order = np.arange(n)
    if max_samples is not None:
        order = order[:max_samples]
    return sorted(int(i) for i in order)  # sorted: sequential reads; the Trainer's sampler shuffles anyway


# --------------------------------------------------------------------------------------------- loading


def _is_json_file(path: Path) -> bool:
    return path.is_file() and path.suffix in _JSON_SUFFIXES


def _load_json_dataset(path: Path, image_folder: str | None, indices_fn) -> Any:
    """Read a LLaVA-format file into a `datasets.Dataset` of normalised rows (only the sampled ones)."""
    from datasets import Dataset

    rows = read_json_records(path)
    indices = indices_fn(len(rows))
    picked = rows if indices is None else [rows[i] for i in indices]
    ids, messages, images = [], [], []
    for i, row in enumerate(picked):
        index = i if indices is None else indices[i]
        sample_id = str(row.get("id", index))
        name = f"{sample_id!r} ({path} record {index})"
        try:
            conversation = normalize_messages(row)
        except ValueError as err:
            raise ValueError(f"data_path: sample {name}: {err}") from None
        refs = image_refs(row)
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"data_path: sample {name}: expected image paths (strings) in a JSON file")
        check_sample(conversation, len(refs), name)
        ids.append(sample_id)
        messages.append(conversation)
        images.append(refs)
    if any(images) and not all(os.path.isabs(r) for refs in images for r in refs):
        if image_folder is None:
            raise ValueError("image_folder: expected the folder the samples' relative `image` paths start from, "
                             "got nothing")
    return Dataset.from_dict({"id": ids, "messages": messages, "images": images})


def image_counts(ds: Any, column: str) -> list[int]:
    """Images per row, from Arrow list lengths (no image bytes are turned into Python objects)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    counts: list[int] = []
    for table in ds.select_columns([column]).with_format("arrow").iter(batch_size=4096):
        col = table.column(column)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            counts += pc.fill_null(pc.list_value_length(col), 0).to_pylist()
        else:
            counts += [0 if v is None else 1 for v in col.to_pylist()]
    return counts


def _validate_datasets_dataset(ds: Any) -> None:
    columns = set(ds.column_names)
    text_column = "messages" if "messages" in columns else "conversations" if "conversations" in columns else None
    if text_column is None:
        raise ValueError(f"data_path: expected a `messages` (or LLaVA `conversations`) column, got {sorted(columns)}")
    image_column = "images" if "images" in columns else "image" if "image" in columns else None
    counts = image_counts(ds, image_column) if image_column else [0] * len(ds)
    ids = list(ds["id"]) if "id" in columns else None
    i = 0
    for batch in ds.select_columns([text_column]).iter(batch_size=1024):
        for conversation in batch[text_column]:
            name = repr(str(ids[i])) if ids is not None else f"#{i}"
            try:
                messages = normalize_messages({text_column: conversation})
            except ValueError as err:
                raise ValueError(f"data_path: sample {name}: {err}") from None
            check_sample(messages, counts[i], name)
            i += 1


def load_training_dataset(
    data_path: str | None,
    image_folder: str | None = None,
    split: str = "train",
    config: str | None = None,
    sample_fraction: float | None = None,
    max_samples: int | None = None,
    seed: int = 42,
) -> Any:
    """Load, subsample and validate the training set; every bad input raises here, before the model loads.

    Returns a `datasets.Dataset` whose rows the collator reads with `normalize_messages` and `image_refs`.
    """
    if not data_path:
        raise ValueError("data_path: expected a LLaVA-format JSON/JSONL file or a datasets id/path, got nothing")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise ValueError(f"image_folder: expected an existing folder, got {image_folder!r}")

    def indices_fn(n: int) -> list[int] | None:
        return sample_indices(n, sample_fraction, max_samples, seed)

    path = Path(data_path).expanduser()
    if _is_json_file(path):
        return _finish(_load_json_dataset(path, image_folder, indices_fn), data_path)
    ds = lazy_images(load_datasets_source(data_path, split, config), ("images", "image"))
    indices = indices_fn(len(ds))
    if indices is not None:
        ds = ds.select(indices)
    _validate_datasets_dataset(ds)
    return _finish(ds, data_path)


def _finish(ds: Any, data_path: str) -> Any:
    if len(ds) == 0:
        raise ValueError(f"data_path: {data_path!r} has no samples (after --sample_fraction / --max_samples)")
    return ds


# --------------------------------------------------------------------------------------------- tiny demo data

_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
_SHAPES = ("square", "circle")


def make_tiny_dataset(data_path: str | Path, image_folder: str | Path, num_samples: int = 48, size: int = 112,
                      seed: int = 0) -> Path:
    """Write a small LLaVA-format data set of coloured shapes on flat backgrounds, for the CPU recipe and tests.

    Flat backgrounds give APT large low-entropy regions to merge; answers depend on the image (colour,
    shape), and a few samples are text-only and multi-turn, like mix665k.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image_folder = Path(image_folder)
    image_folder.mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(_COLORS)
    for i in range(num_samples):
        color, shape = names[i % len(names)], _SHAPES[(i // len(names)) % len(_SHAPES)]
        if i % 8 == 7:
            rows.append({"id": f"text-{i}", "conversations": [
                {"from": "human", "value": "Name a color."}, {"from": "gpt", "value": f"The color {color}."}]})
            continue
        background = tuple(int(v) for v in rng.integers(0, 80, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        lo, hi = int(rng.integers(size // 8, size // 3)), int(rng.integers(2 * size // 3, size - size // 8))
        (draw.rectangle if shape == "square" else draw.ellipse)([lo, lo, hi, hi], fill=_COLORS[color])
        noise = rng.integers(-20, 21, (size // 2, size, 3))  # a textured half keeps some patches fine
        pixels = np.asarray(image, dtype=np.int64)
        pixels[size // 2:] = np.clip(pixels[size // 2:] + noise, 0, 255)
        name = f"{i:04d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(image_folder / name)
        conversation = [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhat color is the shape?"},
                        {"from": "gpt", "value": f"The shape is {color}."}]
        if i % 3 == 0:
            conversation += [{"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": f"A {shape}."}]
        rows.append({"id": f"shape-{i}", "image": name, "conversations": conversation})
    data_path = Path(data_path)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_text(json.dumps(rows, indent=1))
    return data_path
