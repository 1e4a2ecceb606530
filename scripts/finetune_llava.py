#!/usr/bin/env python
"""Fine-tune LLaVA with APT: `accelerate launch scripts/finetune_llava.py --config recipes/tiny-cpu.yaml`.

Every vision-language family apt_hf has: LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision checkpoints (stock ones are
converted on the fly, APT on every any-resolution tile), or their APT conversions.

Every flag of transformers' TrainingArguments plus --model_name_or_path, --data_path, --image_folder, the APT
fields, --vision_feature_layout, --trainable and --lora_r; see recipes/README.md.
"""

from apt_hf.tasks.llava.train import main

if __name__ == "__main__":
    main()
