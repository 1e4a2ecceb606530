"""The dtype names scripts, training arguments and benchmarks accept, and what each one means."""

import torch

# "auto": the checkpoint's own dtype (loading) or the mixed-precision flag's (training).
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
TORCH_DTYPES = {name: dtype for name, dtype in DTYPES.items() if name != "auto"}

__all__ = ["DTYPES", "TORCH_DTYPES"]
