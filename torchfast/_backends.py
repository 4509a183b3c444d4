"""Backend choice: which implementation serves one call of one op.

Each backend says, for a call (op, device, dtype, op detail), why it cannot serve it, or nothing if
it can. Automatic choice takes the first backend of the device's preference list that can serve;
an explicit choice (``set_backend``, ``use_backend`` or the environment variable
``TORCHFAST_BACKEND``) that cannot serve raises :class:`BackendUnavailable` with the reason.

On CUDA tensors the automatic order between the two GPU backends can be set per op from
measurements: :func:`torchfast.tuning.autotune_backends` times both on the GPU at hand, and a JSON
file it saved can be named in ``TORCHFAST_BACKEND_CHOICE`` to apply it at import. Without one, the
CUDA C++ kernels come first.

Everything a call consults is computed at import time (or set explicitly) (which kernels the extension registered), so
``torch.compile`` traces the choice as plain Python without graph breaks.
"""
import contextlib
import importlib.util
import os
import warnings

import torch

from torchfast import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference")
OPS = ("bn_relu", "bn_add_relu", "clip_grad", "init")
# Automatic preference per device type; anything else is served by the reference backend.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Under TRITON_INTERPRET=1 (read by triton when it is imported) Triton kernels run on CPU tensors.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The compiled ops behind each public op.
_COMPILED_OPS = {
    "bn_relu": ("bn_relu_fwd", "bn_relu_bwd"),
    "bn_add_relu": ("bn_add_relu_fwd", "bn_add_relu_bwd"),
    "clip_grad": ("multi_tensor_norm", "multi_tensor_clip_", "clip_grad_norm_fused_"),
    "init": ("philox_fill_",),
}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve a call."""


def _registered(dispatch_key: str) -> dict:
    """{public op: True if every compiled op behind it has a kernel for dispatch_key}."""
    out = {}
    for op, names in _COMPILED_OPS.items():
        ok = _ext._C is not None
        for name in names:
            ok = ok and hasattr(torch.ops.torchfast, name) and torch._C._dispatch_has_kernel_for_dispatch_key(
                "torchfast::" + name, dispatch_key)
        out[op] = ok
    return out


_HAS_CPU_KERNEL = _registered("CPU")
_HAS_CUDA_KERNEL = _registered("CUDA")
_BUILD = _ext.build_info()


def _not_built_reason(kind: str) -> str:
    if not _BUILD["built"]:
        return "torchfast._C is not built (%s); install with `pip install --no-build-isolation -e .`" % (
            _BUILD.get("error") or "no extension")
    if kind == "cuda" and not _BUILD["cuda"]:
        return "torchfast._C was built without CUDA kernels (no CUDA toolkit, or TORCHFAST_SKIP_CUDA=1)"
    return "this build of torchfast._C has no %s kernel for this op" % kind


def why_not(backend: str, op: str, device_type: str, dtype: torch.dtype, norm_type: float = 2.0):
    """Why `backend` cannot serve `op` for tensors of (device_type, dtype); None if it can."""
    if backend not in BACKENDS:
        return "unknown backend %r; expected one of %s" % (backend, ", ".join(BACKENDS))
    if op not in OPS:
        raise ValueError("unknown op %r" % (op,))
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_why_not(op, device_type, dtype, norm_type)
    if device_type != backend:
        return "the %s backend serves %s tensors, got %s tensors" % (backend, backend, device_type)
    registered = _HAS_CPU_KERNEL if backend == "cpu" else _HAS_CUDA_KERNEL
    if not registered[op]:
        return _not_built_reason(backend)
    if dtype not in _KERNEL_DTYPES:
        return "dtype %s is not supported (float16, bfloat16, float32, float64)" % (dtype,)
    if op == "clip_grad" and not (norm_type > 0):
        return "norm_type %r is not supported by the kernels (any p > 0 or inf)" % (norm_type,)
    return None


def _triton_why_not(op, device_type, dtype, norm_type):
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if device_type == "cpu" and not _TRITON_INTERPRET:
        return "the triton backend serves cuda tensors (cpu tensors only under TRITON_INTERPRET=1), got cpu tensors"
    if device_type not in ("cuda", "cpu"):
        return "the triton backend serves cuda tensors, got %s tensors" % device_type
    if dtype not in _TRITON_DTYPES and not (op == "init" and dtype == torch.float64):
        return "dtype %s is not supported by the Triton kernels (float16, bfloat16, float32%s)" % (
            dtype, "; float64 for init" if op != "init" else "")
    if device_type == "cpu" and dtype == torch.bfloat16:
        return "bfloat16 is not supported by the Triton interpreter"
    if op == "clip_grad" and not (norm_type > 0):
        return "norm_type %r is not supported by the kernels (any p > 0 or inf)" % (norm_type,)
    return None


def _read_env():
    name = os.environ.get("TORCHFAST_BACKEND", "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        warnings.warn("TORCHFAST_BACKEND=%r is not a torchfast backend (%s); ignoring it"
                      % (name, ", ".join(BACKENDS)), RuntimeWarning, stacklevel=3)
        return None
    return name


# The explicitly requested backend, or None for automatic choice. Process-wide (a plain global so
# torch.compile can guard on it).
_forced = _read_env()

# choose()'s answers by (op, device, dtype, norm_type), for the eager per-call path (a small layer's
# training step calls it once per layer); emptied whenever what it depends on is set.
_choices = {}


def _check_name(name):
    if name is not None and name not in BACKENDS:
        raise ValueError("torchfast: unknown backend %r; expected one of %s, or None for automatic choice"
                         % (name, ", ".join(BACKENDS)))


def set_backend(name):
    """Use backend `name` for every torchfast call from now on; None restores automatic choice."""
    global _forced
    _check_name(name)
    _forced = name
    _choices.clear()


def get_backend():
    """The explicitly requested backend, or None under automatic choice."""
    return _forced


@contextlib.contextmanager
def use_backend(name):
    """Context manager: `with torchfast.use_backend("reference"): ...` (None: automatic)."""
    global _forced
    _check_name(name)
    previous = _forced
    _forced = name
    _choices.clear()
    try:
        yield
    finally:
        _forced = previous
        _choices.clear()


# Measured preference between the GPU backends, per op ({"bn_relu": "triton", ...}); ops not in it
# use AUTO_ORDER["cuda"]. A plain global dict, so torch.compile guards on it.
_gpu_choice = {}
GPU_BACKENDS = ("cuda", "triton")


def set_gpu_choice(choice):
    """Prefer choice[op] ("cuda" or "triton") for op on CUDA tensors under automatic choice; an op
    missing from `choice` goes back to the default order. Returns the previous mapping."""
    global _gpu_choice
    new = {}
    for op, name in dict(choice or {}).items():
        if op not in OPS:
            raise ValueError("torchfast: unknown op %r in a backend choice; expected one of %s" % (op, ", ".join(OPS)))
        if name not in GPU_BACKENDS:
            raise ValueError("torchfast: the GPU backend choice for %s must be 'cuda' or 'triton', got %r" % (op, name))
        new[op] = name
    previous, _gpu_choice = _gpu_choice, new
    _choices.clear()
    return previous


def get_gpu_choice():
    """The measured per-op preference in force on CUDA tensors ({} means the default order)."""
    return dict(_gpu_choice)


def read_choice_file(path):
    """{op: backend} from a JSON file written by torchfast.tuning.autotune_backends(save=path)."""
    import json

    with open(path) as f:
        data = json.load(f)
    ops = data.get("ops") if isinstance(data, dict) else None
    if not isinstance(ops, dict):
        raise ValueError("%s is not a torchfast backend-choice file (no 'ops' mapping)" % path)
    return {op: entry["choice"] if isinstance(entry, dict) else entry for op, entry in ops.items()}


def _load_env_choice():
    path = os.environ.get("TORCHFAST_BACKEND_CHOICE", "").strip()
    if not path:
        return
    try:
        set_gpu_choice(read_choice_file(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn("TORCHFAST_BACKEND_CHOICE=%r cannot be used (%s); keeping the default order" % (path, e),
                      RuntimeWarning, stacklevel=3)


_load_env_choice()


def auto_order(op: str, device_type: str):
    """Backends tried in order under automatic choice for op on device_type."""
    if device_type == "cuda" and op in _gpu_choice:
        first = _gpu_choice[op]
        return (first,) + tuple(name for name in AUTO_ORDER["cuda"] if name != first)
    return AUTO_ORDER.get(device_type, ("reference",))


def choose(op: str, device: torch.device, dtype: torch.dtype, norm_type: float = 2.0) -> str:
    """The backend that serves this call."""
    if norm_type != norm_type or torch.compiler.is_compiling():  # a NaN key would never be found again
        return _choose(op, device, dtype, norm_type)
    key = (op, device, dtype, norm_type)
    name = _choices.get(key)
    if name is None:
        name = _choices[key] = _choose(op, device, dtype, norm_type)
    return name


def _choose(op, device, dtype, norm_type):
    if _forced is not None:
        reason = why_not(_forced, op, device.type, dtype, norm_type)
        if reason is not None:
            raise BackendUnavailable("torchfast: backend %r cannot serve %s for %s %s tensors: %s"
                                     % (_forced, op, device.type, dtype, reason))
        return _forced
    for name in auto_order(op, device.type):
        if why_not(name, op, device.type, dtype, norm_type) is None:
            return name
    return "reference"


def available_backends(device="cpu") -> list:
    """Backends that can serve every op for float32 tensors on `device`, in automatic order."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("reference",))
    return [name for name in order
            if all(why_not(name, op, device.type, torch.float32) is None for op in OPS)]

