"""Tasks on top of the training toolkit (`apt_hf.training`), one folder each; neither imports the other.

`llava`: fine-tune APT-LLaVA (`scripts/finetune_llava.py`). `classification`: fine-tune and evaluate APT-ViT image
classifiers (`scripts/finetune_vit.py`, `scripts/evaluate_vit.py`). Need the `train` extra.
"""
