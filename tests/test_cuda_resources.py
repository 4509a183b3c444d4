"""Resource facts of the compiled CUDA kernels, read from the built extension with cuobjdump (no GPU
needed): no kernel spills to local memory or keeps a stack frame, on any architecture built; and the
init stream's instruction count per value, from a probe kernel compiled here.

A stack frame means arrays or structs indexed at run time, a spill, or a library slow path (sincosf's
Payne-Hanek reduction kept one in the init kernels until the stream got its own sin/cos, and the
float64 init kernel kept 40 bytes until the float64 stream got its own sin/cos too).
"""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

import torchfast
from torchfast import _ext


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:  # Triton's wheel bundles one
        path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    return None


def _kernels():
    """[(arch, mangled name, {REG, STACK, LOCAL, ...})] of every kernel in torchfast._C."""
    build = _ext.build_info()
    if not build.get("built") or not build.get("cuda"):
        pytest.skip("torchfast._C was built without the CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's wheel)")
    so = torchfast._C.__file__
    out = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels, arch, name = [], None, None
    for line in out.stdout.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        if "REG:" in line and name is not None:
            kernels.append((arch, name, {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}))
            name = None
    return kernels


def test_no_kernel_spills_or_keeps_a_stack_frame():
    kernels = _kernels()
    names = " ".join(n for _, n, _ in kernels)
    for expected in ("reduce_nsc_kernel", "reduce_ncs_kernel", "elementwise_nsc_kernel", "elementwise_ncs_kernel",
                     "backward_finish_kernel", "norm_chunks_kernel", "clip_chunks_kernel", "philox_fill_kernel",
                     "philox_fill_f64_kernel"):
        assert expected in names, expected
    bad = ["%s %s %s" % (arch, name, res) for arch, name, res in kernels if res.get("LOCAL", 0) or res.get("STACK", 0)]
    assert not bad, "\n".join(bad)


_INIT_PROBE = r'''
#include "philox.h"
using namespace torchfast;
__global__ void probe(float4* out, uint64_t seed, InitParams p) {
  float v[4];
  const uint64_t i = blockIdx.x * blockDim.x + threadIdx.x;
  philox_values(seed, 3, i, p, v);
  out[i] = make_float4(v[0], v[1], v[2], v[3]);
}
'''


@pytest.mark.parametrize("kind,budget", [("kUniform", 100), ("kNormal", 220)])
def test_init_instruction_count(tmp_path, kind, budget):
    """What the GPU will pay per value of the init stream, in sm_90 SASS: one Philox block (4 values) of
    philox.h's philox_values in a one-block kernel, counted from entry to EXIT (the straight-line fast
    path; correctly rounded sqrt's slow-path subroutine lies after EXIT), with nvcc 13.0: uniform 94
    (Philox4x32-10 is 60); normal 213, about 53 per value (the stream without fma and with a division
    in its log took 290). The budgets leave a little room for other compiler versions."""
    nvcc, tool = shutil.which("nvcc"), _cuobjdump()
    if nvcc is None or tool is None:
        pytest.skip("needs nvcc and cuobjdump")
    src = tmp_path / "probe.cu"
    src.write_text(_INIT_PROBE.replace("philox_values(seed, 3, i, p, v)",
                                       "p.kind = %s; philox_values(seed, 3, i, p, v)" % kind))
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    cubin = tmp_path / "probe.cubin"
    r = subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-O3", "-std=c++17", "-I", csrc, "-o", str(cubin), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, timeout=300).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, flags=re.M)
    ops = [op for op in ops if not op.startswith("NOP")]
    assert "EXIT" in ops and "STG.E.128" in ops, sass[-2000:]
    count = ops.index("EXIT") + 1
    assert count <= budget, "%s: %d SASS instructions per Philox block (budget %d)" % (kind, count, budget)
