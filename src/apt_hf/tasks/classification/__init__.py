"""Image classification with APT: fine-tune (`scripts/finetune_vit.py`) and evaluate (`scripts/evaluate_vit.py`) ViTs.

`arguments` (the script's flags), `data` (class folders / datasets, checked), `collator` (packed APT batches),
`model` (load / convert, trainable parts), `train` (`main`; the trainer with layer-wise LR decay), `evaluate`
(accuracy and images/s for several threshold settings in one run).
"""

from .arguments import ClassificationDataArguments, ClassificationModelArguments, parse_args
from .collator import AptImageClassificationCollator
from .data import ClassificationData, load_classification_data, make_photo_imagefolder
from .model import load_classifier, load_image_processor, setup_trainable

__all__ = [
    "AptImageClassificationCollator", "ClassificationData", "ClassificationDataArguments",
    "ClassificationModelArguments", "load_classification_data", "load_classifier", "load_image_processor",
    "make_photo_imagefolder", "parse_args", "setup_trainable",
]
