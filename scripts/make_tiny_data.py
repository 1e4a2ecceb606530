#!/usr/bin/env python
"""Write the tiny CPU demo's inputs: a tiny random stock LLaVA and a generated LLaVA-format data set.

`finetune_llava.py --config recipes/tiny-cpu.yaml` does this itself (`tiny_demo: true`); this script is for
looking at the data or reusing it. Usage: python scripts/make_tiny_data.py [--out outputs/tiny_demo]
"""

import argparse
from pathlib import Path

from apt_hf.tasks.llava.data import make_tiny_dataset
from apt_hf.testing import save_tiny_llava, tiny_vision_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/tiny_demo", help="folder for model/, data.json and images/")
    parser.add_argument("--num_samples", type=int, default=48)
    args = parser.parse_args()
    out = Path(args.out)
    save_tiny_llava(out / "model", vision=tiny_vision_config(image_size=112))
    make_tiny_dataset(out / "data.json", out / "images", num_samples=args.num_samples)
    print(f"wrote {out / 'model'}, {out / 'data.json'} and {out / 'images'}")


if __name__ == "__main__":
    main()
