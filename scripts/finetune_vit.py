#!/usr/bin/env python
"""Fine-tune (heal) a ViT with APT: `accelerate launch scripts/finetune_vit.py --config recipes/vit-tiny-cpu.yaml`.

Every flag of transformers' TrainingArguments plus --model_name_or_path, --data_path, --eval_data_path,
--image_column, --label_column, the APT fields, --trainable, --layer_decay, --ignore_mismatched_sizes and --augment;
see recipes/README.md.
"""

from apt_hf.tasks.classification.train import main

if __name__ == "__main__":
    main()
