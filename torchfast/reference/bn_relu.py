"""Fused BatchNorm + ReLU and BatchNorm + add + ReLU in pure PyTorch: the oracle for every other
backend, on any device/dtype.

Same contract as the compiled ops declared in csrc/ops.cpp: statistics in float32 (float64 for
float64 inputs), output in the input dtype and memory layout, the ReLU mask recomputed in the
backward from the saved input with the forward's own formula ``(x - mean) * scale + bias``
(bn_relu), or read from the saved output (bn_add_relu).
"""
import torch


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(x: torch.Tensor):
    return [0] + list(range(2, x.dim()))


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view([1, -1] + [1] * (x.dim() - 2))


def _normalize(x, mean, invstd, weight, bias):
    """(x - mean) * scale + bias with scale = weight * invstd: the kernels' formula (rather than
    x * scale + (bias - mean * scale), which loses |mean| / std times more to rounding)."""
    acc = mean.dtype
    scale = invstd * weight.to(acc) if weight is not None else invstd
    v = (x - _bcast(mean, x)) * _bcast(scale, x)
    return v + _bcast(bias.to(acc), x) if bias is not None else v


def _bcast_normalize(x, mean, invstd, weight, bias):
    """(x - mean) * invstd * weight + bias, each factor separately: differentiable in mean and invstd
    too (the double-backward path of torchfast._ops)."""
    y = (x - _bcast(mean, x)) * _bcast(invstd, x)
    if weight is not None:
        y = y * _bcast(weight.to(mean.dtype), x)
    return y + _bcast(bias.to(mean.dtype), x) if bias is not None else y


def _batch_or_running_stats(x, running_mean, running_var, training: bool, eps: float):
    """(mean, invstd, biased var) in x's dtype: the batch's in training (NaN for an empty batch,
    as stock), the running statistics in eval."""
    acc = x.dtype
    if training and x.numel() == 0:
        mean = torch.full((x.shape[1],), float("nan"), dtype=acc, device=x.device)
        var = mean.clone()
    elif training:
        var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
    else:
        mean = running_mean.to(acc, copy=True)
        var = running_var.to(acc, copy=True)
    return mean, torch.rsqrt(var + eps), var


def bn_relu_fwd(input, weight, bias, running_mean, running_var, training: bool, eps: float):
    acc = stat_dtype(input.dtype)
    x = input.to(acc)
    mean, invstd, var = _batch_or_running_stats(x, running_mean, running_var, training, eps)
    out = torch.relu(_normalize(x, mean, invstd, weight, bias)).to(input.dtype)
    return out, mean, invstd, var


def _bn_backward(gm, x, mean, invstd, weight, training: bool):
    """BatchNorm's backward from the ReLU-masked gradient gm (both in the statistics dtype):
    (dx, grad_weight, grad_bias). An empty batch gives zero parameter gradients, as stock does."""
    dims = _reduce_dims(x)
    xmu = x - _bcast(mean, x)
    sum_dy = gm.sum(dims)
    sum_dy_xmu = (gm * xmu).sum(dims)
    w = weight.to(mean.dtype) if weight is not None else torch.ones_like(mean)
    k0 = w * invstd
    if training and x.numel() > 0:
        m = x.numel() // x.size(1)
        dx = _bcast(k0, x) * (gm - _bcast(sum_dy / m, x) - xmu * _bcast(invstd * invstd * sum_dy_xmu / m, x))
    else:
        dx = gm * _bcast(k0, x)
    grad_w = sum_dy_xmu * invstd if x.numel() > 0 else torch.zeros_like(mean)
    return dx, grad_w, sum_dy


# The largest pre-ReLU value that rounds to 0 in each output dtype (round to nearest even: half the
# smallest subnormal ties to 0). bn_relu's recomputed mask is value > threshold, so exactly the
# elements whose stored output is positive receive a gradient, as with stock's output > 0.
MASK_THRESHOLD = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}


def relu_mask(input, weight, bias, mean, invstd):
    """The ReLU mask bn_relu's backward recomputes: (x - mean) * scale + bias > threshold(dtype)."""
    return _normalize(input.to(mean.dtype), mean, invstd, weight, bias) > MASK_THRESHOLD.get(input.dtype, 0.0)


def bn_relu_bwd(grad_out, input, weight, bias, mean, invstd, training: bool):
    acc = mean.dtype
    x = input.to(acc)
    g = grad_out.to(acc)
    gm = torch.where(relu_mask(input, weight, bias, mean, invstd), g, torch.zeros((), dtype=acc, device=g.device))
    dx, grad_w, grad_b = _bn_backward(gm, x, mean, invstd, weight, training)
    return dx.to(input.dtype), grad_w, grad_b


def bn_add_relu_fwd(input, residual, weight, bias, running_mean, running_var, training: bool, eps: float):
    """relu(batch_norm(input) + residual): the statistics of bn_relu_fwd, the residual added to
    (x - mean) * scale + bias in the statistics dtype before the ReLU, one rounding to the input dtype."""
    acc = stat_dtype(input.dtype)
    x = input.to(acc)
    mean, invstd, var = _batch_or_running_stats(x, running_mean, running_var, training, eps)
    v = _normalize(x, mean, invstd, weight, bias) + residual.to(acc)
    return torch.relu(v).to(input.dtype), mean, invstd, var


def bn_add_relu_bwd(grad_out, out, input, weight, mean, invstd, training: bool):
    """(grad_input, grad_residual, grad_weight, grad_bias). The ReLU mask is read from the saved
    output (out > 0), so it is exactly the forward's; grad_residual is the masked grad_out."""
    grad_res = torch.where(out > 0, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
    acc = mean.dtype
    x = input.to(acc)
    dx, grad_w, grad_b = _bn_backward(grad_res.to(acc), x, mean, invstd, weight, training)
    return dx.to(input.dtype), grad_res, grad_w, grad_b
