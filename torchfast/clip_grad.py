"""Fused gradient clipping: drop-ins for the torch.nn.utils functions of the same names.

Per (device, dtype) group of gradients: one multi-tensor kernel computes the group's norm and one
scales the group, the clip coefficient computed on the device from the total norm, so nothing
waits for the host unless ``error_if_nonfinite=True`` (which must read the norm to raise).

Differences from stock, all in the rounding: the norm of a group is accumulated in float32
(float64 for float64 gradients) before it is cast to the gradients' dtype, and the clip coefficient
is computed in float32 (float64) from the norm in the dtype of ``total_norm`` (``clip_grad_norm_``:
the returned norm, in the gradients' dtype; a float16 norm that overflows to inf clips to zero, as
stock's does). Sparse gradients go to torch.nn.utils itself. The ``foreach`` argument is accepted for
compatibility; torchfast always uses its multi-tensor kernels.
"""
import math
import types
import warnings

import torch
from torch import Tensor

from torchfast import _backends
from torchfast._ops import impl
from torchfast.reference.clip_grad import check_writable

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


def _stock_only(tensors) -> bool:
    """Whether a list holds what only torch.nn.utils takes: a sparse tensor (the kernels take strided
    ones), or an integer or bool one (stock's own error, from the op it fails in). Looked for only
    once the kernels have refused a list."""
    return any(isinstance(t, Tensor) and (t.layout != torch.strided or not (t.is_floating_point() or t.is_complex()))
               for t in tensors)


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
    if len(groups) > 1:  # what a later group refuses is refused before any group is scaled
        for (device, dtype), group in groups:
            if not (dtype.is_floating_point or dtype.is_complex):
                raise TypeError("torchfast.%s: gradients of dtype %s" % (fname, dtype))  # (handed to stock)
            if any(t.layout != torch.strided for t in group):
                raise RuntimeError("torchfast.%s: sparse gradients" % fname)  # (handed to stock)
            check_writable(group)
    for (device, dtype), group in groups:
        backend = _backend_for(device, dtype, 2.0, group, fname, "gradient")
        try:
            impl(backend).multi_tensor_clip_(group, total_norm.to(device), max_norm)
        except NotImplementedError:
            _check_dense(group, fname, "gradient")
            raise


# --------------------------------------------------------------------------------------------
# Sharded gradients. Each rank computes the p-th power of its local norm with the multi-tensor
# kernels (the max for inf), and one all-reduce per set of sharded process groups makes it global.
# No full tensor is ever gathered, and nothing waits for the host.

_DTENSOR = []  # [DTensor class or None], resolved on first use (importing it costs ~0.1 s)


def _dtensor_type():
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch without distributed support
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def _is_dtensor(t) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def _sharded(tensors) -> bool:
    """Whether a list holds DTensors, judged by its ends: O(1) for the thousands of small gradients of
    the common case. (FSDP2 and tensor parallelism make every gradient a DTensor; a DTensor hidden in
    the middle of plain tensors reaches the kernels, which refuse it with an error.)"""
    return bool(tensors) and (_is_dtensor(tensors[0]) or _is_dtensor(tensors[-1]))


def _local_power(local, norm_type: float, fname: str):
    """sum |x|^p of the local tensors (max |x| for inf) as a float32/float64 0-dim tensor, on the
    tensors' device; 0 when they are all empty (an empty shard)."""
    device = local[0].device
    local = [t for t in local if t.numel() > 0]
    if not local:
        return torch.zeros((), dtype=torch.float32, device=device)
    norm = _total_norm(_group(local, fname, "tensor"), norm_type, local[0].device, fname)
    acc = torch.float64 if norm.dtype == torch.float64 else torch.float32
    norm = norm.to(acc)
    return norm if math.isinf(norm_type) else norm.pow(norm_type)


def _all_reduce(value, norm_type: float, group):
    import torch.distributed as dist
    dist.all_reduce(value, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM, group=group)


def _finish(total, norm_type: float):
    return total if math.isinf(norm_type) else total.pow(1.0 / norm_type)


def _combine(parts, norm_type: float):
    out = parts[0]
    for p in parts[1:]:
        out = torch.maximum(out, p) if math.isinf(norm_type) else out + p
    return out


def _sharded_total_norm(tensors, norm_type: float, process_group, fname: str):
    """The global norm of plain local shards (ZeRO-style: each rank holds a disjoint part of the
    tensors) over `process_group`: one all-reduce."""
    local = _local_power(tensors, norm_type, fname)
    _all_reduce(local, norm_type, process_group)
    return _finish(local, norm_type).to(tensors[0].dtype)


