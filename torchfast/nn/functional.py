"""Functional form of the fused layers: ``batch_norm_relu`` == ``relu(F.batch_norm(...))``."""
import torch
from torch import Tensor

from torchfast import _backends
from torchfast._ops import impl

__all__ = ["batch_norm_relu"]


def _check_channel_vector(t, name: str, c: int, input: Tensor):
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError("batch_norm_relu: %s must be a Tensor or None, got %s" % (name, type(t).__name__))
    if t.numel() != c:
        raise RuntimeError("%s should contain %d elements not %d" % (name, c, t.numel()))
    if t.device != input.device:
        raise RuntimeError("batch_norm_relu: %s is on %s but input is on %s; expected all tensors on one device"
                           % (name, t.device, input.device))
    if not t.is_floating_point():
        raise TypeError("batch_norm_relu: %s must be floating point, got %s" % (name, t.dtype))


def batch_norm_relu(input: Tensor, running_mean, running_var, weight=None, bias=None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``relu(torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training,
    momentum, eps))`` in one fused op, with the same argument order, defaults, running-statistics
    update (in place, when ``training`` and the running tensors are given) and errors.

    Backward recomputes the ReLU mask from the saved input: only the input and per-channel
    statistics are kept for it.
    """
    if not isinstance(input, Tensor):
        raise TypeError("batch_norm_relu: input must be a Tensor, got %s" % type(input).__name__)
    if input.dim() < 2:
        raise ValueError("batch_norm_relu: input must have shape (N, C, *) with at least 2 dimensions, "
                         "got shape %s" % (tuple(input.shape),))
    if not input.is_floating_point():
        raise TypeError("batch_norm_relu: input must be a floating-point tensor (float16, bfloat16, float32 "
                        "or float64), got %s" % (input.dtype,))
    c = input.shape[1]
    _check_channel_vector(running_mean, "running_mean", c, input)
    _check_channel_vector(running_var, "running_var", c, input)
    _check_channel_vector(weight, "weight", c, input)
    _check_channel_vector(bias, "bias", c, input)
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training:
        size_prods = input.numel() // c if c > 0 else 0
        if size_prods == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input size %s"
                             % (input.size(),))
    backend = _backends.choose("bn_relu", input.device, input.dtype)
    out, mean, _invstd, var = impl(backend).bn_relu_fwd(input, weight, bias, running_mean, running_var,
                                                         bool(training), float(eps))
    n = input.numel() // c if c > 0 else 0
    if training and n > 0 and (running_mean is not None or running_var is not None):
        with torch.no_grad():
            # running = (1 - momentum) * running + momentum * batch, with the unbiased variance.
            if running_mean is not None:
                running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
            if running_var is not None:
                running_var.mul_(1.0 - momentum).add_(var, alpha=momentum * n / max(n - 1, 1))
    return out
