"""Multi-tensor norm and clip in pure PyTorch: the oracle for the other backends, any device/dtype.

Accepts every norm type torch.linalg.vector_norm does (including 0 and -inf), and complex tensors.
"""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def multi_tensor_norm(tensors, norm_type: float) -> torch.Tensor:
    acc = acc_dtype(tensors[0].dtype)
    norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc if not t.is_complex() else None).to(acc)
             for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def check_writable(tensors) -> None:
    """Refuse, with stock's error and before anything is written, a tensor whose elements share memory
    (an expanded gradient): in-place scaling cannot write it."""
    for t in tensors:
        if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
            raise RuntimeError("unsupported operation: more than one element of the written-to tensor refers to a "
                               "single memory location. Please clone() the tensor before performing the operation.")


def multi_tensor_clip_(tensors, total_norm: torch.Tensor, max_norm: float) -> None:
    check_writable(tensors)
    acc = acc_dtype(tensors[0].dtype)
    coef = torch.clamp(max_norm / (total_norm.to(acc) + 1e-6), max=1.0)
    with torch.no_grad():
        for t in tensors:
            t.copy_(t.to(acc) * coef if not t.is_complex() else t * coef)
