"""Draw the APT patch layout of one image as the model sees it (after the processor's resize and crop).

    python scripts/visualize_patches.py --input photo.jpg --output layout.png
    python scripts/visualize_patches.py --input astronaut --output fig1.png --compare      # bundled sample photo
    python scripts/visualize_patches.py --input photo.jpg --output out.png --num_scales 3 --thresholds 5.5 4.0
    python scripts/visualize_patches.py --input coffee --output entropy.png --vis_type entropy  # what is thresholded
    python scripts/visualize_patches.py --input photos/ --output sweep.png --sweep    # tokens kept vs threshold

The image goes through AptImageProcessor (resize shortest edge, centre crop, optional LLaVA pad-to-square),
so the drawing shows exactly the layout the vision tower receives; the pixels drawn on are rebuilt from the
processor's packed `pixel_values`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from apt_hf.image_processing_apt import AptImageProcessor
from apt_hf.patchify import SCORERS, default_thresholds
from apt_hf.plots import INSTALL_HINT, matplotlib_available, save_line_chart
from apt_hf.visualization import (
    add_header,
    draw_layout,
    entropy_heatmap,
    legend_entries,
    processed_images,
    side_by_side,
    split_layout,
    threshold_sweep,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="image file, or the name of a bundled sample photo (e.g. astronaut, coffee)")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--patch_size", type=int, default=14)
    parser.add_argument("--num_scales", type=int, default=2)
    parser.add_argument("--thresholds", type=float, nargs="*", default=None,
                        help="num_scales - 1 values (default: the scorer's; entropy: 5.75 for S=2, 5.5 4.0 for S=3)")
    parser.add_argument("--scorer", choices=SCORERS, default="entropy")
    parser.add_argument("--entropy_bins", type=int, default=512)
    parser.add_argument("--size", type=int, default=336, help="shortest edge after resize")
    parser.add_argument("--crop_size", type=int, default=336, help="centre crop side")
    parser.add_argument("--do_pad", action="store_true", help="LLaVA-1.5 pad-to-square before resizing")
    parser.add_argument("--compare", action="store_true", help="uniform grid and APT layout side by side")
    parser.add_argument("--upscale", type=int, default=1, help="enlarge the drawing by this integer factor")
    parser.add_argument("--line_width", type=int, default=1)
    parser.add_argument("--vis_type", choices=("grid", "entropy", "none"), default="grid",
                        help="grid: the token layout; entropy: each base patch's entropy as a heat-map (what the "
                             "thresholds compare against); none: the processed image alone")
    parser.add_argument("--sweep", action="store_true",
                        help="plot tokens kept against the threshold (every threshold shifted together) for the "
                             "image, or every image of a folder given as --input, to choose a threshold")
    args = parser.parse_args(argv)
    if args.thresholds is None:
        try:  # LLaVA-1.5's setting at 336/14 (the processor's defaults), else the paper's for the scorer
            args.thresholds = default_thresholds(args.num_scales, args.scorer, llava=True)
        except ValueError as err:
            parser.error(f"--{err}")
    return args


def load_images(name: str) -> list[Image.Image]:
    """Every image file of a folder, or the one image `name` names."""
    path = Path(name)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise SystemExit(f"--input: the folder {name} holds no .png / .jpg / .jpeg / .webp / .bmp images")
        return [load_image(str(p)) for p in files]
    return [load_image(name)]


def load_image(name: str) -> Image.Image:
    """Open a file, or fall back to a photo bundled with scikit-image by its stem."""
    path = Path(name)
    if path.exists():
        with Image.open(path) as image:
            image.load()
            return image.copy()
    from apt_hf.sample_images import PHOTOS, load_photos

    stems = {Path(p).stem: p for p in PHOTOS}
    if name in stems:
        return load_photos((stems[name],), mode=None)[name]
    raise SystemExit(f"--input: expected an image file or one of the sample photos {sorted(stems)}, got {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    processor = AptImageProcessor(
        size={"shortest_edge": args.size}, crop_size={"height": args.crop_size, "width": args.crop_size},
        do_pad=args.do_pad, patch_size=args.patch_size, num_scales=args.num_scales, thresholds=args.thresholds,
        scorer=args.scorer, entropy_bins=args.entropy_bins,
    )
    inputs = load_images(args.input) if args.sweep else [load_image(args.input)]
    batch = processor(inputs, return_tensors="pt")
    images = processed_images(
        batch,
        processor.image_mean if processor.do_normalize else None,
        processor.image_std if processor.do_normalize else None,
        processor.rescale_factor if processor.do_rescale else 1 / 255,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        return sweep(args, images, output)
    image = images[0]
    scales, positions = split_layout(batch)[0]
    rows, cols = batch["image_grid_hw"][0].tolist()
    kept, uniform = len(scales), rows * cols

    if args.vis_type == "entropy":
        figure = entropy_heatmap(image, args.patch_size, args.entropy_bins)
    elif args.vis_type == "none":
        figure = add_header([image], [f"as the model sees it: {image.width}x{image.height}"])
    elif args.compare:
        figure = side_by_side(image, scales, positions, args.patch_size, args.num_scales,
                              line_width=args.line_width, upscale=args.upscale)
    else:
        drawn = draw_layout(image, scales, positions, args.patch_size, line_width=args.line_width,
                            upscale=args.upscale)
        title = (f"APT {args.scorer} S={args.num_scales} {args.thresholds}: {kept} / {uniform} tokens "
                 f"({100 * kept / uniform:.0f}%)")
        figure = add_header([drawn], [title], [legend_entries(scales, args.num_scales, args.patch_size)])
    figure.save(output, format="PNG")
    per_scale = ", ".join(f"scale {s} ({args.patch_size << s}px): {scales.count(s)}" for s in range(args.num_scales))
    print(f"tokens kept: {kept} / uniform {uniform} ({100 * kept / uniform:.1f}%)")
    print(f"{per_scale}; wrote {output} ({figure.width}x{figure.height})")
    return 0


def sweep(args: argparse.Namespace, images: list[Image.Image], output: Path) -> int:
    """Tokens kept (% of the uniform grid) against the threshold, for the given images together."""
    if args.num_scales < 2:
        raise SystemExit("--sweep: needs --num_scales >= 2 (one scale merges nothing)")
    if not matplotlib_available():
        raise SystemExit(f"--sweep draws a chart with matplotlib: {INSTALL_HINT}")
    step = max(abs(args.thresholds[0]), 1.0) / 10
    offsets = [step * k - args.thresholds[0] for k in range(0, 21)]  # first threshold from 0 to 2x its value
    points = threshold_sweep(images, args.patch_size, args.num_scales, args.thresholds, offsets, args.scorer,
                             args.entropy_bins)
    save_line_chart(output, {f"{len(images)} image(s)": points},
                    f"APT {args.scorer} S={args.num_scales}: tokens kept vs threshold", "threshold (scale 1)", "% kept")
    for threshold, kept in points:
        print(f"threshold {threshold:.4g}: {kept:.1f}% of tokens kept")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
