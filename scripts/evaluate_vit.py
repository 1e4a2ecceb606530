#!/usr/bin/env python
"""Top-1, top-5, images/s and tokens per image of a (APT-)ViT classifier at several threshold settings, one run.

    python scripts/evaluate_vit.py --model_name_or_path outputs/vit-b16-384-apt-heal --data_path imagenet/val \\
        --output_dir outputs/eval-vit-b16-384 [--thresholds -1 5.5 6.0] [--sweep 4.0 7.0 0.5]

Writes OUT/results.json, OUT/results.md and OUT/accuracy_vs_speed.png; see `--help`.
"""

import sys

from apt_hf.tasks.classification.evaluate import main

if __name__ == "__main__":
    main(sys.argv[1:])
