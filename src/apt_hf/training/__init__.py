"""The training toolkit every task builds on (tasks: `apt_hf.tasks.llava`, `apt_hf.tasks.classification`).

`trainer` (`AptTrainer`: skipped-sample counts in logs and checkpoints, layer-wise LR decay), `trainable` (trainable
parts and layer groups, from what the model class declares), `arguments` (YAML recipes + flags, the APT fields),
`checkpoints` (complete checkpoints, resume, output folders never silently reused), `data` (datasets sources, lazy
images, JSON records), `collator` (broken images skipped and counted, all-broken batches refilled), `hub` (hub
settings out of TrainingArguments, the final model published without pickles), `run` (logging, TrainingArguments
for APT, the final save), `report` (the run summary's pieces, the loss curve).
Needs the `train` extra: pip install 'apt-hf[train]'.
"""

from .arguments import AptArguments
from .collator import BROKEN_IMAGES, BrokenBatchFallback, ImageCollator
from .trainable import layer_decay_groups, select_parameters
from .trainer import AptTrainer, DropCounts

__all__ = ["AptArguments", "AptTrainer", "BROKEN_IMAGES", "BrokenBatchFallback", "DropCounts", "ImageCollator",
           "layer_decay_groups", "select_parameters"]
