"""Batches of requests by their real prompt length, image tokens included (with APT each image brings its own count).

Requests are grouped by task and generation settings. The processor runs once over a window of
`SORT_WINDOW_BATCHES` batches of a group; the window's requests are then sorted by length and cut into batches, so
a batch pads little while only one window's images are held in memory. A batch is collated as the processor would
have returned it for those requests alone. Needs no lmms-eval.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature

from ..patchify import PatchLayout, select_image_inputs
from .prompts import Prompt

# Requests are preprocessed this many batches at a time, then sorted by length: near the padding of a global
# sort, while only one window's images are held in memory (a 200k-question task never holds all of them).
SORT_WINDOW_BATCHES = 16


@dataclass
class Request:
    """A request waiting to be batched: its position, task, batching group and how to build its prompt later.

    Prompts (and the images they carry) are built one window of batches at a time (`SORT_WINDOW_BATCHES`).
    `padding`: a request lmms-eval added so that every process runs as many batches; run, but never counted.
    """

    index: int
    task: str
    gen_kwargs: dict[str, Any]
    build: Callable[[], Prompt]
    padding: bool

    @property
    def group(self) -> tuple[str, str]:
        """Batches never mix tasks or generation settings."""
        return self.task, json.dumps(self.gen_kwargs, sort_keys=True, default=str)


class Window:
    """The image tensors of one processor call over a window of requests; any subset of its images can be taken
    back in any order (APT's packed patches through `select_images`, dense `pixel_values` by index)."""

    def __init__(self, image_inputs: dict[str, torch.Tensor], num_images: int,
                 tiles_per_image: torch.Tensor | None = None) -> None:
        self.inputs = image_inputs
        self.num_images = num_images
        self.tiles_per_image = tiles_per_image  # anyres processors: packed tiles per image (else one)

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The image keys of images `index` as the processor would have returned them for those images alone."""
        if not self.inputs:
            return {}
        if PatchLayout.from_inputs(self.inputs) is None and self.tiles_per_image is None:  # stock: dense rows
            for key, value in self.inputs.items():
                if not isinstance(value, torch.Tensor) or value.shape[:1] != (self.num_images,):
                    raise ValueError(f"processor output {key!r}: expected one entry per image ({self.num_images}) "
                                     f"to batch it, got {getattr(value, 'shape', type(value).__name__)}")
        return select_image_inputs(self.inputs, index, self.tiles_per_image)


@dataclass
class Prepared:
    """A processed request: its unpadded token ids, where its images sit in its window, and what it costs."""

    request: Request
    input_ids: torch.Tensor  # (L,) prompt tokens (then the continuation's, for loglikelihood), no padding
    context_length: int  # tokens before the continuation (all of them for generation)
    window: Window
    first_image: int
    num_images: int
    visual_tokens: int  # tokens the vision tower kept, all images of the request
    grid_tokens: int  # tokens of their full patch grids
    lm_image_tokens: int  # <image> tokens in the prompt
    seconds: float  # its share of the window's preprocessing time

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def prepare(requests: list[Request], processor: Any, image_token_id: int) -> list[Prepared]:
    """Run the processor once over a window of requests: each request's real token ids (every image's `<image>`
    already expanded to its own token count), its images' place and its visual token counts."""
    started = time.perf_counter()
    prompts = [r.build() for r in requests]
    images = [im for p in prompts for im in p.images]
    inputs = processor(images=images or None, text=[p.text for p in prompts], padding=True, return_tensors="pt")
    keep = inputs.pop("attention_mask").bool()
    input_ids = inputs.pop("input_ids")
    rows = [ids[mask] for ids, mask in zip(input_ids, keep, strict=True)]
    context_lengths = [len(row) for row in rows]
    continuations = [p.continuation for p in prompts]
    if any(c is not None for c in continuations):
        cont_ids = processor.tokenizer([c or "" for c in continuations], add_special_tokens=False)["input_ids"]
        rows = [torch.cat([row, torch.tensor(c, dtype=row.dtype)]) for row, c in zip(rows, cont_ids, strict=True)]

    counts = torch.tensor([len(p.images) for p in prompts])
    owner = torch.repeat_interleave(torch.arange(len(prompts)), counts)
    lm_slots = ((input_ids == image_token_id) & keep).sum(-1)
    tiles = processor.tiles_per_image(inputs) if images and hasattr(processor, "tiles_per_image") else None
    if "tokens_per_image" in inputs:  # APT: the tokens the tower kept vs. the full grid, over every tile
        tile_owner = owner if tiles is None else torch.repeat_interleave(owner, tiles)
        kept = torch.zeros(len(prompts), dtype=torch.long).index_add_(0, tile_owner, inputs["tokens_per_image"])
        grid = torch.zeros(len(prompts), dtype=torch.long).index_add_(0, tile_owner,
                                                                      inputs["image_grid_hw"].prod(-1))
    else:  # stock: every image is its full grid, as many tokens as it has <image> slots
        kept = grid = lm_slots
    window = Window(dict(inputs), len(images), tiles)
    seconds = time.perf_counter() - started
    weights = counts.tolist() if images else [1] * len(prompts)  # images dominate preprocessing
    firsts = (torch.cumsum(counts, 0) - counts).tolist()
    return [Prepared(request, row, n_context, window, first, n, int(k), int(g), int(s),
                     seconds * w / max(sum(weights), 1))
            for request, row, n_context, first, n, k, g, s, w in zip(
                requests, rows, context_lengths, firsts, counts.tolist(), kept.tolist(), grid.tolist(),
                lm_slots.tolist(), weights, strict=True)]


def length_sorted_batches(requests: list[Request], batch_size: int,
                          prepare: Callable[[list[Request]], list[Prepared]]) -> Iterator[list[Prepared]]:
    """Batches of one task and generation settings, longest prompts first within each window of
    `SORT_WINDOW_BATCHES` batches, so a batch pads little; `prepare` processes one window at a time."""
    groups: dict[tuple[str, str], list[Request]] = {}
    for request in requests:
        groups.setdefault(request.group, []).append(request)
    window = batch_size * SORT_WINDOW_BATCHES
    for items in groups.values():
        for start in range(0, len(items), window):
            prepared = prepare(items[start: start + window])
            prepared.sort(key=lambda p: (-p.length, p.request.index))
            for i in range(0, len(prepared), batch_size):
                yield prepared[i: i + batch_size]


def collate(batch: list[Prepared], pad_token_id: int, padding_side: str) -> BatchFeature:
    """The batch as the processor returns it for these requests together: padded `input_ids` and `attention_mask`
    (on `padding_side`) and the image keys of their images."""
    lengths = torch.tensor([p.length for p in batch])
    columns = torch.arange(int(lengths.max()))
    if padding_side == "left":
        keep = columns >= (lengths.max() - lengths)[:, None]
    else:
        keep = columns < lengths[:, None]
    input_ids = torch.full(keep.shape, pad_token_id, dtype=batch[0].input_ids.dtype)
    input_ids[keep] = torch.cat([p.input_ids for p in batch])
    data: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": keep.long()}
    window = batch[0].window
    if any(p.window is not window for p in batch):
        raise RuntimeError("apt_llava: a batch mixes preprocessing windows")  # length_sorted_batches never does
    image_index = torch.cat([torch.arange(p.first_image, p.first_image + p.num_images) for p in batch])
    if image_index.numel():
        data.update(window.take(image_index))
    return BatchFeature(data)


__all__ = ["SORT_WINDOW_BATCHES", "Prepared", "Request", "Window", "collate", "length_sorted_batches", "prepare"]
