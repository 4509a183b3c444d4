"""Fused gradient clipping: drop-ins for the torch.nn.utils functions of the same names.

Per (device, dtype) group of gradients: one multi-tensor kernel computes the group's norm and one
scales the group, the clip coefficient computed on the device from the total norm, so nothing
waits for the host unless ``error_if_nonfinite=True`` (which must read the norm to raise).

Differences from stock, all in the rounding: the norm of a group is accumulated in float32
(float64 for float64 gradients) before it is cast to the gradients' dtype, and the clip coefficient
is computed in float32 (float64) rather than in the dtype of ``total_norm``. The ``foreach``
argument is accepted for compatibility; torchfast always uses its multi-tensor kernels.
"""
import types
import warnings

import torch
from torch import Tensor

from torchfast import _backends
from torchfast._ops import impl

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_", "get_total_norm"]


def _as_list(tensors):
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def _check_dense(tensors, fname: str, what: str):
    """Python-side validation, for the reference backend (the compiled ops check in C++)."""
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError("torchfast.%s: %s %d is a %s, expected a Tensor" % (fname, what, i, type(t).__name__))
        if t.layout != torch.strided:
            raise RuntimeError("torchfast.%s: %s %d has layout %s; sparse gradients are not supported, "
                               "use torch.nn.utils.%s for them" % (fname, what, i, t.layout, fname))
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError("torchfast.%s: %s %d has dtype %s, expected a floating-point tensor"
                            % (fname, what, i, t.dtype))


def _group(tensors, fname: str, what: str):
    """[((device, dtype), [tensors])] in order of first appearance (grouped in C++: a Python loop
    over thousands of small gradients would cost more than the kernels)."""
    try:
        grouped = torch._C._group_tensors_by_device_and_dtype([tensors], False)
    except (TypeError, RuntimeError):
        _check_dense(tensors, fname, what)  # names the offending entry
        raise
    return [(key, lists[0]) for key, (lists, _indices) in grouped.items()]


def _grads(parameters):
    return [p.grad for p in parameters if p.grad is not None]


def _backend_for(device, dtype, norm_type, tensors, fname, what):
    backend = _backends.choose("clip_grad", device, dtype, norm_type)
    if backend == "reference":
        _check_dense(tensors, fname, what)
    return backend


def _total_norm(groups, norm_type: float, first_device, fname: str) -> Tensor:
    norms = []
    for (device, dtype), group in groups:
        backend = _backend_for(device, dtype, norm_type, group, fname, "tensor")
        try:
            norm = impl(backend).multi_tensor_norm(group, norm_type)
        except NotImplementedError:  # no kernel for this layout: say which tensor, and why
            _check_dense(group, fname, "tensor")
            raise
        norms.append(norm.to(dtype.to_real()))
    if len(norms) == 1:
        return norms[0].to(first_device)
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)


def _single_group_norm(grads, norm_type: float):
    """The usual case, all gradients on one device in one dtype and a compiled backend to serve them:
    the kernel checks that itself, so no Python-side grouping pass over (possibly thousands of)
    gradients. None when the kernel refuses the list (mixed devices or dtypes, sparse layouts); the
    grouped path then handles it, or says precisely what is wrong."""
    first = grads[0]
    if _backends.choose("clip_grad", first.device, first.dtype, norm_type) not in ("cpu", "cuda"):
        return None
    try:
        norm = impl(first.device.type).multi_tensor_norm(grads, norm_type)
    except (RuntimeError, NotImplementedError):
        return None
    return norm.to(first.dtype)


def _single_group_clip(grads, max_norm: float, norm_type: float):
    """Norm and clip of a single-group list in one compiled call; None as for _single_group_norm."""
    first = grads[0]
    if _backends.choose("clip_grad", first.device, first.dtype, norm_type) not in ("cpu", "cuda"):
        return None
    try:
        norm = torch.ops.torchfast.clip_grad_norm_fused_(grads, max_norm, norm_type)
    except (RuntimeError, NotImplementedError):
        return None
    return norm.to(first.dtype)


def _check_nonfinite(total_norm, norm_type):
    if torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`")


def _clip(groups, max_norm: float, total_norm: Tensor, fname: str):
    for (device, dtype), group in groups:
        backend = _backend_for(device, dtype, 2.0, group, fname, "gradient")
        try:
            impl(backend).multi_tensor_clip_(group, total_norm.to(device), max_norm)
        except NotImplementedError:
            _check_dense(group, fname, "gradient")
            raise


def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None) -> Tensor:
    """The norm of all `tensors` viewed as one vector (``torch.nn.utils.get_total_norm``).

    Returns a 0-dim tensor on the first tensor's device, in the (promoted) dtype of the tensors;
    ``tensor(0.)`` for an empty list.
    """
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    if not norm_type > 0:
        # 0-norm (a count), negative and -inf norms: stock semantics combine per-tensor values in
        # ways no fused kernel reproduces; hand them to PyTorch itself.
        _check_dense(tensors, "get_total_norm", "tensor")
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    with torch.no_grad():
        total_norm = _total_norm(_group(tensors, "get_total_norm", "tensor"), norm_type, tensors[0].device,
                                 "get_total_norm")
    if error_if_nonfinite:
        _check_nonfinite(total_norm, norm_type)
    return total_norm


def clip_grads_with_norm_(parameters, max_norm: float, total_norm, foreach=None) -> None:
    """Scale the gradients of `parameters` in place by ``min(max_norm / (total_norm + 1e-6), 1)``
    (``torch.nn.utils.clip_grads_with_norm_``). The coefficient is computed on the device."""
    grads = _grads(_as_list(parameters))
    max_norm = float(max_norm)
    if len(grads) == 0:
        return
    if not isinstance(total_norm, Tensor):
        total_norm = torch.tensor(float(total_norm))
    with torch.no_grad():
        _clip(_group(grads, "clip_grads_with_norm_", "gradient"), max_norm, total_norm, "clip_grads_with_norm_")


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None) -> Tensor:
    """Clip the gradient norm of `parameters` in place; returns the total norm before clipping
    (``torch.nn.utils.clip_grad_norm_``)."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = _grads(parameters)
    norm_type = float(norm_type)
    if not grads or not norm_type > 0:
        total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
        clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
        return total_norm
    with torch.no_grad():
        if not error_if_nonfinite:  # (which must look at the norm before touching any gradient)
            total_norm = _single_group_clip(grads, float(max_norm), norm_type)
            if total_norm is not None:
                return total_norm
        total_norm = _single_group_norm(grads, norm_type)
        if total_norm is not None:
            if error_if_nonfinite:
                _check_nonfinite(total_norm, norm_type)
            impl(_backends.choose("clip_grad", grads[0].device, grads[0].dtype)).multi_tensor_clip_(
                grads, total_norm, float(max_norm))
            return total_norm
        groups = _group(grads, "clip_grad_norm_", "gradient")  # grouped once for both passes
        total_norm = _total_norm(groups, norm_type, grads[0].device, "clip_grad_norm_")
        if error_if_nonfinite:
            _check_nonfinite(total_norm, norm_type)
        _clip(groups, float(max_norm), total_norm, "clip_grad_norm_")
    return total_norm


def clip_grad_value_(parameters, clip_value: float, foreach=None) -> None:
    """Clamp the gradients of `parameters` in place to [-clip_value, clip_value]
    (``torch.nn.utils.clip_grad_value_``)."""
    parameters = _as_list(parameters)
    clip_value = float(clip_value)
    grads = _grads(parameters)
    if not grads:
        return
    with torch.no_grad():
        for _key, group in _group(grads, "clip_grad_value_", "gradient"):
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
