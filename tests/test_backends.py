"""Backend choice, the build, `python -m torchfast.info`, and import without the extension."""
import os
import subprocess
import sys

import pytest
import torch

import torchfast
from torchfast import _backends, _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, env_extra=None):
    env = dict(os.environ)
    env.pop("TORCHFAST_BACKEND", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_extension_is_built():
    """The README's install builds torchfast._C; a test run without it is a broken install."""
    if os.environ.get("TORCHFAST_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("TORCHFAST_ALLOW_NO_EXTENSION=1")
    assert _ext._C is not None, "torchfast._C did not load: %s" % _ext.load_error
    assert _backends.available_backends("cpu") == ["cpu", "reference"]


def test_cuda_kernels_registered_when_built_with_cuda():
    info = _ext.build_info()
    if not info.get("cuda"):
        if os.environ.get("TORCHFAST_FORCE_CUDA") == "1":
            pytest.fail("TORCHFAST_FORCE_CUDA=1 but the extension was built without CUDA kernels")
        pytest.skip("extension built without CUDA kernels")
    for names in _backends._COMPILED_OPS.values():
        for name in names:
            assert torch._C._dispatch_has_kernel_for_dispatch_key("torchfast::" + name, "CUDA"), name
    assert "9.0" in info["cuda_archs"] or os.environ.get("TORCH_CUDA_ARCH_LIST")


def test_automatic_choice_and_overrides():
    dev = torch.device("cpu")
    assert _backends.choose("bn_relu", dev, torch.float32) == "cpu"
    assert _backends.choose("clip_grad", dev, torch.float32, 0.0) == "reference"  # 0-norm: no kernel
    with torchfast.use_backend("reference"):
        assert torchfast.get_backend() == "reference"
        assert _backends.choose("init", dev, torch.float32) == "reference"
        with torchfast.use_backend(None):
            assert _backends.choose("init", dev, torch.float32) == "cpu"
    assert torchfast.get_backend() is None
    torchfast.set_backend("reference")
    assert _backends.choose("bn_relu", dev, torch.float32) == "reference"
    torchfast.set_backend(None)
    assert _backends.choose("bn_relu", dev, torch.float32) == "cpu"


def test_unavailable_backend_says_why():
    with torchfast.use_backend("cuda"):
        with pytest.raises(torchfast.BackendUnavailable, match="serves cuda tensors, got cpu"):
            torchfast.nn.functional.batch_norm_relu(torch.randn(4, 3), None, None, training=True)
    with torchfast.use_backend("triton"):
        p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        p.grad = torch.ones(2, dtype=torch.float64)
        with pytest.raises(torchfast.BackendUnavailable, match="not supported by the Triton kernels"):
            torchfast.clip_grad_norm_([p], 1.0)
    with torchfast.use_backend("cpu"):
        with pytest.raises(torchfast.BackendUnavailable, match="norm_type"):
            _backends.choose("clip_grad", torch.device("cpu"), torch.float32, -1.0)
        with pytest.raises(torchfast.BackendUnavailable, match="dtype"):
            torchfast.get_total_norm([torch.ones(3, dtype=torch.complex64)])
    with pytest.raises(ValueError, match="unknown backend"):
        torchfast.set_backend("tpu")


def test_environment_variable():
    r = _run("import torchfast, torch; print(torchfast.get_backend()); "
             "print(torchfast._backends.choose('bn_relu', torch.device('cpu'), torch.float32))",
             {"TORCHFAST_BACKEND": "reference"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["reference", "reference"]
    r = _run("import torchfast; print(torchfast.get_backend())", {"TORCHFAST_BACKEND": "bogus"})
    assert r.returncode == 0 and r.stdout.strip() == "None" and "not a torchfast backend" in r.stderr


def test_import_without_extension_uses_reference():
    code = (
        "import sys, warnings\n"
        "sys.modules['torchfast._C'] = None\n"  # makes `from torchfast import _C` fail
        "warnings.simplefilter('error')\n"
        "import torch, torchfast\n"
        "assert torchfast.available_backends('cpu') == ['reference'], torchfast.available_backends('cpu')\n"
        "x = torch.randn(4, 3, 5, 5)\n"
        "y = torchfast.nn.BatchNormReLU2d(3)(x)\n"
        "ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))\n"
        "assert torch.allclose(y, ref, atol=1e-5)\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "torchfast.clip_grad_norm_([p], 1.0)\n"
        "torchfast.init.normal_(torch.empty(10), seed=1)\n"
        "print('ok')\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_info_command():
    r = subprocess.run([sys.executable, "-m", "torchfast.info"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torch " in r.stdout and "bn_relu" in r.stdout
    assert "compiled extension torchfast._C: built" in r.stdout or _ext._C is None
