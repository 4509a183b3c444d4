"""The op layer: fake kernels and autograd for the compiled ops, the reference backend wrapped as ops
with the same contract, and the table the public API uses to reach each backend's implementation.

Compiled ops (schemas in csrc/schemas.h)     Reference ops (defined here)
  torchfast::bn_relu_fwd / bn_relu_bwd          torchfast::bn_relu_fwd_reference / _bwd_reference
  torchfast::bn_add_relu_fwd / _bwd             torchfast::bn_add_relu_fwd_reference / _bwd_reference
  torchfast::multi_tensor_norm                  plain Python (torchfast.reference.clip_grad)
  torchfast::multi_tensor_clip_                 plain Python
  torchfast::philox_fill_                       plain Python (torchfast.reference.philox)
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from torchfast import _ext
from torchfast.reference import bn_relu as ref_bn_relu
from torchfast.reference import clip_grad as ref_clip_grad
from torchfast.reference import philox as ref_philox


# --------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and layouts only, shared by the compiled and reference ops.

def _fake_bn_relu_fwd(input, weight, bias, running_mean, running_var, training, eps):
    acc = ref_bn_relu.stat_dtype(input.dtype)
    c = input.shape[1]
    return (torch.empty_like(input), input.new_empty((c,), dtype=acc), input.new_empty((c,), dtype=acc),
            input.new_empty((c,), dtype=acc))


def _fake_bn_relu_bwd(grad_out, input, weight, bias, mean, invstd, training):
    c = input.shape[1]
    return torch.empty_like(input), mean.new_empty((c,)), mean.new_empty((c,))


def _fake_bn_add_relu_fwd(input, residual, weight, bias, running_mean, running_var, training, eps):
    return _fake_bn_relu_fwd(input, weight, bias, running_mean, running_var, training, eps)


def _fake_bn_add_relu_bwd(grad_out, out, input, weight, mean, invstd, training):
    c = input.shape[1]
    return torch.empty_like(input), torch.empty_like(input), mean.new_empty((c,)), mean.new_empty((c,))


# --------------------------------------------------------------------------------------------
# Autograd: forward saves the input and the per-channel statistics (plus the parameters), nothing
# full-size besides the input; backward recomputes the ReLU mask from them.

def _composite_bn_backward(gm, input, weight, bias, mean, invstd, training, eps, needs):
    """BatchNorm's backward from the ReLU-masked gradient gm, written with differentiable torch ops:
    the double-backward path (backward under create_graph=True, e.g. gradient penalties). In training
    the statistics are recomputed from the input, so their dependence on it is differentiated too.
    Returns (grad_input, grad_weight, grad_bias) for the entries of `needs`."""
    acc = mean.dtype
    x = input.to(acc)
    if training and input.numel() > 0:
        var, mu = torch.var_mean(x, dim=ref_bn_relu._reduce_dims(x), correction=0)
        inv = torch.rsqrt(var + eps)
    else:
        mu, inv = mean, invstd
    y = ref_bn_relu._bcast_normalize(x, mu, inv, weight, bias)
    wrt = [t for t, need in zip((input, weight, bias), needs) if need]
    grads = iter(torch.autograd.grad(y, wrt, gm.to(acc), create_graph=True, allow_unused=True) if wrt else ())
    return tuple(next(grads) if need else None for need in needs)


def bn_relu_double_backward(grad_out, input, weight, bias, mean, invstd, training, eps, needs):
    """bn_relu's backward with differentiable torch ops (create_graph=True). Returns (grad_input in the
    input's dtype, grad_weight, grad_bias in the statistics dtype), None where `needs` is False."""
    need_in, need_w, need_b = needs
    with torch.no_grad():
        mask = ref_bn_relu.relu_mask(input, weight, bias, mean, invstd)
    gm = torch.where(mask, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
    grad_in, grad_w, grad_b = _composite_bn_backward(gm, input, weight, bias, mean, invstd, training, eps, needs)
    return grad_in.to(input.dtype) if need_in else None, grad_w, grad_b


def bn_add_relu_double_backward(grad_out, out, input, weight, mean, invstd, training, eps, needs):
    """bn_add_relu's backward with differentiable torch ops (create_graph=True). Returns (grad_input,
    grad_residual, grad_weight, grad_bias in the statistics dtype), None where `needs` is False."""
    need_in, need_res, need_w, need_b = needs
    grad_res = torch.where(out.detach() > 0, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
    # The bias only shifts the output: its gradient is sum(gm), whatever the bias is.
    grad_in, grad_w, _ = _composite_bn_backward(grad_res, input, weight, None, mean, invstd, training, eps,
                                                (need_in, need_w, False))
    grad_b = grad_res.to(mean.dtype).sum(ref_bn_relu._reduce_dims(input)) if need_b else None
    return grad_in.to(input.dtype) if need_in else None, grad_res if need_res else None, grad_w, grad_b


def _cast(t, dtype):
    return t.to(dtype) if t is not None else None


def _make_autograd(bwd_op):
    """Python autograd for a bn_relu op pair (the reference, Triton and emulator ops; the compiled
    torchfast ops have the same formulas in C++, csrc/autograd.cpp)."""
    def setup_context(ctx, inputs, output):
        input, weight, bias, _rm, _rv, training, eps = inputs
        _out, mean, invstd, _var = output
        ctx.save_for_backward(input, weight, bias, mean, invstd)
        ctx.training = training
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd, _var)

    def backward(ctx, grad_out, _g_mean, _g_invstd, _g_var):
        input, weight, bias, mean, invstd = ctx.saved_tensors
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            grad_in, grad_w, grad_b = bn_relu_double_backward(grad_out, input, weight, bias, mean, invstd,
                                                              ctx.training, ctx.eps, (need_in, need_w, need_b))
        else:
            grad_in, grad_w, grad_b = bwd_op(grad_out, input, weight, bias, mean, invstd, ctx.training)
        return (grad_in if need_in else None,
                _cast(grad_w, weight.dtype) if need_w else None,
                _cast(grad_b, bias.dtype) if need_b else None,
                None, None, None, None)

    return backward, setup_context


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("torchfast: double backward through batch_norm_relu is not supported")


def _make_add_autograd(bwd_op):
    """bn_add_relu: saves the output (the ReLU mask, exactly the forward's; in a network the output is
    the next layer's saved input anyway), the input and the per-channel statistics."""
    def setup_context(ctx, inputs, output):
        input, _residual, weight, _bias, _rm, _rv, training, eps = inputs
        out, mean, invstd, var = output
        ctx.save_for_backward(out, input, weight, mean, invstd)
        ctx.training = training
        ctx.eps = eps
        ctx.param_dtypes = (weight.dtype if weight is not None else None,
                            _bias.dtype if _bias is not None else None)
        ctx.mark_non_differentiable(mean, invstd, var)

    def backward(ctx, grad_out, _g_mean, _g_invstd, _g_var):
        out, input, weight, mean, invstd = ctx.saved_tensors
        need_in, need_res, need_w, need_b = ctx.needs_input_grad[:4]
        w_dtype, b_dtype = ctx.param_dtypes
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            grads = bn_add_relu_double_backward(grad_out, out, input, weight, mean, invstd, ctx.training, ctx.eps,
                                                (need_in, need_res, need_w, need_b))
        else:
            grads = bwd_op(grad_out, out, input, weight, mean, invstd, ctx.training)
        grad_in, grad_res, grad_w, grad_b = grads
        return (grad_in if need_in else None,
                grad_res if need_res else None,
                _cast(grad_w, w_dtype) if need_w else None,
                _cast(grad_b, b_dtype) if need_b else None,
                None, None, None, None)

    return backward, setup_context


def _register_bn_add_relu(fwd_name: str, bwd_name: str, bwd_op, fake: bool = True, python_autograd: bool = True):
    """As _register_bn_relu, for a pair with the bn_add_relu_fwd / bn_add_relu_bwd contract."""
    _register(fwd_name, bwd_name, _make_add_autograd(bwd_op), _fake_bn_add_relu_fwd, _fake_bn_add_relu_bwd, fake,
              python_autograd)


def _register(fwd_name, bwd_name, autograd, fake_fwd, fake_bwd, fake, python_autograd):
    if fake:
        torch.library.register_fake(fwd_name)(fake_fwd)
        torch.library.register_fake(bwd_name)(fake_bwd)
    backward, setup_context = autograd
    if python_autograd:  # otherwise the forward's autograd is registered in C++ (csrc/autograd.cpp)
        torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    torch.library.register_autograd(bwd_name, _no_double_backward)


def _register_bn_relu(fwd_name: str, bwd_name: str, bwd_op, fake: bool = True, python_autograd: bool = True):
    """Fake kernels (unless the op derives its own, as triton_op does) and autograd for a
    forward/backward pair with the bn_relu_fwd / bn_relu_bwd contract."""
    _register(fwd_name, bwd_name, _make_autograd(bwd_op), _fake_bn_relu_fwd, _fake_bn_relu_bwd, fake,
              python_autograd)


# --------------------------------------------------------------------------------------------
# Reference backend as ops (any device, any floating dtype).

@torch.library.custom_op("torchfast::bn_relu_fwd_reference", mutates_args=())
def bn_relu_fwd_reference(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                          eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return ref_bn_relu.bn_relu_fwd(input, weight, bias, running_mean, running_var, training, eps)


@torch.library.custom_op("torchfast::bn_relu_bwd_reference", mutates_args=())
def bn_relu_bwd_reference(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          mean: Tensor, invstd: Tensor, training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return ref_bn_relu.bn_relu_bwd(grad_out, input, weight, bias, mean, invstd, training)


_register_bn_relu("torchfast::bn_relu_fwd_reference", "torchfast::bn_relu_bwd_reference", bn_relu_bwd_reference)


@torch.library.custom_op("torchfast::bn_add_relu_fwd_reference", mutates_args=())
def bn_add_relu_fwd_reference(input: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                              eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return ref_bn_relu.bn_add_relu_fwd(input, residual, weight, bias, running_mean, running_var, training, eps)


@torch.library.custom_op("torchfast::bn_add_relu_bwd_reference", mutates_args=())
def bn_add_relu_bwd_reference(grad_out: Tensor, out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor,
                              invstd: Tensor, training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return ref_bn_relu.bn_add_relu_bwd(grad_out, out, input, weight, mean, invstd, training)


_register_bn_add_relu("torchfast::bn_add_relu_fwd_reference", "torchfast::bn_add_relu_bwd_reference",
                      bn_add_relu_bwd_reference)


# --------------------------------------------------------------------------------------------
# Compiled ops (present only when torchfast._C loaded).

if _ext._C is not None:
    _register_bn_relu("torchfast::bn_relu_fwd", "torchfast::bn_relu_bwd", torch.ops.torchfast.bn_relu_bwd,
                      python_autograd=False)
    _register_bn_add_relu("torchfast::bn_add_relu_fwd", "torchfast::bn_add_relu_bwd",
                          torch.ops.torchfast.bn_add_relu_bwd, python_autograd=False)

    # The differentiable backward the C++ autograd (csrc/autograd.cpp) calls under create_graph=True:
    # the formulas above as composite ops (unneeded gradients come back as empty tensors).
    _LIB = torch.library.Library("torchfast", "FRAGMENT")
    _LIB.define("bn_relu_double_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
                "Tensor invstd, bool training, float eps, bool need_input, bool need_weight, bool need_bias) -> Tensor[]")
    _LIB.define("bn_add_relu_double_backward(Tensor grad_out, Tensor out, Tensor input, Tensor? weight, Tensor mean, "
                "Tensor invstd, bool training, float eps, bool need_input, bool need_residual, bool need_weight, "
                "bool need_bias) -> Tensor[]")

    def _listed(grads, like):
        return [g if g is not None else like.new_empty((0,)) for g in grads]

    def _bn_relu_double_backward_op(grad_out, input, weight, bias, mean, invstd, training, eps, *needs):
        return _listed(bn_relu_double_backward(grad_out, input, weight, bias, mean, invstd, training, eps, needs),
                       mean)

    def _bn_add_relu_double_backward_op(grad_out, out, input, weight, mean, invstd, training, eps, *needs):
        return _listed(bn_add_relu_double_backward(grad_out, out, input, weight, mean, invstd, training, eps,
                                                   needs), mean)

    _LIB.impl("bn_relu_double_backward", _bn_relu_double_backward_op, "CompositeImplicitAutograd")
    _LIB.impl("bn_add_relu_double_backward", _bn_add_relu_double_backward_op, "CompositeImplicitAutograd")

    @torch.library.register_fake("torchfast::bn_update_running_stats_")
    def _fake_bn_update_running_stats_(running_mean, running_var, mean, var, momentum, count) -> None:
        return None

    @torch.library.register_fake("torchfast::multi_tensor_norm")
    def _fake_multi_tensor_norm(tensors: List[Tensor], norm_type: float) -> Tensor:
        return tensors[0].new_empty((), dtype=ref_clip_grad.acc_dtype(tensors[0].dtype))

    @torch.library.register_fake("torchfast::multi_tensor_clip_")
    def _fake_multi_tensor_clip_(tensors, total_norm, max_norm) -> None:
        return None

    @torch.library.register_fake("torchfast::clip_grad_norm_fused_")
    def _fake_clip_grad_norm_fused_(tensors, max_norm, norm_type):
        return tensors[0].new_empty((), dtype=ref_clip_grad.acc_dtype(tensors[0].dtype))

    @torch.library.register_fake("torchfast::philox_fill_")
    def _fake_philox_fill_(tensors, seed, streams, kinds, params) -> None:
        return None


class _Impl:
    """One backend's implementations, under the names the public API calls."""

    def __init__(self, bn_relu_fwd, bn_add_relu_fwd, multi_tensor_norm, multi_tensor_clip_, philox_fill_,
                 bn_relu=None, bn_add_relu=None):
        self.bn_relu_fwd = bn_relu_fwd
        self.bn_add_relu_fwd = bn_add_relu_fwd
        # The whole eager functional call (forward and running-statistics update) in one op, where the
        # backend has one (the compiled ops; see csrc/schemas.h); None elsewhere.
        self.bn_relu = bn_relu
        self.bn_add_relu = bn_add_relu
        self.multi_tensor_norm = multi_tensor_norm
        self.multi_tensor_clip_ = multi_tensor_clip_
        self.philox_fill_ = philox_fill_


def _compiled_impl():
    ops = torch.ops.torchfast
    # The overloads themselves: calling an OpOverloadPacket resolves the overload on every call.
    return _Impl(ops.bn_relu_fwd.default, ops.bn_add_relu_fwd.default, ops.multi_tensor_norm,
                 ops.multi_tensor_clip_, ops.philox_fill_, ops.bn_relu.default, ops.bn_add_relu.default)


IMPLS = {
    "reference": _Impl(bn_relu_fwd_reference, bn_add_relu_fwd_reference, ref_clip_grad.multi_tensor_norm,
                       ref_clip_grad.multi_tensor_clip_, ref_philox.philox_fill_),
}
if _ext._C is not None:
    # The dispatcher routes torch.ops.torchfast.* by device, so "cpu" and "cuda" share one table.
    IMPLS["cpu"] = IMPLS["cuda"] = _compiled_impl()


def impl(backend: str) -> _Impl:
    """The implementations of `backend`; the Triton kernels are imported on first use, so that
    `import torchfast` never imports triton (and TRITON_INTERPRET can still be set before it)."""
    if backend == "triton" and "triton" not in IMPLS:
        from torchfast.triton import bn_relu, clip_grad, init
        IMPLS["triton"] = _Impl(bn_relu.bn_relu_fwd, getattr(bn_relu, "bn_add_relu_fwd", None),
                                clip_grad.multi_tensor_norm, clip_grad.multi_tensor_clip_, init.philox_fill_)
    return IMPLS[backend]