def _dtensor_total_norm(tensors, norm_type: float, fname: str):
    """The global norm of DTensors (FSDP2, tensor parallel) with Shard and Replicate placements on one
    device mesh, as a DTensor replicated on that mesh (what torch.nn.utils returns): the local norms of
    all tensors sharded over the same mesh dimensions are added first, so a typical FSDP2 model costs
    one all-reduce per call. None for what this cannot do (Partial placements, several meshes): the
    caller hands those to torch.nn.utils."""
    from torch.distributed.tensor import Replicate, Shard
    mesh = tensors[0].device_mesh
    by_dims = {}
    for t in tensors:
        if t.device_mesh != mesh or any(not isinstance(p, (Shard, Replicate)) for p in t.placements):
            return None
        dims = tuple(i for i, p in enumerate(t.placements) if isinstance(p, Shard))
        by_dims.setdefault(dims, []).append(t.to_local())
    parts = []
    for dims, local in by_dims.items():
        part = _local_power(local, norm_type, fname)
        for d in dims:  # each sharded mesh dimension adds (or maxes) over its process group
            _all_reduce(part, norm_type, mesh.get_group(d))
        parts.append(part)
    total = _finish(_combine(parts, norm_type), norm_type).to(tensors[0].dtype)
    DTensor = _dtensor_type()
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _global_norm(tensors, norm_type: float, process_group, fname: str):
    """The total norm of sharded tensors (DTensors, or plain shards with a process group); None when
    the tensors are not sharded, or sharded in a way only torch.nn.utils handles."""
    n_dt = sum(_is_dtensor(t) for t in tensors)
    if n_dt:
        if process_group is not None:
            raise ValueError("torchfast.%s: process_group= is for plain tensors sharded by the caller; DTensor "
                             "gradients carry their own mesh" % fname)
        return _dtensor_total_norm(tensors, norm_type, fname) if n_dt == len(tensors) else None
    if process_group is not None:
        return _sharded_total_norm(tensors, norm_type, process_group, fname)
    return None


def _local(t):
    """A DTensor's local shard (a not-yet-reduced total norm: its full value); other tensors as they are."""
    if not _is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate
    if t.dim() == 0 and not all(isinstance(p, Replicate) for p in t.placements):
        return t.full_tensor()
    return t.to_local()


def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None, *,
                   process_group=None) -> Tensor:
    """The norm of all `tensors` viewed as one vector (``torch.nn.utils.get_total_norm``).

    Returns a 0-dim tensor on the first tensor's device, in the (promoted) dtype of the tensors;
    ``tensor(0.)`` for an empty list. DTensor gradients (FSDP2, tensor parallel) give the global norm as
    a replicated DTensor, from local norms and one all-reduce. ``process_group=`` (torchfast only): the
    tensors are this rank's disjoint shards of a list sharded by the caller (ZeRO-style); the norm is
    the global one over that group (one all-reduce; every rank must call).
    """
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0 and process_group is None:
        return torch.tensor(0.0)
    if len(tensors) == 0:
        raise ValueError("torchfast.get_total_norm: with process_group=, every rank needs at least one tensor "
                         "(an empty shard can be passed as an empty tensor) to know the device and dtype")
    if norm_type > 0 and (process_group is not None or _sharded(tensors)):
        with torch.no_grad():
            total_norm = _global_norm(tensors, norm_type, process_group, "get_total_norm")
        if total_norm is None:
            return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
        if error_if_nonfinite:
            _check_nonfinite(_local(total_norm), norm_type)
        return total_norm
    if not norm_type > 0:
        if process_group is not None:
            raise ValueError("torchfast.get_total_norm: process_group= takes norm types > 0 or inf, got %s"
                             % norm_type)
        # 0-norm (a count), negative and -inf norms: stock semantics combine per-tensor values in
        # ways no fused kernel reproduces; hand them to PyTorch itself (with its errors).
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    try:
        with torch.no_grad():
            total_norm = _total_norm(_group(tensors, "get_total_norm", "tensor"), norm_type, tensors[0].device,
                                     "get_total_norm")
    except Exception:  # a sparse or integer tensor: torch.nn.utils computes it (or raises its error)
        if process_group is None and _stock_only(tensors):
            return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
        raise
    if error_if_nonfinite:
        _check_nonfinite(total_norm, norm_type)
    return total_norm


def clip_grads_with_norm_(parameters, max_norm: float, total_norm, foreach=None) -> None:
    """Scale the gradients of `parameters` in place by ``min(max_norm / (total_norm + 1e-6), 1)``
    (``torch.nn.utils.clip_grads_with_norm_``). The coefficient is computed on the device."""
    parameters = _as_list(parameters)
    grads = _grads(parameters)
    max_norm = float(max_norm)
    if len(grads) == 0:
        return
    if not isinstance(total_norm, Tensor):  # stock's error (a number or string has no clamp); or its result
        return torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    if _sharded(grads):  # sharded gradients are scaled shard by shard (the coefficient is the same everywhere)
        grads = [_local(g) for g in grads]
    total_norm = _local(total_norm)
    try:
        with torch.no_grad():
            _clip(_group(grads, "clip_grads_with_norm_", "gradient"), max_norm, total_norm, "clip_grads_with_norm_")
    except Exception:  # refused before any write (_clip): a sparse or integer gradient is stock's to take
        if _stock_only(grads):
            return torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
        raise


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None, *, process_group=None) -> Tensor:
    """Clip the gradient norm of `parameters` in place; returns the total norm before clipping
    (``torch.nn.utils.clip_grad_norm_``). Sharded gradients (DTensors, or plain shards with
    ``process_group=``) are clipped by their global norm: see ``get_total_norm``."""
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = _grads(parameters)
    norm_type = float(norm_type)
    if process_group is not None or _sharded(grads):
        total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach, process_group=process_group)
        clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
        return total_norm
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
        if _stock_only(grads):  # (looked for only once the compiled kernels have refused the list)
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
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
