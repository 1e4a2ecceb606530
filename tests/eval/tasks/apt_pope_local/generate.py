"""Write the `apt_pope_local` task's data: a parquet of generated scenes in POPE's schema.

POPE asks yes/no questions about objects in an image. Here each image is a flat background (which APT merges
into large patches) with coloured shapes and a noisy band (which it keeps at full resolution), and each
question asks about one shape that is, or is not, in the picture. Everything is generated from a seed, so the
tests ship no binary files. Usage: `python generate.py OUT.parquet [--num_samples N]`.
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square")
CATEGORIES = ("random", "popular", "adversarial")  # POPE's three negative-sampling settings


def _scene(rng: random.Random, size: int) -> tuple[Image.Image, list[tuple[str, str]]]:
    """A flat background, a noisy band and 1-3 shapes; returns the image and its (color, shape) objects."""
    background = tuple(rng.randrange(90, 200) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    band_height = rng.randrange(size // 8, size // 2)  # varies how many tokens each image keeps
    band = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (band_height, size, 3), dtype=np.uint8)
    image.paste(Image.fromarray(band), (0, size - band_height))
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(rng.randint(1, 3)):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        side = rng.randrange(size // 6, size // 3)
        x, y = rng.randrange(0, size - side), rng.randrange(0, size - band_height - side)
        box = (x, y, x + side, y + side)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
        objects.append((color, shape))
    return image, objects


def pope_rows(num_samples: int = 8, image_size: int = 224, seed: int = 0) -> list[dict]:
    """POPE's columns (question_id, question, answer, image_source, image, category); answers alternate yes/no."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_samples):
        image, objects = _scene(rng, image_size)
        if i % 2 == 0:
            color, shape = rng.choice(objects)
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in objects]
            color, shape = rng.choice(absent)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append({
            "question_id": str(i),
            "question": f"Is there a {color} {shape} in the image?",
            "answer": "yes" if i % 2 == 0 else "no",
            "image_source": f"generated_{seed}_{i}",
            "image": {"bytes": buffer.getvalue(), "path": None},
            "category": CATEGORIES[i % len(CATEGORIES)],
        })
    return rows


def write_pope_parquet(path: str | Path, num_samples: int = 8, image_size: int = 224, seed: int = 0) -> Path:
    """Write the rows with `datasets` so the parquet carries its Image feature (docs then hold PIL images)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features({
        "question_id": Value("string"), "question": Value("string"), "answer": Value("string"),
        "image_source": Value("string"), "image": ImageFeature(), "category": Value("string"),
    })
    rows = pope_rows(num_samples, image_size, seed)
    dataset = Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="parquet file to write (the task reads apt_pope_local.parquet in the cwd)")
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_pope_parquet(args.output, args.num_samples, args.image_size, args.seed))


if __name__ == "__main__":
    main()
