"""The paper's claims in miniature on a CPU: a stock ViT trained on photo crops, converted to APT, healed in one
epoch, and Table 7's embedding variants beside it (see `experiments/reproduce_mini.py`).

    python scripts/reproduce_mini.py --output_dir outputs/reproduce_mini [--seeds 0 1 2] [--help]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ lives there
from experiments.reproduce_mini import main  # noqa: E402

if __name__ == "__main__":
    main()
