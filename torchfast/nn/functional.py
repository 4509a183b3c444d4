"""Functional form of the fused layers: ``batch_norm_relu`` == ``relu(F.batch_norm(...))`` and
``batch_norm_add_relu`` == ``relu(F.batch_norm(...) + residual)``."""
import torch
import torch.nn.functional as F
from torch import Tensor

import torch.autograd.forward_ad as _forward_ad

from torchfast import _backends, _ext
from torchfast._ops import impl

__all__ = ["batch_norm_relu", "batch_norm_add_relu"]


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# (A torch without the query: every call takes the checked path.)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
_update_op = torch.ops.torchfast.bn_update_running_stats_.default if _ext._C is not None else None


def _check_channel_vector(op: str, t, name: str, c: int, device):
    if not isinstance(t, Tensor):
        raise TypeError("%s: %s must be a Tensor or None, got %s" % (op, name, type(t).__name__))
    if t.numel() != c:
        raise RuntimeError("%s should contain %d elements not %d" % (name, c, t.numel()))
    if t.device != device:
        raise RuntimeError("%s: %s is on %s but input is on %s; expected all tensors on one device"
                           % (op, name, t.device, device))
    if not t.is_floating_point():
        raise TypeError("%s: %s must be floating point, got %s" % (op, name, t.dtype))


def _check_bn_args(op: str, input, running_mean, running_var, weight, bias, training: bool):
    # Written for a short per-call cost (every training step calls it once per layer): small layers
    # spent as long in these Python checks as in their kernels.
    if not isinstance(input, Tensor):
        raise TypeError("%s: input must be a Tensor, got %s" % (op, type(input).__name__))
    if input.dim() < 2:
        raise ValueError("%s: input must have shape (N, C, *) with at least 2 dimensions, "
                         "got shape %s" % (op, tuple(input.shape),))
    if not input.is_floating_point():
        # stock's error, in stock's order (F.batch_norm's own checks, then its kernel's NotImplementedError)
        F.batch_norm(input, running_mean, running_var, weight, bias, training)
        raise TypeError("%s: input must be a floating-point tensor (float16, bfloat16, float32 "
                        "or float64), got %s" % (op, input.dtype,))
    if torch.is_grad_enabled():  # stock's autograd kernel refuses these (before the shape checks)
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if isinstance(t, Tensor) and t.requires_grad:
                raise RuntimeError("The function 'native_batch_norm' is not differentiable with respect to "
                                   "argument '%s'. This input cannot have requires_grad True." % name)
    c = input.shape[1]
    device = input.device
    if running_mean is not None:
        _check_channel_vector(op, running_mean, "running_mean", c, device)
    if running_var is not None:
        _check_channel_vector(op, running_var, "running_var", c, device)
    if weight is not None:
        _check_channel_vector(op, weight, "weight", c, device)
    if bias is not None:
        _check_channel_vector(op, bias, "bias", c, device)
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training and c > 0 and input.numel() // c == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size %s"
                         % (input.size(),))


def _stock_semantics_needed(*tensors) -> bool:
    """True under forward-mode AD or a torch.func transform (grad, vmap, jvp, functional_call under
    grad): the fused ops have no forward-mode formula or batching rule, so the stock composition runs
    instead, with stock's results and errors, never a silent zero tangent. Not consulted while
    torch.compile traces (dynamo cannot trace the check; a compiled graph holds no dual tensors)."""
    if torch.compiler.is_compiling():
        return False
    if _forward_ad._current_level >= 0:
        return True
    for t in tensors:
        if t is not None and _is_functorch_wrapped(t):
            return True
    return False


_REDUCED = (torch.float16, torch.bfloat16)


def _whole_call_op(name: str, input):
    """The compiled whole-call op (torchfast::bn_relu / bn_add_relu) that serves this call with no
    Python-side checks, or None when the call must take the checked path: torch.compile tracing,
    forward-mode AD or a torch.func transform (which may need stock's composition), an input that is
    not a plain tensor, or a backend without that op (reference, Triton). The op refuses every
    argument F.batch_norm refuses; the callers then run the Python checks only to raise stock's error."""
    if (torch.compiler.is_compiling() or _forward_ad._current_level >= 0
            or _transforms_active() or not isinstance(input, Tensor)
            or _is_functorch_wrapped(input)):
        return None
    try:
        return getattr(impl(_backends.choose(name, input.device, input.dtype)), name)
    except _backends.BackendUnavailable:  # a forced backend that cannot serve this input: the checked path
        return None


def _call_unchecked(call, check_args):
    """call() (a whole-call op), its arguments unchecked in Python. When it refuses them,
    _check_bn_args(*check_args) raises stock's error for what stock refuses (without the op's error
    chained to it); anything else is the op's own error, raised as it is."""
    try:
        return call()
    except Exception:
        try:
            _check_bn_args(*check_args)
        except Exception as stock_error:
            raise stock_error from None
        raise


def _residual_fusable(input, residual) -> bool:
    """Whether residual adds to the normalised input elementwise in its dtype (else stock's composition:
    another shape broadcasts, another dtype promotes)."""
    return (isinstance(residual, Tensor) and residual.shape == input.shape and residual.dtype == input.dtype
            and residual.device == input.device)


