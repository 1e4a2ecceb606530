"""Image-classification data: a folder of class folders or a `datasets` data set, checked before any model loads.

A folder is read as torchvision's `ImageFolder` reads it (``root/<class>/**/<image>``, class ids in sorted name
order), which is the layout of ImageNet's train/ and val/ folders and the order the Hub's ImageNet heads use. It
is listed here rather than through `datasets`' imagefolder builder so that an empty class folder is an error (it
would otherwise vanish and shift every later class id) and so that no cache is built for a million files. Any
other source goes through `datasets` (`load_from_disk`, a data file, a hub id). Images stay as references
({"path", "bytes"}) until the collator opens them, so an unreadable file costs one skipped sample, not the run.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...training.data import DATA_FILE_FORMATS, is_saved_dataset, lazy_images, load_datasets_source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
SPLIT_FOLDER_NAMES = {"train", "val", "valid", "validation", "test"}

logger = logging.getLogger(__name__)


@dataclass
class ClassificationData:
    """A loaded split: rows with a lazy image column and an integer label column, and the class names."""

    dataset: Any  # datasets.Dataset
    class_names: list[str]
    image_column: str
    label_column: str
    source: str

    def __len__(self) -> int:
        return len(self.dataset)


# --------------------------------------------------------------------------------------------- class folders


def _has_data_files(path: Path) -> bool:
    return any(p.suffix in DATA_FILE_FORMATS for p in path.iterdir() if p.is_file())


def _class_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_under(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def load_image_folder(root: str | Path, image_column: str = "image", label_column: str = "label",
                      class_names: Sequence[str] | None = None, argument: str = "data_path") -> ClassificationData:
    """``root/<class>/**/<image>`` as a data set; `class_names` (an eval split) fixes the ids to the training ones."""
    from datasets import ClassLabel, Dataset, Features, Image

    root = Path(root).expanduser().absolute()  # absolute paths: the rows stay valid from any working directory
    folders = _class_folders(root)
    if not folders:
        raise ValueError(f"{argument}: expected a folder of class folders (root/<class name>/<image>), {root} has no "
                         "sub-folders")
    names = [f.name for f in folders]
    if set(names) <= SPLIT_FOLDER_NAMES and all(_class_folders(f) for f in folders):
        raise ValueError(f"{argument}: {root} holds split folders ({', '.join(names)}), not class folders; pass "
                         f"{root / names[0]} as --{argument} (and the evaluation split as --eval_data_path)")
    classes = list(class_names) if class_names is not None else names
    index = {name: i for i, name in enumerate(classes)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ValueError(f"{argument}: class folder(s) {unknown[:5]} of {root} are not classes of the training data "
                         f"(which has {len(classes)}: {classes[:5]}...); evaluation data must use the same class names")
    paths: list[str] = []
    labels: list[int] = []
    for folder in folders:
        images = _images_under(folder)
        if not images:
            raise ValueError(f"{argument}: class folder {folder} has no images (expected files ending in "
                             f"{', '.join(IMAGE_EXTENSIONS[:4])}, ...); remove the folder or add its images: an empty "
                             "class would silently shift the ids of every class after it")
        paths += images
        labels += [index[folder.name]] * len(images)
    features = Features({image_column: Image(decode=False), label_column: ClassLabel(names=classes)})
    dataset = Dataset.from_dict({image_column: paths, label_column: labels}, features=features)
    return ClassificationData(dataset, classes, image_column, label_column, str(root))


# --------------------------------------------------------------------------------------------- datasets


def _class_names(ds: Any, label_column: str, source: str) -> tuple[Any, list[str]]:
    """(dataset with integer labels, class names) from a ClassLabel, integer or string label column."""
    from datasets import ClassLabel, Value

    feature = ds.features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    elif isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        top = max(ds[label_column], default=-1)
        names = [str(i) for i in range(top + 1)]
    elif isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        ds = ds.class_encode_column(label_column)  # sorted unique strings -> ids
        names = list(ds.features[label_column].names)
    else:
        raise ValueError(f"label_column: expected class ids (ClassLabel or integers) or class names (strings) in "
                         f"column {label_column!r} of {source}, got {feature}")
    if ds.num_rows and min(ds[label_column]) < 0:
        raise ValueError(f"label_column: column {label_column!r} of {source} has negative labels (unlabelled rows, "
                         "as in a test split); pick a labelled split with --dataset_split / --eval_split")
    return ds, names


def load_classification_data(
    data_path: str | None,
    image_column: str = "image",
    label_column: str = "label",
    split: str = "train",
    config: str | None = None,
    max_samples: int | None = None,
    seed: int = 42,
    class_names: Sequence[str] | None = None,
    argument: str = "data_path",
) -> ClassificationData:
    """Load, check and subsample one split; every bad input raises a ValueError here, before the model loads.

    `class_names`: the training split's, for an evaluation split (its class ids must mean the same classes).
    `max_samples`: a seeded random subset of that many rows.
    """
    if not data_path:
        raise ValueError(f"{argument}: expected a folder of class folders or a datasets id/path, got nothing")
    path = Path(data_path).expanduser()
    if path.is_dir() and not is_saved_dataset(path) and not _has_data_files(path) and _class_folders(path):
        data = load_image_folder(path, image_column, label_column, class_names, argument)
    else:
        ds = load_datasets_source(data_path, split, config, argument)
        columns = list(ds.column_names)
        if image_column not in columns:
            raise ValueError(f"image_column: expected a column named {image_column!r} holding the images in "
                             f"{data_path!r}, got columns {columns}; pass --image_column")
        if label_column not in columns:
            raise ValueError(f"label_column: expected a label column named {label_column!r} in {data_path!r}, got "
                             f"columns {columns}; pass --label_column")
        ds, names = _class_names(ds, label_column, repr(data_path))
        if class_names is not None:
            if names != list(class_names[: len(names)]) or len(names) > len(class_names):
                raise ValueError(f"{argument}: its classes {names[:5]}... ({len(names)}) are not those of the "
                                 f"training data {list(class_names)[:5]}... ({len(class_names)}); both splits must use "
                                 "the same class ids")
            names = list(class_names)
        data = ClassificationData(lazy_images(ds, [image_column]), names, image_column, label_column, data_path)
    if len(data.dataset) == 0:
        raise ValueError(f"{argument}: {data_path!r} has no samples")
    if max_samples is not None and max_samples < len(data.dataset):
        if max_samples < 1:
            raise ValueError(f"max_samples: expected a positive int, got {max_samples}")
        indices = np.random.default_rng(seed).permutation(len(data.dataset))[:max_samples]
        data.dataset = data.dataset.select(sorted(indices.tolist()))  # sorted: sequential reads
    return data


# --------------------------------------------------------------------------------------------- image sizes


def _image_size(ref: Any) -> tuple[int, int] | None:
    """(height, width) from the file header (no decoding); None when it cannot be read."""
    from PIL import Image

    try:
        if isinstance(ref, Image.Image):
            width, height = ref.size
        elif isinstance(ref, dict) and ref.get("bytes") is not None:
            with Image.open(io.BytesIO(ref["bytes"])) as image:
                width, height = image.size
        else:
            where = ref.get("path") if isinstance(ref, dict) else ref
            with Image.open(where) as image:
                width, height = image.size
    except (OSError, ValueError, TypeError):
        return None
    return height, width


def check_image_sizes(data: ClassificationData, processor: Any, model_size: tuple[int, int], probe: int = 64,
                      argument: str = "data_path") -> None:
    """Refuse data whose image sizes the model cannot take: the processor keeps sizes and they differ from the
    size the position embeddings were trained for. Checked on the first `probe` images' headers."""
    if getattr(processor, "do_resize", True) or getattr(processor, "do_center_crop", False) \
            or getattr(processor, "do_pad", False):
        return  # every image reaches the model at the processor's size
    sizes = {}
    refs = data.dataset.select(range(min(probe, len(data.dataset))))[data.image_column]
    for ref in refs:
        size = _image_size(ref)
        if size is not None:
            sizes[size] = sizes.get(size, 0) + 1
    other = sorted(s for s in sizes if s != tuple(model_size))
    if other:
        shown = ", ".join(f"{h}x{w} ({sizes[(h, w)]})" for h, w in sorted(sizes)[:6])
        raise ValueError(
            f"{argument}: images of mixed sizes ({shown} among the first {sum(sizes.values())}), but the processor "
            f"does not resize (do_resize=False) and the model's position embeddings are for "
            f"{model_size[0]}x{model_size[1]}; set do_resize=true with size {{'height': {model_size[0]}, 'width': "
            f"{model_size[1]}}} in the checkpoint's preprocessor_config.json, or resize the images")


