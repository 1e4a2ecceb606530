"""The paper's claims in miniature on a CPU: a stock ViT trained on photo crops, converted to APT, healed in one
epoch, and Table 7's embedding variants beside it (see `apt_hf.reproduce_mini`).

    python scripts/reproduce_mini.py --output_dir outputs/reproduce_mini [--seeds 0 1 2] [--help]
"""

from apt_hf.reproduce_mini import main

if __name__ == "__main__":
    main()
