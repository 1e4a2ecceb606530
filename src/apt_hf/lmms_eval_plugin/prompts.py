"""Prompts for `apt_llava`: a task's messages or context rendered with the chat template, and its images checked.

Images only: a request with video or audio is refused rather than answered without them. The template must render
one `<image>` per image, which the processor then expands to each image's own token count. Needs no lmms-eval.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_TOKEN = "<image>"
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Prompt:
    """One request, ready for the processor: the rendered chat prompt, its images in order and, for
    loglikelihood, the continuation to score."""

    text: str
    images: list[Image.Image]
    continuation: str | None = None


def visual_images(visuals: Any, task: str, doc_id: Any) -> list[Image.Image]:
    """A simple task's `doc_to_visual` output (nested lists, PIL images or image files) as a flat list of images."""
    return check_images(_flatten(visuals), task, doc_id)


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    flat: list[Any] = []
    for item in visuals:
        flat.extend(_flatten(item))
    return flat


def check_images(images: list[Any], task: str, doc_id: Any) -> list[Image.Image]:
    """RGB PIL images (image files are opened), refusing video/audio rather than answering without them."""
    checked = []
    for item in images:
        if isinstance(item, (str, os.PathLike)) and os.path.isfile(item) and Path(item).suffix.lower() in IMAGE_FILES:
            item = Image.open(item)
        if not isinstance(item, Image.Image):
            raise ValueError(f"apt_llava: task {task!r} (doc {doc_id}) gives a {type(item).__name__} visual "
                             f"({str(item)[:80]!r}); apt_llava evaluates images only, not video or audio")
        checked.append(item.convert("RGB") if item.mode != "RGB" else item)
    return checked


def user_turn(text: str, images: list[Image.Image]) -> list[dict[str, Any]]:
    """A single user message: the images first, then the text, as lmms-eval's chat tasks build it."""
    content: list[dict[str, Any]] = [] if IMAGE_TOKEN in text else [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def render_prompt(processor: Any, chat_template: str, messages: list[dict[str, Any]],
                  images: list[Image.Image]) -> str:
    """`messages` rendered with `chat_template`, ready for generation; the template must give each image an
    `<image>`."""
    prompt = processor.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                           add_generation_prompt=True)
    if prompt.count(IMAGE_TOKEN) != len(images):
        raise ValueError(f"chat_template: the prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} for "
                         f"{len(images)} image(s); the template must render one {IMAGE_TOKEN} per image")
    return prompt


__all__ = ["IMAGE_FILES", "IMAGE_TOKEN", "Prompt", "check_images", "render_prompt", "user_turn",
           "visual_images"]
