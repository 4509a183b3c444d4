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
    # remembered answers are keyed by the call; a NaN norm type (never equal to itself) is not kept
    remembered = len(_backends._choices)
    for _ in range(3):
        assert _backends.choose("clip_grad", dev, torch.float32, float("nan")) == "reference"
    assert len(_backends._choices) == remembered


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


# ------------------------------------------------------------------ measured choice between cuda and triton

def _gpu_backends_servable():
    return all(_backends.why_not(n, "bn_relu", "cuda", torch.float32) is None for n in _backends.GPU_BACKENDS)


def test_gpu_choice_orders_the_two_gpu_backends():
    previous = _backends.set_gpu_choice({})
    try:
        assert _backends.auto_order("bn_relu", "cuda") == ("cuda", "triton", "reference")
        if _gpu_backends_servable():  # choose() remembers its answer: a new order must replace it
            assert _backends.choose("bn_relu", torch.device("cuda"), torch.float32) == "cuda"
        _backends.set_gpu_choice({"bn_relu": "triton", "init": "cuda"})
        assert _backends.auto_order("bn_relu", "cuda") == ("triton", "cuda", "reference")
        assert _backends.auto_order("init", "cuda") == ("cuda", "triton", "reference")
        assert _backends.auto_order("clip_grad", "cuda") == ("cuda", "triton", "reference")
        assert _backends.auto_order("bn_relu", "cpu") == ("cpu", "reference")  # CPU tensors unaffected
        if _gpu_backends_servable():  # both are built here even without a GPU: choose() needs no device
            assert _backends.choose("bn_relu", torch.device("cuda"), torch.float32) == "triton"
            assert _backends.choose("init", torch.device("cuda"), torch.float32) == "cuda"
            with torchfast.use_backend("cuda"):  # an explicit choice still wins
                assert _backends.choose("bn_relu", torch.device("cuda"), torch.float32) == "cuda"
        # float64 is not served by Triton: the next backend in the order takes it
        if _backends.why_not("cuda", "bn_relu", "cuda", torch.float64) is None:
            assert _backends.choose("bn_relu", torch.device("cuda"), torch.float64) == "cuda"
    finally:
        _backends.set_gpu_choice(previous)


def test_gpu_choice_rejects_bad_values():
    with pytest.raises(ValueError, match="must be 'cuda' or 'triton'"):
        _backends.set_gpu_choice({"bn_relu": "cpu"})
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        _backends.set_gpu_choice({"conv": "cuda"})
    assert _backends.get_gpu_choice() == {}


def test_gpu_choice_file_from_environment(tmp_path):
    good = tmp_path / "choice.json"
    good.write_text('{"device": "NVIDIA H200", "ops": {"bn_relu": {"cuda": 1.0, "triton": 0.9, '
                    '"choice": "triton"}, "init": {"cuda": 1.0, "triton": 2.0, "choice": "cuda"}}}')
    code = "import torchfast; from torchfast import _backends; print(sorted(_backends.get_gpu_choice().items()))"
    r = _run(code, {"TORCHFAST_BACKEND_CHOICE": str(good)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[('bn_relu', 'triton'), ('init', 'cuda')]"
    r = subprocess.run([sys.executable, "-m", "torchfast.info"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "TORCHFAST_BACKEND_CHOICE": str(good)})
    assert "measured GPU choice: bn_relu=triton, init=cuda" in r.stdout, r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"ops": {"bn_relu": {"choice": "cpu"}}}')
    r = _run(code, {"TORCHFAST_BACKEND_CHOICE": str(bad)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]" and "keeping the default order" in r.stderr
    r = _run(code, {"TORCHFAST_BACKEND_CHOICE": str(tmp_path / "missing.json")})
    assert r.stdout.strip() == "[]" and "cannot be used" in r.stderr


def test_autotune_needs_a_gpu():
    from torchfast import tuning

    if torch.cuda.is_available():
        pytest.skip("a GPU is present (test_autotune_on_gpu covers it)")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        tuning.autotune_backends()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none visible)")
def test_autotune_on_gpu(tmp_path):
    from torchfast import tuning

    previous = _backends.get_gpu_choice()
    try:
        path = tmp_path / "choice.json"
        result = tuning.autotune_backends(scale=0.1, reps=2, save=str(path))
        assert set(result["ops"]) == set(_backends.OPS)
        for op, e in result["ops"].items():
            assert e["choice"] in _backends.GPU_BACKENDS
            assert e[e["choice"]] is not None, (op, e)
            assert _backends.get_gpu_choice()[op] == e["choice"]
        assert _backends.read_choice_file(str(path)) == {op: e["choice"] for op, e in result["ops"].items()}
    finally:
        _backends.set_gpu_choice(previous)


def test_autotune_workloads_run():
    """The timed workloads themselves, run once on the CPU at a small scale (the timing needs a GPU)."""
    from torchfast import tuning

    for fn in tuning._workloads(torch.device("cpu"), torch.float32, 0.05).values():
        fn()
