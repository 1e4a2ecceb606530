"""Real photographs for demos, benchmarks and tests: the files bundled in scikit-image's wheel."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# Photographs shipped inside scikit-image's `data` folder (no network needed).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "camera.png", "coins.png", "moon.png")


def photo_folder() -> Path:
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("the sample photographs ship with scikit-image: pip install 'apt-hf[dev]'") from err
    return Path(skimage.data.__file__).parent


def load_photos(names: tuple[str, ...] = PHOTOS, mode: str | None = "RGB") -> dict[str, Image.Image]:
    """Return {stem: PIL image} (converted to `mode` unless it is None)."""
    folder = photo_folder()
    photos = {}
    for name in names:
        with Image.open(folder / name) as image:
            image.load()
            photos[Path(name).stem] = image.convert(mode) if mode else image.copy()
    return photos
