"""Triton kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1, which is how CI tests
them). One file per op: bn_relu.py, clip_grad.py, init.py. Importing this package imports triton;
torchfast does so only when the triton backend is first used.
"""
import os

import torch

# Under the interpreter (TRITON_INTERPRET=1, read by triton at import) kernels run on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPES = None  # filled lazily: torch dtype -> tl dtype


def tl_dtype(dtype: torch.dtype):
    global TL_DTYPES
    if TL_DTYPES is None:
        import triton.language as tl
        TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                     torch.float64: tl.float64}
    return TL_DTYPES[dtype]


def configs(gpu_configs, interpret_config):
    """Autotune configurations: the GPU list, or one small configuration under the interpreter
    (where every configuration would be run in Python). TORCHFAST_TRITON_AUTOTUNE=0 keeps only the
    first GPU configuration (the GPU check's test phase uses it to save compile time)."""
    if INTERPRET:
        return [interpret_config]
    if os.environ.get("TORCHFAST_TRITON_AUTOTUNE", "1") == "0":
        return gpu_configs[:1]
    return gpu_configs


def upload_table(rows, device, dtype=torch.int64):
    """A host-built table moved to `device` without making the host wait (pinned memory, non-blocking
    copy). Under the interpreter the table stays on the CPU."""
    t = torch.tensor(rows, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
