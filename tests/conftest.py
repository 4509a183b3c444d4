"""Shared test machinery: backend parametrisation, the CUDA skip marker, the dtype-derived tolerance."""
import os
import warnings

import pytest
import torch

# Without a GPU the Triton kernels are tested on CPU tensors under the interpreter, which triton
# reads when it is imported (`import torch` does not import it): set it before anything does.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torchfast  # noqa: E402
from torchfast import _backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (none visible)")

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_params(op):
    """(device, backend) pairs to test: every backend that can serve `op` on each present device
    (on the CPU that includes triton under TRITON_INTERPRET=1). A compiled backend that should be
    there but is not shows up as a failing test in test_backends, not as a skip here."""
    out = []
    for dev in devices():
        names = list(_backends.AUTO_ORDER[dev]) + (["triton"] if dev == "cpu" else [])
        for name in names:
            if _backends.why_not(name, op, dev, torch.float32) is None:
                out.append(pytest.param(dev, name, id="%s-%s" % (dev, name)))
    return out


def skip_unsupported(backend, op, device, *dtypes):
    """Skip (with the backend's own reason) a case whose dtype that backend does not serve."""
    for dtype in dtypes:
        reason = _backends.why_not(backend, op, device, dtype)
        if reason is not None:
            pytest.skip("%s backend: %s" % (backend, reason))


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = torchfast.get_backend()
    yield
    torchfast.set_backend(previous)


def eps_of(dtype):
    return torch.finfo(dtype).eps


def assert_close_to_oracle(out, ref_lowp, ref64, name="", atol_ulps=16.0):
    """A result computed in dtype D may differ from the float64 oracle by at most twice what the
    reference computed in D differs from it, plus a few ulps of D at the oracle's scale."""
    out64, lowp64 = out.double(), ref_lowp.double()
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    base = (lowp64 - ref64).abs().max().item() if out.numel() else 0.0
    scale = ref64.abs().max().item() if out.numel() else 0.0
    bound = 2.0 * base + atol_ulps * eps_of(out.dtype) * max(scale, 1.0)
    assert err <= bound, "%s: max error %.3g exceeds %.3g (reference in %s differs by %.3g)" % (
        name, err, bound, out.dtype, base)


@pytest.fixture
def cpu_backend_built():
    if _backends.why_not("cpu", "bn_relu", "cpu", torch.float32) is not None:
        pytest.fail("the cpu backend is not available: %s" % _backends.why_not("cpu", "bn_relu", "cpu", torch.float32))


IN_CI = os.environ.get("CI") == "true"


def script_module(module):
    """torch.jit.script(module), without its deprecation notice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


def jit_save_load(scripted, path):
    """A scripted module saved to `path` and loaded back, without torch.jit's deprecation notices."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, path)
        return torch.jit.load(path)
