"""Compile every Triton kernel of torchfast ahead of time for real GPU targets, without a GPU.

Run by tests/test_triton_compile.py in a subprocess WITHOUT TRITON_INTERPRET (under the interpreter
`triton.jit` returns interpreted functions that cannot be compiled). The interpreter executes the
kernels' Python semantics; this goes through Triton's real pipeline (TTIR, TTGIR, LLVM, PTX and
ptxas to a cubin) and so catches what only the GPU compiler rejects: constexpr misuse, type errors
in compiled mode, integer arguments that Triton specializes to constants (a value of 1), shapes it
cannot lay out.

Prints one JSON object: {"ok": [...], "failed": {variant: error}, "vectors": {variant: {"ld.v4": n,
...}}, "resources": {variant: {"REG": n, "STACK": n, "LOCAL": n}}} (resources from cuobjdump on the
cubin, when a cuobjdump is found: the CUDA toolkit's or the one Triton's wheel bundles).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from torchfast.triton import bn_relu, clip_grad, init  # noqa: E402

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]


def _jit(kernel):
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _compile(kernel, types, constexprs, target, **options):
    fn = _jit(kernel)
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    missing = [n for n in fn.arg_names if n not in constexprs and n not in types and not n.isupper()]
    unknown = [n for n in list(types) + list(constexprs) if n not in fn.arg_names]
    if unknown:
        raise ValueError("not arguments of %s: %s" % (fn.__name__, unknown))
    for n in missing:  # lower-case scalar arguments default to i32 only if they are not pointers
        if n.endswith("_ptr") or n.endswith("_out"):
            raise ValueError("%s: pointer argument %s needs a type" % (fn.__name__, n))
    # Pointer arguments 16-byte aligned, as Triton's launcher specialises them for aligned tensors
    # (every tensor PyTorch allocates), so the vectorisation seen here is the GPU's.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if str(sig[n]).startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=options or None)


def variants():
    """(name, kernel, types, constexprs, options)."""
    out = []
    ptr = {tl.float32: "*fp32", tl.bfloat16: "*bf16", tl.float16: "*fp16"}
    torch_dtype = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}
    for dt in (tl.float32, tl.bfloat16, tl.float16):
        d = ptr[dt]
        zero_max = bn_relu.relu_zero_max(torch_dtype[dt])  # bn_relu's backward mask: v > zero_max
        f = "*fp32"
        common = {"x_ptr": d, "dy_ptr": d, "o_ptr": d, "gm_ptr": d, "scale_ptr": f, "beta_ptr": f, "mean_ptr": f,
                  "ws_ptr": f}
        # bn_relu: forward statistics, backward with the mask from x; bn_add_relu: backward with the
        # mask from the saved output (MASK_FROM_OUT, which also writes the masked gradient).
        for backward, from_out in ((False, False), (True, False), (True, True)):
            out.append(("reduce_rows %s bwd=%s from_out=%s" % (dt, backward, from_out), bn_relu._reduce_rows_kernel,
                        common, {"BACKWARD": backward, "MASK_FROM_OUT": from_out, "RELU_ZERO_MAX": zero_max,
                                 "BLOCK_N": 32, "BLOCK_S": 64}, {"num_warps": bn_relu.RED_WARPS}))
            out.append(("reduce_cols %s bwd=%s from_out=%s" % (dt, backward, from_out), bn_relu._reduce_cols_kernel,
                        common, {"BACKWARD": backward, "MASK_FROM_OUT": from_out, "RELU_ZERO_MAX": zero_max,
                                 "BLOCK_R": 32, "BLOCK_C": 64}, {"num_warps": bn_relu.RED_WARPS}))
        ew_fwd = {"x_ptr": d, "r_ptr": d, "y_ptr": d, "mean_ptr": f, "scale_ptr": f, "beta_ptr": f}
        ew_bwd = {"x_ptr": d, "dy_ptr": d, "dx_ptr": d, "scale_ptr": f, "beta_ptr": f, "mean_ptr": f, "k0_ptr": f,
                  "k1_ptr": f, "k2_ptr": f}
        for row_channel in (True, False):
            out.append(("forward %s rows=%s" % (dt, row_channel), bn_relu._forward_kernel, ew_fwd,
                        {"ROW_CHANNEL": row_channel, "HAS_RESIDUAL": False, "BLOCK_COL": 16, "BLOCK": 2048},
                        {"num_warps": 8}))
            out.append(("backward %s rows=%s" % (dt, row_channel), bn_relu._backward_kernel, ew_bwd,
                        {"ROW_CHANNEL": row_channel, "MASK_FROM_OUT": False, "USE_BATCH_STATS": True,
                         "RELU_ZERO_MAX": zero_max, "BLOCK_COL": 1024, "BLOCK": 1024}, {"num_warps": 4}))
        # bn_add_relu's elementwise passes: one layout per dtype (the flags do not touch the tiling)
        add_rows = dt != tl.bfloat16
        out.append(("forward add %s rows=%s" % (dt, add_rows), bn_relu._forward_kernel, ew_fwd,
                    {"ROW_CHANNEL": add_rows, "HAS_RESIDUAL": True, "BLOCK_COL": 64, "BLOCK": 2048},
                    {"num_warps": 8}))
        out.append(("backward add %s rows=%s" % (dt, add_rows), bn_relu._backward_kernel, ew_bwd,
                    {"ROW_CHANNEL": add_rows, "MASK_FROM_OUT": True, "USE_BATCH_STATS": True,
                     "RELU_ZERO_MAX": zero_max, "BLOCK_COL": 64, "BLOCK": 2048}, {"num_warps": 8}))
        out.append(("stats_finish %s" % dt, bn_relu._stats_finish_kernel,
                    {"ws_ptr": f, "x_ptr": d, "w_ptr": f, "b_ptr": f, "mean_ptr": f, "invstd_ptr": f, "var_ptr": f,
                     "scale_ptr": f, "beta_ptr": f, "eps": "fp32", "M": "i64"},
                    {"CHANNELS_LAST": dt == tl.float16, "HAS_W": True, "HAS_B": dt != tl.bfloat16,
                     "BLOCK_C": bn_relu.FIN_BLOCK_C, "BLOCK_SP": bn_relu.FIN_BLOCK_SP}, {}))
        vec = 16 // torch_dtype[dt].itemsize
        for aligned in (True, False):
            out.append(("norm_chunks %s aligned=%s" % (dt, aligned), clip_grad._norm_chunks_kernel,
                        {"base_ptr": d, "offset_ptr": "*i64", "numel_ptr": "*i64", "start_ptr": "*i64",
                         "partial_ptr": f, "p": "fp32"},
                        {"KIND": 1, "CHUNK_ELEMS": clip_grad.CHUNK, "BLOCK": 2048, "ALIGNED": aligned, "VEC": vec},
                        {"num_warps": 8}))
            out.append(("clip_chunks %s aligned=%s" % (dt, aligned), clip_grad._clip_chunks_kernel,
                        {"base_ptr": d, "offset_ptr": "*i64", "numel_ptr": "*i64", "start_ptr": "*i64",
                         "total_ptr": f, "max_norm": "fp32"},
                        {"CHUNK_ELEMS": clip_grad.CHUNK, "BLOCK": 2048, "ALIGNED": aligned, "VEC": vec},
                        {"num_warps": 8}))
        for aligned in (True, False):
            out.append(("philox_fill %s aligned=%s" % (dt, aligned), init._philox_fill_kernel,
                        {"base_ptr": d, "offset_ptr": "*i64", "numel_ptr": "*i64", "start_ptr": "*i64",
                         "stream_ptr": "*i64", "kind_ptr": "*i64", "param_ptr": "*fp32", "seed": "i64"},
                        {"OUT_DTYPE": dt, "CHUNK_ELEMS": init.CHUNK, "BLOCK_B": 1024, "ALIGNED": aligned,
                         "VEC": vec, "LIBDEVICE": True}, {"num_warps": 8, "enable_fp_fusion": False}))
    # float64 init: the full-precision stream (float64 parameters; libdevice's erf, erfc, exp and log)
    out.append(("philox_fill fp64", init._philox_fill_kernel,
                {"base_ptr": "*fp64", "offset_ptr": "*i64", "numel_ptr": "*i64", "start_ptr": "*i64",
                 "stream_ptr": "*i64", "kind_ptr": "*i64", "param_ptr": "*fp64", "seed": "i64"},
                {"OUT_DTYPE": tl.float64, "CHUNK_ELEMS": init.CHUNK, "BLOCK_B": 1024, "ALIGNED": True, "VEC": 2,
                 "LIBDEVICE": True},
                {"num_warps": 8, "enable_fp_fusion": False}))
    f = "*fp32"
    # M == 1 (eval backward of a 1-element batch): Triton passes an integer argument equal to 1 as
    # a constant, so the kernels must not call tensor methods on it.
    out.append(("stats_finish M=1", bn_relu._stats_finish_kernel,
                {"ws_ptr": f, "x_ptr": f, "w_ptr": f, "b_ptr": f, "mean_ptr": f, "invstd_ptr": f, "var_ptr": f,
                 "scale_ptr": f, "beta_ptr": f, "eps": "fp32"},
                {"M": 1, "CHANNELS_LAST": False, "HAS_W": False, "HAS_B": False, "BLOCK_C": bn_relu.FIN_BLOCK_C,
                 "BLOCK_SP": bn_relu.FIN_BLOCK_SP}, {}))
    for batch_stats in (True, False):
        out.append(("backward_finish batch=%s M=1" % batch_stats, bn_relu._backward_finish_kernel,
                    {"ws_ptr": f, "w_ptr": f, "invstd_ptr": f, "gw_ptr": f, "gb_ptr": f, "k0_ptr": f, "k1_ptr": f,
                     "k2_ptr": f},
                    {"M": 1, "SPLITS": 1, "USE_BATCH_STATS": batch_stats, "HAS_W": batch_stats,
                     "BLOCK_C": bn_relu.FIN_BLOCK_C, "BLOCK_SP": bn_relu.FIN_BLOCK_SP}, {}))
    # eval backward (USE_BATCH_STATS=False: no k1/k2 term; with MASK_FROM_OUT no read of x)
    for from_out in (False, True):
        out.append(("backward eval bf16 from_out=%s" % from_out, bn_relu._backward_kernel,
                    {"x_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", "scale_ptr": f, "beta_ptr": f,
                     "mean_ptr": f, "k0_ptr": f, "k1_ptr": f, "k2_ptr": f},
                    {"ROW_CHANNEL": from_out, "MASK_FROM_OUT": from_out, "USE_BATCH_STATS": False,
                     "RELU_ZERO_MAX": bn_relu.relu_zero_max(torch.bfloat16), "BLOCK_COL": 16, "BLOCK": 1024},
                    {"num_warps": 4}))
    for from_var in (True, False):
        out.append(("prepare from_var=%s" % from_var, bn_relu._prepare_kernel,
                    {"mean_ptr": f, "v_ptr": "*fp16" if from_var else f, "w_ptr": f, "b_ptr": f, "mean_out": f,
                     "var_out": f, "invstd_ptr": f, "scale_ptr": f, "beta_ptr": f, "eps": "fp32"},
                    {"FROM_VAR": from_var, "HAS_W": True, "HAS_B": True, "BLOCK_C": 64}, {}))
    for kind in (0, 2, 3):
        out.append(("norm_chunks kind=%d" % kind, clip_grad._norm_chunks_kernel,
                    {"base_ptr": f, "offset_ptr": "*i64", "numel_ptr": "*i64", "start_ptr": "*i64", "partial_ptr": f,
                     "p": "fp32"},
                    {"KIND": kind, "CHUNK_ELEMS": clip_grad.CHUNK, "BLOCK": 2048, "ALIGNED": True, "VEC": 4},
                    {"num_warps": 8}))
    for kind in (0, 1, 2, 3):
        out.append(("norm_finish kind=%d" % kind, clip_grad._norm_finish_kernel,
                    {"partial_ptr": f, "n": "i32", "out_ptr": f, "p": "fp32"}, {"KIND": kind, "BLOCK": 2048},
                    {"num_warps": 8}))
    return out


def _vector_accesses(ptx: str) -> dict:
    """Global loads and stores in the PTX by width: {"ld.v4": n, "ld.v2": n, "ld.1": n, "st.v4": ...}."""
    out = {}
    for m in re.finditer(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)", ptx):
        width = re.search(r"\.v(\d)", m.group(2))
        k = "%s.%s" % (m.group(1), "v" + width.group(1) if width else "1")
        out[k] = out.get(k, 0) + 1
    return out


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def _resources(cubin: bytes, tool) -> dict:
    """{"REG": registers per thread, "STACK": bytes, "LOCAL": bytes (spills)} of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out.stdout)
    return {"REG": int(m.group(1)), "STACK": int(m.group(2)), "LOCAL": int(m.group(3))} if m else {}


def main():
    only = sys.argv[1:]
    tool = _cuobjdump()
    resources = {}
    ok, failed, vectors = [], {}, {}
    t0 = time.time()
    for name, kernel, types, constexprs, options in variants():
        if only and not any(o in name for o in only):
            continue
        for target in TARGETS:
            key = "%s sm_%d" % (name, target.arch)
            try:
                k = _compile(kernel, types, constexprs, target, **options)
                if "cubin" not in k.asm:
                    raise RuntimeError("no cubin produced")
                ok.append(key)
                vectors[key] = _vector_accesses(k.asm["ptx"])
                if tool is not None:
                    resources[key] = _resources(k.asm["cubin"], tool)
            except Exception as e:  # noqa: BLE001 - report every failure, not the first
                failed[key] = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[-1][:300] if str(e) else "")
    print(json.dumps({"ok": ok, "failed": failed, "vectors": vectors, "resources": resources,
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
