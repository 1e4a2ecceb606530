"""Table 5 (semantic segmentation) in miniature on a CPU: UperNet on a DINOv2-shaped ViT trained on shapes painted
onto photographs, converted to APT, healed in one epoch, at two resolutions (see `experiments/segmentation_mini.py`).

    python scripts/segmentation_mini.py --output_dir outputs/segmentation_mini [--seeds 0 1 2] [--toy] [--help]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ lives there
from experiments.segmentation_mini import main  # noqa: E402

if __name__ == "__main__":
    main()