def _kernel_dtypes(input, *params) -> bool:
    """The dtype combinations the fused kernels take, which are the ones stock accepts everywhere:
    every given parameter and running statistic in the input's dtype, or all of them float32 for a
    float16/bfloat16 input (mixed precision). Any other mix goes to stock's composition, which raises
    stock's error on the CPU ("mixed dtype (CPU): ...") and does whatever stock does elsewhere."""
    dt = input.dtype
    same = mixed = True
    for p in params:
        if p is not None:
            pdt = getattr(p, "dtype", None)  # not a tensor: no kernel; the checked path says what is wrong
            same = same and pdt == dt
            mixed = mixed and pdt == torch.float32
    return same or (mixed and dt in _REDUCED)


def _update_running_stats(input, running_mean, running_var, mean, var, training, momentum):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased variance, as stock."""
    if not training or (running_mean is None and running_var is None):
        return
    c = input.shape[1]
    n = input.numel() // c if c > 0 else 0
    if n == 0:
        return
    if _update_op is not None and not torch.compiler.is_compiling():
        _update_op(running_mean, running_var, mean, var, float(momentum), n)  # one call, in C++
        return
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
        if running_var is not None:
            running_var.mul_(1.0 - momentum).add_(var, alpha=momentum * n / max(n - 1, 1))


_NUMBER = (float, int)


def _plain_scalars(training, momentum, eps) -> bool:
    """training a bool, momentum and eps Python numbers, eps positive in training and non-negative
    otherwise: the scalars the fused ops are given. Anything else (a numpy or 0-dim tensor scalar, a
    string, None, a non-positive eps) goes to stock's composition, which gives stock's result or raises
    stock's error, in stock's order (F.batch_norm checks eps before the tensors' shapes)."""
    return (type(training) is bool and type(momentum) in _NUMBER and type(eps) in _NUMBER
            and (eps > 0 if training else eps >= 0))


def _momentum(training, momentum) -> float:
    """The momentum as the update reads it; only a training call reads it (as stock's)."""
    return float(momentum) if training else 0.0


def batch_norm_relu(input: Tensor, running_mean, running_var, weight=None, bias=None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``relu(torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training,
    momentum, eps))`` in one fused op, with the same argument order, defaults, running-statistics
    update (in place, when ``training`` and the running tensors are given) and errors.

    Backward recomputes the ReLU mask from the saved input: only the input and per-channel
    statistics are kept for it.
    """
    if not _plain_scalars(training, momentum, eps):
        return torch.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))
    op = _whole_call_op("bn_relu", input)
    if op is not None and _kernel_dtypes(input, running_mean, running_var, weight, bias):
        # one op (forward and update), its arguments checked in C++
        return _call_unchecked(lambda: op(input, weight, bias, running_mean, running_var, training,
                                          _momentum(training, momentum), float(eps)),
                               ("batch_norm_relu", input, running_mean, running_var, weight, bias, training))
    _check_bn_args("batch_norm_relu", input, running_mean, running_var, weight, bias, training)
    if (not _kernel_dtypes(input, running_mean, running_var, weight, bias)
            or _stock_semantics_needed(input, running_mean, running_var, weight, bias)):
        return torch.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))
    ops = impl(_backends.choose("bn_relu", input.device, input.dtype))
    if ops.bn_relu is not None and not torch.compiler.is_compiling():  # one op: forward and update
        return ops.bn_relu(input, weight, bias, running_mean, running_var, training,
                           _momentum(training, momentum), float(eps))
    out, mean, _invstd, var = ops.bn_relu_fwd(input, weight, bias, running_mean, running_var, training,
                                              float(eps))
    _update_running_stats(input, running_mean, running_var, mean, var, training, momentum)
    return out


def batch_norm_add_relu(input: Tensor, residual: Tensor, running_mean, running_var, weight=None, bias=None,
                        training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``relu(torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training,
    momentum, eps) + residual)`` in one fused op: the residual block's tail in ResNet-style networks.
    Same arguments, defaults, running-statistics update and errors as ``F.batch_norm``.

    ``residual`` may come in either layout. When it cannot be added elementwise in the input's dtype
    (another shape, which would broadcast, or another dtype, which would promote), the stock
    composition runs instead, so the result is always stock's.

    Backward keeps the output (its sign is the ReLU mask; in a network it is the next layer's saved
    input anyway), the input and per-channel statistics; it returns gradients for input, residual,
    weight and bias.
    """
    if not _plain_scalars(training, momentum, eps):
        return torch.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
                          + residual)
    op = _whole_call_op("bn_add_relu", input)
    if (op is not None and _residual_fusable(input, residual) and not _is_functorch_wrapped(residual)
            and _kernel_dtypes(input, running_mean, running_var, weight, bias)):
        return _call_unchecked(lambda: op(input, residual, weight, bias, running_mean, running_var, training,
                                          _momentum(training, momentum), float(eps)),
                               ("batch_norm_add_relu", input, running_mean, running_var, weight, bias, training))
    _check_bn_args("batch_norm_add_relu", input, running_mean, running_var, weight, bias, training)
    if (not _residual_fusable(input, residual) or not _kernel_dtypes(input, running_mean, running_var, weight, bias)
            or _stock_semantics_needed(input, residual, running_mean, running_var, weight, bias)):
        return torch.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
                          + residual)
    ops = impl(_backends.choose("bn_add_relu", input.device, input.dtype))
    if ops.bn_add_relu is not None and not torch.compiler.is_compiling():  # one op: forward and update
        return ops.bn_add_relu(input, residual, weight, bias, running_mean, running_var, training,
                               _momentum(training, momentum), float(eps))
    out, mean, _invstd, var = ops.bn_add_relu_fwd(input, residual, weight, bias, running_mean, running_var,
                                                  training, float(eps))
    _update_running_stats(input, running_mean, running_var, mean, var, training, momentum)
    return out
