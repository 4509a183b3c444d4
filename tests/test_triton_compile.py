"""Every Triton kernel compiled ahead of time for Hopper (sm_90) and Ampere (sm_80), without a GPU.

The interpreter tests (TRITON_INTERPRET=1) check what the kernels compute; this checks that Triton's
real compiler accepts them (tests/triton_aot_check.py, in a subprocess without the interpreter).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the Triton tests JIT-compile for it")
def test_every_triton_kernel_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_aot_check.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert not result["failed"], "\n".join("%s: %s" % kv for kv in result["failed"].items())
    assert len(result["ok"]) >= 120, result["ok"]
    assert any("sm_90" in k for k in result["ok"]) and any("philox_fill" in k for k in result["ok"])
    assert any("from_out=True" in k for k in result["ok"]) and any("forward add" in k for k in result["ok"])
    # the multi-tensor clip kernels on aligned tensors: 16-byte vector loads and stores
    for dt in ("fp32", "bf16"):
        norm = result["vectors"]["norm_chunks %s aligned=True sm_90" % dt]
        clip = result["vectors"]["clip_chunks %s aligned=True sm_90" % dt]
        # the whole-block loop: 16-byte vectors only (what stays scalar is the table reads and the tail)
        assert norm.get("ld.v4", 0) >= 1 and clip.get("ld.v4", 0) >= 1 and clip.get("st.v4", 0) >= 1, (dt, norm, clip)
        plain = result["vectors"]["clip_chunks %s aligned=False sm_90" % dt]
        assert plain.get("ld.v4", 0) == 0, plain  # the hint is what makes the difference
    # init: the whole steps of an aligned launch store 16-byte vectors
    for dt in ("fp32", "bf16", "fp16"):
        fill = result["vectors"]["philox_fill %s aligned=True sm_90" % dt]
        assert fill.get("st.v4", 0) >= 1, (dt, fill)
    # registers and spills (cuobjdump on each cubin; Triton's wheel bundles one): no kernel spills or
    # keeps a stack frame, and the 2048-element reduction tiles (7x7 maps: 32 rows x 64 columns) stay
    # register-lean: at most 96 per thread (they took 149-163 at 4 warps with the mask from the output)
    resources = result["resources"]
    assert len(resources) == len(result["ok"]), "no cuobjdump: Triton's wheel bundles one"
    bad = {k: r for k, r in resources.items() if r.get("LOCAL", 0) or r.get("STACK", 0)}
    assert not bad, bad
    reductions = {k: r["REG"] for k, r in resources.items() if k.startswith("reduce_")}
    assert len(reductions) >= 36 and max(reductions.values()) <= 96, reductions