# --------------------------------------------------------------------------------------------- tiny photo task

TINY_CLASSES = ("astronaut", "chelsea", "coffee", "rocket")


def make_photo_imagefolder(root: str | Path, images_per_class: int = 6, classes: Sequence[str] = TINY_CLASSES,
                           seed: int = 0, min_side: int = 48, max_side: int = 160) -> Path:
    """Write ``root/<photo>/<i>.png``: random crops (varied sizes) of scikit-image's bundled photographs.

    The class is "which photograph the crop comes from": a real-image task that needs nothing downloaded, for
    the CPU recipe and the tests.
    """
    from ...sample_images import PHOTOS, load_photos

    files = {Path(name).stem: name for name in PHOTOS}
    missing = [c for c in classes if c not in files]
    if missing:
        raise ValueError(f"classes: expected names of bundled photographs {sorted(files)}, got {missing}")
    photos = load_photos(tuple(files[c] for c in classes))
    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in classes:
        photo = photos[name]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            side = int(rng.integers(min_side, min(max_side, *photo.size) + 1))
            left = int(rng.integers(0, photo.width - side + 1))
            top = int(rng.integers(0, photo.height - side + 1))
            photo.crop((left, top, left + side, top + side)).save(root / name / f"{i:03d}.png")
    return root


__all__ = ["ClassificationData", "IMAGE_EXTENSIONS", "TINY_CLASSES", "check_image_sizes", "load_classification_data",
           "load_image_folder", "make_photo_imagefolder"]
