"""Test-suite settings shared by every test file."""

import importlib.util
import os

# Nothing is ever downloaded: tests build tiny models and use bundled photographs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# tests/eval runs lmms-eval, which lives in its own environment (it needs torchvision and a matching torch);
# .ci/run runs it there. The main environment does not collect it.
collect_ignore = [] if importlib.util.find_spec("lmms_eval") is not None else ["eval"]
