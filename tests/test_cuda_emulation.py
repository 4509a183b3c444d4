"""The CUDA kernels of csrc/cuda/, executed on the CPU.

CI has no GPU, so csrc/cuda/*.cu are compiled a second time with g++ against the fiber emulator in
csrc/cuda_emu/emulator.h (every CUDA thread a fiber, barriers and shuffles emulated) into a test
module whose ops take CPU tensors (torch.ops.torchfast_emu.*). The same kernel source, launch
configuration and host logic run here as on a GPU; only the memory system and timing differ. Shapes
are chosen to reach every path: 16-byte vectors and scalar fallbacks (misaligned pointers, sizes not
divisible by the vector width), vectors straddling two rows, grid-stride wrap-around, several
channel vectors per thread, multi-table and multi-chunk clipping and init.

On a machine with a GPU the real kernels are tested by the other test files as well.
"""
import os
import sys

import pytest
import torch

import torchfast.init
from torchfast import reference

from conftest import assert_close_to_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fiber emulator uses glibc's ucontext"),
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="a GPU is present: the other test files run the real CUDA kernels"),
]


@pytest.fixture(scope="module")
def emu():
    """Build (or reuse) the emulation module. A build failure is a test failure, not a skip."""
    from torch.utils.cpp_extension import load

    build_dir = os.path.join(ROOT, "build", "cuda_emu")
    os.makedirs(build_dir, exist_ok=True)
    module = load(
        name="torchfast_cuda_emu",
        sources=[os.path.join(ROOT, "csrc", "cuda_emu", "module.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O1", "-ffp-contract=off", "-DTORCHFAST_CUDA_EMULATION"],
        build_directory=build_dir,
        verbose=False,
    )
    return module


def ops():
    return torch.ops.torchfast_emu


# --------------------------------------------------------------------------------------------- emulator

def test_emulator_shuffle_semantics(emu):
    out = emu.emulator_self_test("shuffle")  # lane l gets lane l + 3's value, its own past lane 31
    want = [10 * (t + 3) if t % 32 + 3 < 32 else 10 * t for t in range(64)]
    assert out == want


@pytest.mark.parametrize("case,message", [
    ("deadlock", "deadlock"),
    ("half_warp", "did not take part"),
    ("bad_block", "invalid block"),
    ("bad_grid", "invalid grid"),
])
def test_emulator_reports_broken_kernels(emu, case, message):
    with pytest.raises(RuntimeError, match=message):
        emu.emulator_self_test(case)


# --------------------------------------------------------------------------------------------- divmod

def test_fast_divmod_exact(emu):
    g = torch.Generator().manual_seed(0)
    big = (1 << 63) - 1
    divisors = [1, 2, 3, 4, 7, 49, 196, 3136, 12544, 65535, 65537, (1 << 31) - 1, (1 << 31) + 11,
                (1 << 32) + 1, (1 << 40) + 3, 10 ** 15 + 37, (1 << 62) + 1, big]
    divisors += torch.randint(1, 1 << 62, (20,), generator=g).tolist()
    for d in divisors:
        nums = [0, 1, d - 1, d, d + 1, 2 * d - 1, big, big - 1, big - d]
        nums += torch.randint(0, big, (200,), generator=g).tolist()
        nums = [n for n in nums if 0 <= n <= big]
        got = emu.fast_divmod(d, nums)
        want = [v for n in nums for v in divmod(n, d)]
        assert got == want, "divisor %d" % d


def test_fast_divmod32_exact(emu):
    """The 32-bit variant the elementwise pass uses below 2^31 elements: exact for every n < 2^31."""
    g = torch.Generator().manual_seed(1)
    top = (1 << 31) - 1
    divisors = [1, 2, 3, 7, 49, 196, 3136, 12544, 65535, 65537, (1 << 30) + 1, top]
    divisors += torch.randint(1, 1 << 31, (20,), generator=g).tolist()
    for d in divisors:
        nums = [0, 1, d - 1, d, d + 1, 2 * d - 1, top, top - 1, top - d]
        nums += torch.randint(0, top, (300,), generator=g).tolist()
        nums = [n for n in nums if 0 <= n <= top]
        assert emu.fast_divmod32(d, nums) == [v for n in nums for v in divmod(n, d)], "divisor %d" % d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_index64_paths_match(emu, dtype):
    """The contiguous passes' 64-bit index paths (tensors of 2^31 elements or more), forced on small
    tensors, give exactly the 32-bit paths' results (statistics, output, input gradient): 7x7 maps
    (vectors straddling rows) and a tail."""
    o = ops()
    for shape in ((3, 5, 7, 7), (2, 3, 5, 5), (2, 3, 4, 6)):  # the last: vector reductions
        x = _input(shape, "contiguous", dtype, 11)
        dy = _input(shape, "contiguous", dtype, 12)
        w, b, rm, rv = _params(shape[1], dtype, 13)
        results = []
        for force in (False, True):
            emu.force_index64(force)
            try:
                y, mean, invstd, _ = o.bn_relu_fwd(x, w, b, rm, rv, True, 1e-5)
                gi = o.bn_relu_bwd(dy, x, w, b, mean, invstd, True)[0]
                results.append((torch.cat([y.flatten(), gi.flatten()]), torch.cat([mean, invstd])))
            finally:
                emu.force_index64(False)
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), shape


# --------------------------------------------------------------------------------------------- BN+ReLU

def _input(shape, layout, dtype, seed, offset=False):
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    if offset:  # a view one element into its storage: not 16-byte aligned, the scalar paths
        x = (torch.randn(n + 1, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)[1:].view(shape)
    else:
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "permuted":  # neither layout: made contiguous by the op
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def _params(c, dtype, seed):
    g = torch.Generator().manual_seed(seed + 100)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(acc)
    b = (torch.randn(c, generator=g, dtype=torch.float64) * 0.3).to(acc)
    rm = (torch.randn(c, generator=g, dtype=torch.float64) * 0.1).to(acc)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(acc)
    return w, b, rm, rv


def _d(t):
    return None if t is None else t.double()


# (shape, layout): S = 1 (the (N, C) case), S < vector width, S = 7x7 (vectors straddle rows),
# S % 8 == 4 (fp16 straddles, fp32 does not), half-width vectors (S or C % 4 == 2 in fp32,
# % 8 == 4 in fp16), C not a multiple of the vector width, C / V > 256
# (several channel vectors per thread in channels_last), enough rows that grid-stride loops wrap.
BN_CASES = [
    # contiguous rows that are not whole 16-byte vectors, C a multiple of the channel group: the
    # channel-group reduction (1, 2 and 21 row lanes per 64-thread block, splits, the unrolled loop)
    ((9, 8, 7, 7), "contiguous"),
    ((11, 16, 5, 5), "contiguous"),
    ((13, 8, 3, 1), "contiguous"),
    # short whole-vector rows (16 and 48 bytes in fp32): the channel-group reduction with groups wider
    # than alignment needs, so that a group's rows span at least four sectors
    ((17, 32, 2, 2), "contiguous"),
    ((5, 24, 3, 4), "contiguous"),
    ((37, 12), "contiguous"),
    ((5, 6, 3), "contiguous"),
    ((6, 5, 7, 7), "contiguous"),
    ((3, 4, 14, 14), "contiguous"),
    ((4, 3, 4, 2), "contiguous"),
    ((4, 3, 5, 2), "contiguous"),
    ((2, 3, 5, 7, 3), "contiguous"),
    ((6, 16, 7, 7), "channels_last"),
    ((3, 12, 5, 3), "channels_last"),
    ((5, 6, 3, 2), "channels_last"),
    ((2, 20, 3, 3), "channels_last"),
    ((2, 1032, 1, 3), "channels_last"),
    ((2, 3, 5, 4, 4), "channels_last"),
    ((3, 5, 7, 9), "permuted"),
    ((70, 64, 4, 4), "contiguous"),
    ((70, 64, 4, 4), "channels_last"),
]

BN_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _check_bn(shape, layout, dtype, training, affine, offset, seed, grad_layout=None):
    x = _input(shape, layout, dtype, seed, offset)
    c = shape[1]
    w, b, rm, rv = _params(c, dtype, seed)
    if not affine:
        w = b = None
    eps = 1e-5
    out, mean, invstd, var = ops().bn_relu_fwd(x, w, b, rm, rv, training, eps)
    r_out, r_mean, r_invstd, r_var = reference.bn_relu.bn_relu_fwd(x, w, b, rm, rv, training, eps)
    o_out, o_mean, o_invstd, o_var = reference.bn_relu.bn_relu_fwd(x.double(), _d(w), _d(b), _d(rm), _d(rv),
                                                                    training, eps)
    name = "%s %s %s training=%s" % (shape, layout, dtype, training)
    assert out.dtype == x.dtype and out.shape == x.shape and out.stride() == x.stride(), name
    assert_close_to_oracle(out, r_out, o_out, name + " out")
    assert_close_to_oracle(mean, r_mean, o_mean, name + " mean")
    assert_close_to_oracle(invstd, r_invstd, o_invstd, name + " invstd")
    # float64 has no wider oracle: the one-pass shifted sums' rounding (conditioned by the mean's
    # distance from the shift) against the reference's, up to 64 ulps
    assert_close_to_oracle(var, r_var, o_var, name + " var", atol_ulps=64.0 if dtype == torch.float64 else 16.0)

    g = _input(shape, grad_layout or layout, dtype, seed + 7, offset)
    gi, gw, gb = ops().bn_relu_bwd(g, x, w, b, mean, invstd, training)
    r_gi, r_gw, r_gb = reference.bn_relu.bn_relu_bwd(g, x, w, b, mean, invstd, training)
    o_gi, o_gw, o_gb = reference.bn_relu.bn_relu_bwd(g.double(), x.double(), _d(w), _d(b), mean.double(),
                                                     invstd.double(), training)
    assert gi.stride() == x.stride(), name
    assert_close_to_oracle(gi, r_gi, o_gi, name + " grad_input")
    assert_close_to_oracle(gw, r_gw, o_gw, name + " grad_weight")
    assert_close_to_oracle(gb, r_gb, o_gb, name + " grad_bias")


@pytest.mark.parametrize("dtype", BN_DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", BN_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_bn_relu_matches_reference(emu, shape, layout, dtype):
    _check_bn(shape, layout, dtype, training=True, affine=True, offset=False, seed=len(shape) + shape[1])


@pytest.mark.parametrize("shape,layout", [((16, 2, 128, 130), "contiguous"), ((33, 4, 64, 64), "channels_last")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bn_relu_many_splits(emu, shape, layout, dtype):
    """Reductions split more than 32 ways per channel: the finish kernels' lanes fold several splits."""
    _check_bn(shape, layout, dtype, training=True, affine=True, offset=False, seed=4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bn_relu_eval_unaligned_no_affine(emu, layout, dtype):
    shape = (3, 16, 6, 6)
    _check_bn(shape, layout, dtype, training=False, affine=True, offset=False, seed=1)
    _check_bn(shape, layout, dtype, training=True, affine=False, offset=True, seed=2)
    _check_bn(shape, layout, dtype, training=False, affine=False, offset=True, seed=3)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,layout,grad_layout", [((4, 8, 5, 6), "channels_last", "contiguous"),
                                                      ((4, 8, 5, 6), "contiguous", "channels_last"),
                                                      ((3, 5, 7, 9), "channels_last", "permuted")], ids=str)
def test_bn_relu_grad_out_in_another_layout(emu, shape, layout, grad_layout, training):
    """grad_out is copied into the input's layout; the input keeps its fast path."""
    _check_bn(shape, layout, torch.float32, training=training, affine=True, offset=False, seed=8,
              grad_layout=grad_layout)


@pytest.mark.parametrize("run_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_running_stats_update_kernel(emu, run_dtype):
    """The CUDA running-statistics kernel (one launch for both statistics) against the CPU op, bitwise:
    both compute in double and round once. Strided running tensors, one of them absent, count 0 and 1,
    more channels than one block of threads."""
    c = 300
    g = torch.Generator().manual_seed(0)
    acc = torch.float64 if run_dtype == torch.float64 else torch.float32
    mean, var = torch.randn(c, generator=g, dtype=acc), torch.rand(c, generator=g, dtype=acc) + 0.1
    for count, which in ((17, "both"), (1, "both"), (0, "both"), (9, "mean"), (9, "var")):
        base_m = torch.randn(2 * c, generator=g).to(run_dtype)
        base_v = (torch.rand(c, generator=g) + 0.5).to(run_dtype)
        outs = []
        for op in (ops().bn_update_running_stats_, torch.ops.torchfast.bn_update_running_stats_):
            rm, rv = base_m.clone()[::2], base_v.clone()  # a strided running_mean
            op(rm if which != "var" else None, rv if which != "mean" else None, mean, var, 0.1, count)
            outs.append((rm, rv))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), (count, which)
        if count == 0:
            assert torch.equal(outs[0][0], base_m[::2]) and torch.equal(outs[0][1], base_v)
        elif which == "both":
            assert not torch.equal(outs[0][0], base_m[::2])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_launch_counts(emu, layout):
    """Kernel launches per op, counted by the emulator: a training forward is one reduction, one finish
    and one elementwise pass (the statistics are written by the finish kernel, not cloned); eval forward
    two; a backward three (reduction, finish, elementwise: the reduction reads the saved statistics
    directly, with no prepare launch); the running-statistics update one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 5, 6, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    rm, rv = torch.zeros(8), torch.ones(8)

    def launches(fn):
        before = emu.launch_count()
        out = fn()
        return emu.launch_count() - before, out
    n, (y, mean, invstd, var) = launches(lambda: ops().bn_relu_fwd(x, w, b, rm, rv, True, 1e-5))
    assert n == 3
    assert launches(lambda: ops().bn_relu_fwd(x, w, b, rm, rv, False, 1e-5))[0] == 2
    assert launches(lambda: ops().bn_relu_bwd(torch.ones_like(x), x, w, b, mean, invstd, True))[0] == 3
    y2 = ops().bn_add_relu_fwd(x, x, w, b, rm, rv, True, 1e-5)[0]
    assert launches(lambda: ops().bn_add_relu_bwd(torch.ones_like(x), y2, x, w, mean, invstd, True))[0] == 3
    assert launches(lambda: ops().bn_add_relu_bwd(torch.ones_like(x), y2, x, w, mean, invstd, False))[0] == 2
    assert launches(lambda: ops().bn_add_relu_fwd(x, x, w, b, rm, rv, True, 1e-5))[0] == 3
    assert launches(lambda: ops().bn_update_running_stats_(rm, rv, mean, var, 0.1, 120))[0] == 1


def test_bn_relu_nan_and_empty(emu):
    x = _input((4, 8, 3, 3), "contiguous", torch.float32, 5)
    x[1, 2, 0, 1] = float("nan")
    out, mean, _, _ = ops().bn_relu_fwd(x, None, None, None, None, True, 1e-5)
    assert torch.isnan(out[:, 2]).all() and torch.isnan(mean[2])
    assert not torch.isnan(out[:, [0, 1, 3]]).any()
    empty = torch.empty(0, 8, 3, 3)
    out, mean, invstd, var = ops().bn_relu_fwd(empty, None, None, None, None, True, 1e-5)
    assert out.shape == empty.shape and torch.isnan(mean).all()
    gi, gw, gb = ops().bn_relu_bwd(empty, empty, None, None, mean, invstd, True)
    r_gi, r_gw, r_gb = reference.bn_relu.bn_relu_bwd(empty, empty, None, None, mean, invstd, True)
    assert gi.shape == empty.shape
    torch.testing.assert_close((gw, gb), (r_gw, r_gb))  # zero, not 0 * the NaN invstd of an empty batch
    for training in (True, False):  # no channels: no launch (a grid of 0 blocks is a CUDA error)
        nochan = torch.empty(2, 0, 3, 3)
        out, mean, invstd, var = ops().bn_relu_fwd(nochan, None, None, torch.empty(0), torch.empty(0), training, 1e-5)
        assert out.shape == nochan.shape and mean.shape == (0,)
        gi, gw, gb = ops().bn_relu_bwd(nochan, nochan, None, None, mean, invstd, training)
        assert gi.shape == nochan.shape and gw.shape == (0,)


def test_bn_relu_argument_errors(emu):
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops().bn_relu_fwd(x, torch.ones(4), None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        ops().bn_relu_bwd(torch.randn(2, 3, 5), x, None, None, torch.zeros(3), torch.ones(3), True)


# --------------------------------------------------------------------------------------------- BN+add+ReLU

def _check_bn_add(shape, layout, dtype, training, affine, offset, seed, res_layout=None, res_offset=None,
                  grad_layout=None, out_layout=None):
    """bn_add_relu_fwd, then bn_add_relu_bwd on its output, against the reference in dtype and in
    float64. The residual, grad_out and the saved output may come in other layouts (or alignments)
    than the input. grad_residual is grad_out masked: it must be exact."""
    x = _input(shape, layout, dtype, seed, offset)
    res = _input(shape, res_layout or layout, dtype, seed + 3, offset if res_offset is None else res_offset)
    c = shape[1]
    w, b, rm, rv = _params(c, dtype, seed)
    if not affine:
        w = b = None
    eps = 1e-5
    out, mean, invstd, var = ops().bn_add_relu_fwd(x, res, w, b, rm, rv, training, eps)
    r_out, r_mean, r_invstd, r_var = reference.bn_relu.bn_add_relu_fwd(x, res, w, b, rm, rv, training, eps)
    o_out, o_mean, o_invstd, o_var = reference.bn_relu.bn_add_relu_fwd(x.double(), res.double(), _d(w), _d(b),
                                                                        _d(rm), _d(rv), training, eps)
    name = "%s %s (residual %s) %s training=%s" % (shape, layout, res_layout or layout, dtype, training)
    assert out.dtype == x.dtype and out.shape == x.shape and out.stride() == x.stride(), name
    assert_close_to_oracle(out, r_out, o_out, name + " out")
    assert_close_to_oracle(mean, r_mean, o_mean, name + " mean")
    assert_close_to_oracle(invstd, r_invstd, o_invstd, name + " invstd")
    # float64 has no wider oracle: the one-pass shifted sums' rounding (conditioned by the mean's
    # distance from the shift) against the reference's, up to 64 ulps
    assert_close_to_oracle(var, r_var, o_var, name + " var", atol_ulps=64.0 if dtype == torch.float64 else 16.0)
    assert (out > 0).any() and (out == 0).any(), name + ": the mask should take both values"

    g = _input(shape, grad_layout or layout, dtype, seed + 7, offset)
    saved = out if out_layout is None else _relayout(out, out_layout)
    gi, gr, gw, gb = ops().bn_add_relu_bwd(g, saved, x, w, mean, invstd, training)
    r_gi, r_gr, r_gw, r_gb = reference.bn_relu.bn_add_relu_bwd(g, saved, x, w, mean, invstd, training)
    # The oracle masks with the same saved output: the mask is part of the contract, not recomputed.
    o_gi, _, o_gw, o_gb = reference.bn_relu.bn_add_relu_bwd(g.double(), saved.double(), x.double(), _d(w),
                                                             mean.double(), invstd.double(), training)
    assert gi.dtype == x.dtype and gi.stride() == x.stride(), name
    assert gr.dtype == x.dtype and gr.shape == x.shape, name
    if layout != "permuted":
        assert gr.stride() == x.stride(), name
    assert torch.equal(gr, r_gr), name + " grad_residual"
    assert_close_to_oracle(gi, r_gi, o_gi, name + " grad_input")
    assert_close_to_oracle(gw, r_gw, o_gw, name + " grad_weight")
    assert_close_to_oracle(gb, r_gb, o_gb, name + " grad_bias")


def _relayout(t, layout):
    """The same values in another memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    assert layout == "permuted"
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("dtype", BN_DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", BN_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_bn_add_relu_matches_reference(emu, shape, layout, dtype):
    _check_bn_add(shape, layout, dtype, training=True, affine=True, offset=False, seed=len(shape) + shape[1])


@pytest.mark.parametrize("dtype", BN_DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", [((6, 5, 7, 7), "contiguous"), ((3, 4, 14, 14), "contiguous"),
                                          ((9, 8, 7, 7), "contiguous"),
                                          ((37, 12), "contiguous"), ((6, 16, 7, 7), "channels_last"),
                                          ((2, 1032, 1, 3), "channels_last"), ((3, 5, 7, 9), "permuted")],
                         ids=lambda v: str(v).replace(" ", ""))
def test_bn_add_relu_eval_matches_reference(emu, shape, layout, dtype):
    """Eval: the backward is the reduction pass alone, which also writes grad_input."""
    _check_bn_add(shape, layout, dtype, training=False, affine=True, offset=False, seed=len(shape) + shape[1] + 1)


@pytest.mark.parametrize("shape,layout", [((16, 2, 128, 130), "contiguous"), ((33, 4, 64, 64), "channels_last")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bn_add_relu_many_splits(emu, shape, layout, dtype):
    """Reductions split more than 32 ways per channel: the finish kernels' lanes fold several splits."""
    _check_bn_add(shape, layout, dtype, training=True, affine=True, offset=False, seed=4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bn_add_relu_eval_unaligned_no_affine(emu, layout, dtype):
    shape = (3, 16, 6, 6)
    _check_bn_add(shape, layout, dtype, training=False, affine=True, offset=False, seed=1)
    _check_bn_add(shape, layout, dtype, training=True, affine=False, offset=True, seed=2)
    _check_bn_add(shape, layout, dtype, training=False, affine=False, offset=True, seed=3)
    # only the residual (and the forward's vector width) unaligned, the input aligned, and the reverse
    _check_bn_add(shape, layout, dtype, training=True, affine=True, offset=False, seed=4, res_offset=True)
    _check_bn_add(shape, layout, dtype, training=False, affine=True, offset=True, seed=5, res_offset=False)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout,res_layout,grad_layout,out_layout", [
    ((4, 8, 5, 6), "contiguous", "channels_last", "channels_last", "channels_last"),
    ((4, 8, 5, 6), "channels_last", "contiguous", "contiguous", "contiguous"),
    ((4, 8, 5, 6), "channels_last", "permuted", "channels_last", "permuted"),
    ((3, 8, 7, 7), "contiguous", "permuted", "permuted", None),
    ((2, 8, 3, 4, 4), "channels_last", "contiguous", "permuted", "contiguous"),
    ((3, 5, 7, 9), "permuted", "channels_last", "contiguous", "contiguous"),
], ids=str)
def test_bn_add_relu_mixed_layouts(emu, shape, layout, res_layout, grad_layout, out_layout, dtype, training):
    """The residual, grad_out and the saved output in other layouts than the input: copied into its
    layout (the input's fast path is kept), same results."""
    _check_bn_add(shape, layout, dtype, training=training, affine=True, offset=False, seed=9, res_layout=res_layout,
                  grad_layout=grad_layout, out_layout=out_layout)


@pytest.mark.parametrize("shape,layout", [((6, 5, 7, 7), "contiguous"), ((3, 12, 5, 3), "channels_last"),
                                          ((37, 12), "contiguous")], ids=str)
@pytest.mark.parametrize("dtype", BN_DTYPES, ids=str)
def test_bn_add_relu_zero_residual_is_bn_relu(emu, shape, layout, dtype):
    """A zero residual adds +0 to fma(x - mean, scale, bias): the forward is bn_relu's, bitwise. In float32 the
    saved output holds that sum exactly, so out > 0 is bn_relu's recomputed mask and the backward
    (the same sums in the same order) is bitwise bn_relu's too."""
    x = _input(shape, layout, dtype, 31)
    w, b, rm, rv = _params(shape[1], dtype, 31)
    for training in (True, False):
        got = ops().bn_add_relu_fwd(x, torch.zeros_like(x), w, b, rm, rv, training, 1e-5)
        want = ops().bn_relu_fwd(x, w, b, rm, rv, training, 1e-5)
        assert all(torch.equal(a, e) for a, e in zip(got, want)), training
        if dtype == torch.float32:
            g = _input(shape, layout, dtype, 32)
            gi, gr, gw, gb = ops().bn_add_relu_bwd(g, got[0], x, w, got[1], got[2], training)
            e_gi, e_gw, e_gb = ops().bn_relu_bwd(g, x, w, b, want[1], want[2], training)
            assert torch.equal(gi, e_gi) and torch.equal(gw, e_gw) and torch.equal(gb, e_gb), training
            assert torch.equal(gr, torch.where(got[0] > 0, g, torch.zeros(())))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,layout", [((6, 5, 7, 7), "contiguous"), ((4, 16, 5, 6), "channels_last"),
                                          ((37, 12), "contiguous")], ids=str)
def test_bn_large_mean_rounds_once(emu, shape, layout, training):
    """|mean| >> std (late ResNet/DenseNet layers; here mean / std ~ 100): every pass normalises as
    fma(x - mean, scale, bias). x - mean is exact here (Sterbenz), so each float32 output is the exact
    value of that expression, with the kernel's own mean and scale = weight * invstd, rounded once
    (plus one rounding for the residual add). The folded x * scale + (bias - mean * scale) would be off
    by ulps of |mean * scale|, about 2^7 ulps of the output. bn_relu's backward recomputes the ReLU
    mask with the forward's expression: its reduction's grad_bias is the sum of dy where the forward's
    output is positive, and in eval dx = dy * k0 is nonzero exactly there."""
    g = torch.Generator().manual_seed(41)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    base = 64 + 64 * torch.rand(c, generator=g, dtype=torch.float64)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + base.view(view)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, _, _ = _params(c, torch.float32, 41)
    rm, rv = base.float(), torch.ones(c)  # eval: running statistics in the same regime
    res = _input(shape, layout, torch.float32, 42)
    dy = _input(shape, layout, torch.float32, 43)
    eps = torch.finfo(torch.float32).eps
    dims = [0] + list(range(2, len(shape)))
    for add in (False, True):
        if add:
            out, mean, invstd, _ = ops().bn_add_relu_fwd(x, res, w, b, rm, rv, training, 1e-5)
        else:
            out, mean, invstd, _ = ops().bn_relu_fwd(x, w, b, rm, rv, training, 1e-5)
        scale = (w * invstd).double()  # the float32 product the kernels use
        pre = (x.double() - mean.double().view(view)) * scale.view(view) + b.double().view(view)
        bound = eps / 2 * pre.abs()
        if add:
            bound = bound + eps / 2 * (pre + res.double()).abs()
            pre = pre + res.double()
        err = (out.double() - pre.clamp_min(0)).abs()
        assert (err <= bound * 1.001 + 1e-30).all(), (add, (err / (bound + 1e-30)).max().item())
        if not add:
            gi, _, gb = ops().bn_relu_bwd(dy, x, w, b, mean, invstd, training)
            want_gb = torch.where(out > 0, dy.double(), 0.0).sum(dims)
            torch.testing.assert_close(gb.double(), want_gb, rtol=0, atol=1e-4)
            if not training:
                assert torch.equal(gi != 0, out > 0)


# ReLU outputs that round to zero: the largest float32 value that rounds to 0 in the output dtype
# (round to nearest even; the value itself is a tie with the smallest subnormal and goes to even, 0).
RELU_ZERO_MAX = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134, torch.float32: 0.0}


def _tiny_pre_relu_case(shape, layout, dtype, offset):
    """Eval-mode bn_relu inputs whose pre-ReLU values v = fma(x - mean, weight * invstd, bias) land on
    and around T = RELU_ZERO_MAX[dtype]: running_var = 1 and eps = 0 make invstd = 1, and x = 0 makes
    x - mean = -mean exact, so channel c's mean puts v exactly (or within one rounding) on its target:
    the smallest float32 subnormal, T / 2, T and its float32 neighbours, 1.5 T, 2 T, 4 T, 0 and
    negatives, under several (weight, bias). The other elements (x = +-1, 0.5, -2) are ordinary.
    Returns x, dy (positive integers), weight, bias, running_mean, running_var and v (float32, as
    the kernel forms it)."""
    g = torch.Generator().manual_seed(77)
    c = shape[1]
    T = RELU_ZERO_MAX[dtype]
    t32 = torch.tensor(T, dtype=torch.float32)
    below = torch.nextafter(t32, torch.tensor(-1.0)).item()
    above = torch.nextafter(t32, torch.tensor(1.0)).item()
    targets = [2.0 ** -149, T / 2, below, T, above, 1.5 * T, 2 * T, 4 * T, 0.0, -(2.0 ** -149), -T, -above]
    variants = [(1.0, 0.0), (0.25, 0.0), (3.0, 0.0), (1.0, T), (0.5, -T), (0.125, T)]
    tgt = torch.tensor([targets[k % len(targets)] for k in range(c)], dtype=torch.float64)
    w = torch.tensor([variants[(k // len(targets)) % len(variants)][0] for k in range(c)], dtype=torch.float64)
    b = torch.tensor([variants[(k // len(targets)) % len(variants)][1] for k in range(c)], dtype=torch.float64)
    rm = (-(tgt - b) / w).float()  # v = fma(0 - rm, w, b) = tgt wherever (tgt - b) / w is a float32
    w, b, rv = w.float(), b.float(), torch.ones(c)
    choices = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    x = choices[torch.randint(0, len(choices), shape, generator=g)]
    dy = torch.randint(1, 5, shape, generator=g).double()
    view = [1, c] + [1] * (len(shape) - 2)
    t = x.float() - rm.view(view)  # float32, as the kernel rounds x - mean
    v = (t.double() * w.double().view(view) + b.double().view(view)).float()  # the fma: exact, then rounded once

    def place(a):
        a = a.to(dtype)
        if offset:  # one element into a larger buffer: not 16-byte aligned, the scalar paths
            buf = torch.empty(a.numel() + 1, dtype=dtype)
            a = buf[1:].view(shape).copy_(a)
        elif layout == "channels_last":
            a = a.contiguous(memory_format=torch.channels_last)
        return a

    return place(x), place(dy), w, b, rm, rv, v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,layout,offset", [((3, 72, 5, 4), "contiguous", False),
                                                 ((3, 72, 5, 4), "channels_last", False),
                                                 ((40, 72), "contiguous", False),
                                                 ((3, 72, 5, 4), "contiguous", True)], ids=str)
def test_bn_relu_backward_mask_is_output_nonzero(emu, shape, layout, offset, dtype):
    """bn_relu's backward recomputes the ReLU mask from x, but the forward's output is relu(v) rounded
    to the input dtype: a positive v up to T = RELU_ZERO_MAX[dtype] (2^-25 in float16, 2^-134 in
    bfloat16) gives an output of exactly 0, and no gradient may pass there (stock PyTorch masks with
    out > 0). The mask is v > T in both backward passes: grad_bias (the reduction's sum of masked dy)
    and grad_input (the elementwise pass: masked dy * weight * invstd in eval) must see gradient
    exactly where the output is nonzero."""
    x, dy, w, b, rm, rv, v = _tiny_pre_relu_case(shape, layout, dtype, offset)
    T = RELU_ZERO_MAX[dtype]
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    dims = [0] + list(range(2, len(shape)))
    out, mean, invstd, _ = ops().bn_relu_fwd(x, w, b, rm, rv, False, 0.0)
    assert torch.equal(invstd, torch.ones(c)) and torch.equal(mean, rm)
    assert torch.equal(out, v.clamp_min(0).to(dtype)), "the forward rounds relu(v) once"
    if T > 0:  # the inputs reach both sides of T: zero outputs from positive v, nonzero just above T
        assert ((v > 0) & (v <= T) & (out == 0)).sum() >= 20
        assert ((v > T) & (v <= 1.5 * T) & (out != 0)).sum() >= 10
        assert (v == T).any() and (v == torch.nextafter(torch.tensor(T), torch.tensor(1.0))).any()
    live = out > 0
    gm = torch.where(live, dy.double(), 0.0)
    want_gb = gm.sum(dims).float()  # small integers: exact in any order
    for training in (False, True):
        gi, gw, gb = ops().bn_relu_bwd(dy, x, w, b, mean, invstd, training)
        assert gi.stride() == x.stride()
        assert torch.equal(gb, want_gb), (training, (gb - want_gb).abs().max().item())
        if not training:  # dx = gm * weight * invstd: exact here, and nonzero exactly where out is
            assert torch.equal(gi, (gm * w.double().view(view)).to(dtype))
            assert torch.equal(gi != 0, live)
        else:  # dx = gm * k0 - k1 - (x - mean) * k2; a wrong mask is off by dy * weight >= weight
            m = out.numel() // c
            xmu = x.double() - mean.double().view(view)
            k1 = w.double() * gm.sum(dims) / m
            k2 = w.double() * (gm * xmu).sum(dims) / m
            want = gm * w.double().view(view) - k1.view(view) - xmu * k2.view(view)
            err = (gi.double() - want).abs()
            tol = want.abs() * 2.0 ** -7 + w.double().view(view) * 2.0 ** -4
            assert (err <= tol).all(), (err / tol).max().item()


def test_bn_add_relu_nan_and_empty(emu):
    x = _input((4, 8, 3, 3), "contiguous", torch.float32, 5)
    res = _input((4, 8, 3, 3), "contiguous", torch.float32, 6)
    x[1, 2, 0, 1] = float("nan")
    res[2, 5, 1, 1] = float("nan")
    out, mean, invstd, _ = ops().bn_add_relu_fwd(x, res, None, None, None, None, True, 1e-5)
    assert torch.isnan(out[:, 2]).all() and torch.isnan(mean[2])
    assert torch.isnan(out[2, 5, 1, 1]) and torch.isnan(out).sum() == out[:, 2].numel() + 1
    g = _input((4, 8, 3, 3), "contiguous", torch.float32, 7)
    gi, gr, gw, gb = ops().bn_add_relu_bwd(g, out, x, None, mean, invstd, True)
    assert (gr[torch.isnan(out)] == 0).all()  # NaN > 0 is false: no gradient through a NaN output
    assert torch.equal(gr, reference.bn_relu.bn_add_relu_bwd(g, out, x, None, mean, invstd, True)[1])
    for training in (True, False):
        empty = torch.empty(0, 8, 3, 3)
        rm, rv = torch.zeros(8), torch.ones(8)
        out, mean, invstd, var = ops().bn_add_relu_fwd(empty, empty, None, None, rm, rv, training, 1e-5)
        r = reference.bn_relu.bn_add_relu_fwd(empty, empty, None, None, rm, rv, training, 1e-5)
        assert out.shape == empty.shape
        torch.testing.assert_close((mean, invstd, var), r[1:], equal_nan=True)  # NaN statistics in training
        gi, gr, gw, gb = ops().bn_add_relu_bwd(empty, out, empty, torch.ones(8), mean, invstd, training)
        r_gi, r_gr, r_gw, r_gb = reference.bn_relu.bn_add_relu_bwd(empty, out, empty, torch.ones(8), mean, invstd,
                                                                   training)
        assert gi.shape == empty.shape and gr.shape == empty.shape
        assert torch.equal(gw, torch.zeros(8)) and torch.equal(gb, torch.zeros(8))  # zero, not NaN
        torch.testing.assert_close((gw, gb), (r_gw, r_gb))
        nochan = torch.empty(2, 0, 3, 3)  # no channels: no launch (a grid of 0 blocks is a CUDA error)
        out, mean, invstd, var = ops().bn_add_relu_fwd(nochan, nochan, None, None, torch.empty(0), torch.empty(0),
                                                       training, 1e-5)
        assert out.shape == nochan.shape and mean.shape == (0,)
        gi, gr, gw, gb = ops().bn_add_relu_bwd(nochan, out, nochan, None, mean, invstd, training)
        assert gi.shape == nochan.shape and gr.shape == nochan.shape and gw.shape == (0,) and gb.shape == (0,)


def test_bn_add_relu_argument_errors(emu):
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="residual has shape"):
        ops().bn_add_relu_fwd(x, torch.randn(2, 3, 5), None, None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="residual is"):
        ops().bn_add_relu_fwd(x, torch.randn(2, 3, 4, dtype=torch.float64), None, None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="eval mode needs running_mean"):
        ops().bn_add_relu_fwd(x, x, None, None, None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out has shape"):
        ops().bn_add_relu_bwd(torch.randn(2, 3, 5), x, x, None, torch.zeros(3), torch.ones(3), True)
    with pytest.raises(RuntimeError, match="out is"):
        ops().bn_add_relu_bwd(x, x.half(), x, None, torch.zeros(3), torch.ones(3), True)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops().bn_add_relu_bwd(x, x, x, torch.ones(4), torch.zeros(3), torch.ones(3), True)


# --------------------------------------------------------------------------------------------- clipping

def _offset_view(t):
    """The same values in a view one element into a larger buffer: not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def _grads(sizes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(n, generator=g, dtype=torch.float64) * 0.1).to(dtype) for n in sizes]
    return [_offset_view(t) if i % 3 == 1 else t for i, t in enumerate(out)]  # aligned and unaligned


# The emulated build uses 5 tensors and 7 blocks of 1028 elements per launch: these lists need
# several launches, split tensors across launches and hold empty tensors.
CLIP_SIZES = [
    [1],
    [3000, 5, 0, 2057, 1028, 7, 9, 4100, 11, 13],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
]


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("sizes", CLIP_SIZES, ids=["one", "mixed", "many"])
def test_multi_tensor_norm_and_clip(emu, sizes, dtype, norm_type):
    if norm_type == float("inf") and 0 in sizes:
        sizes = [n for n in sizes if n]
    grads = _grads(sizes, dtype, len(sizes))
    total = ops().multi_tensor_norm(grads, norm_type)
    want = reference.clip_grad.multi_tensor_norm(grads, norm_type)
    oracle = reference.clip_grad.multi_tensor_norm([t.double() for t in grads], norm_type)
    assert_close_to_oracle(total.reshape(1), want.reshape(1), oracle.reshape(1), "norm")
    for max_norm in (float(want) * 0.3, float(want) * 2.0):
        got = [t.clone() for t in grads]
        ref = [t.clone() for t in grads]
        ops().multi_tensor_clip_(got, want.clone(), max_norm)
        reference.clip_grad.multi_tensor_clip_(ref, want.clone(), max_norm)
        for a, r, orig in zip(got, ref, grads):
            if max_norm > float(want):
                assert torch.equal(a, orig)  # coefficient 1: nothing written
            else:
                torch.testing.assert_close(a, r, rtol=2 * torch.finfo(dtype).eps, atol=0)
                assert not torch.equal(a, orig) or not orig.any()
    got = [t.clone() for t in grads]  # (clones are aligned: the vector paths, another summation order)
    same_list_total = ops().multi_tensor_norm(got, norm_type)
    fused_total = ops().clip_grad_norm_fused_(got, float(want) * 0.5, norm_type)
    assert torch.equal(fused_total, same_list_total)


def test_clip_scales_gradients_sharing_memory_once_per_listing(emu):
    """A gradient listed twice and overlapping views of one block go to separate launches (the blocks
    of one launch write at once): each element is multiplied once per listing, as the reference does.
    (The emulator runs a launch's blocks one after another, so this checks the split's results; the
    race it prevents shows on a GPU and in the CPU test of test_clip_grad.)"""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(9000, generator=g)
    other = torch.randn(2057, generator=g)

    def lists(b, o):
        return [b[:4100], o, b[2000:6100], b[:4100], b[6100:], b[1:2]]

    got_base, got_other = base.clone(), other.clone()
    ref_base, ref_other = base.clone(), other.clone()
    norm = torch.tensor(500.0)
    ops().multi_tensor_clip_(lists(got_base, got_other), norm, 1.0)
    reference.clip_grad.multi_tensor_clip_(lists(ref_base, ref_other), norm, 1.0)
    assert torch.equal(got_base, ref_base) and torch.equal(got_other, ref_other)


# --------------------------------------------------------------------------------------------- init

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_philox_fill_matches_reference(emu, dtype):
    sizes = [5000, 3, 0, 1029, 4, 7, 2100, 1, 9, 17]
    kinds = [0, 1, 0, 2, 3, 0, 1, 2, 0, 1]  # uniform, normal, trunc_normal, constant
    params = []
    for k in kinds:
        p = {0: (-0.5, 1.5, 0, 0, 0, 0), 1: (0.1, 2.0, 0, 0, 0, 0),
             2: torchfast.init._trunc_normal_spec(0.1, 0.9, -2.0, 2.5)[1], 3: (0.25, 0, 0, 0, 0, 0)}[k]
        params += torchfast.init._params_f64(k, p) if dtype == torch.float64 else p + (0, 0)
    streams = [11 * i + 3 for i in range(len(sizes))]
    got = [torch.full((n,), 7.0, dtype=dtype) for n in sizes]
    got = [_offset_view(t) if i % 4 == 1 else t for i, t in enumerate(got)]  # vector and scalar stores
    want = [torch.full((n,), 7.0, dtype=dtype) for n in sizes]
    ops().philox_fill_(got, 1234, streams, kinds, params)
    reference.philox.philox_fill_(want, 1234, streams, kinds, params)
    for i, (a, b) in enumerate(zip(got, want)):
        if kinds[i] in (1, 2) and dtype == torch.float64:  # the full-precision stream: libm's log, erf, erfc, exp
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14, msg="tensor %d" % i)
        else:  # the float32 stream: the same bits for every distribution
            assert torch.equal(a, b), "tensor %d (kind %d)" % (i, kinds[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_philox_fill_views_at_every_offset(emu, dtype):
    """Views at element offsets 1, 2 and 3 of a buffer (their aligned vectors straddle two Philox
    blocks: the warp-shuffle path), sized around the chunk (1028 elements under emulation) and the
    31-vector warp step, every distribution: the reference's values, and nothing outside the views."""
    sizes = [1, 2, 3, 5, 123, 124, 125, 1027, 1028, 1029, 2 * 1028 + 7]
    for offset in (1, 2, 3):
        buf = torch.full((sum(sizes) + 8 * len(sizes),), 7.0, dtype=dtype)
        ref_buf = buf.clone()
        views, ref_views, at = [], [], offset
        for n in sizes:
            views.append(buf[at:at + n])
            ref_views.append(ref_buf[at:at + n])
            at = (at + n + 8) // 8 * 8 + offset  # every view at the same offset from a 16-byte boundary
        kinds = [i % 3 for i in range(len(sizes))]
        params = []
        for k in kinds:
            p = {0: [-0.5, 1.5], 1: [0.1, 2.0], 2: [-0.9, 0.95, -2.0, 2.0, 0.1, 1.4]}[k]
            params += p + [0] * (8 - len(p))
        streams = [5 * i + 1 for i in range(len(sizes))]
        ops().philox_fill_(views, 77, streams, kinds, params)
        reference.philox.philox_fill_(ref_views, 77, streams, kinds, params)
        assert torch.equal(buf, ref_buf), offset


def test_philox_fill_is_the_cpu_backend_stream(emu, cpu_backend_built):
    sizes = [4097, 13]
    got = [torch.empty(n) for n in sizes]
    want = [torch.empty(n) for n in sizes]
    args = (99, [5, 6], [0, 0], [0.0, 1.0, 0, 0, 0, 0, 0, 0] * 2)
    ops().philox_fill_(got, *args)
    torch.ops.torchfast.philox_fill_(want, *args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# --------------------------------------------------------------------------------------------- determinism

def _all_outputs(shape, layout, dtype):
    x = _input(shape, layout, dtype, 21)
    w, b, rm, rv = _params(shape[1], dtype, 21)
    out, mean, invstd, var = ops().bn_relu_fwd(x, w, b, rm, rv, True, 1e-5)
    g = _input(shape, layout, dtype, 22)
    grads = ops().bn_relu_bwd(g, x, w, b, mean, invstd, True)
    res = _input(shape, layout, dtype, 23)
    add_fwd = ops().bn_add_relu_fwd(x, res, w, b, rm, rv, True, 1e-5)
    add_grads = ops().bn_add_relu_bwd(g, add_fwd[0], x, w, add_fwd[1], add_fwd[2], True)
    add_eval = ops().bn_add_relu_fwd(x, res, w, b, rm, rv, False, 1e-5)
    add_eval_grads = ops().bn_add_relu_bwd(g, add_eval[0], x, w, add_eval[1], add_eval[2], False)
    tensors = _grads([3000, 5, 2057, 7], dtype, 3)
    norm = ops().multi_tensor_norm(tensors, 2.0)
    ops().multi_tensor_clip_(tensors, norm, 0.1)
    filled = [torch.empty(n, dtype=dtype) for n in (2100, 9)]
    ops().philox_fill_(filled, 5, [1, 2], [1, 2], [0.0, 1.0, 0, 0, 0, 0, 0, 0, -0.9, 0.9, -2.0, 2.0, 0.0, 1.4, 0, 0])
    return [out, mean, invstd, var, *grads, *add_fwd, *add_grads, *add_eval, *add_eval_grads, norm, *tensors,
            *filled]


@pytest.mark.parametrize("shape,layout", [((16, 2, 128, 130), "contiguous"), ((33, 4, 64, 64), "channels_last"),
                                          ((6, 5, 7, 7), "contiguous")], ids=str)
def test_results_do_not_depend_on_thread_order(emu, shape, layout):
    """The fibers of each block resumed in thread order, in reverse and shuffled: a race (a read of
    shared data another thread has not yet written, or not yet finished with) changes the result;
    the kernels are deterministic, so every output must be bitwise identical."""
    runs = []
    try:
        for schedule in (0, 1, 2):
            emu.set_schedule(schedule)
            runs.append(_all_outputs(shape, layout, torch.float32))
    finally:
        emu.set_schedule(0)
    for schedule, run in zip((1, 2), runs[1:]):
        for i, (a, b) in enumerate(zip(runs[0], run)):
            assert torch.equal(a, b) or (torch.isnan(a).any() and torch.equal(a.isnan(), b.isnan())), (schedule, i)


# ------------------------------------------------------------------------------------- memory traffic

# Activation-sized passes per op (reads, writes), as documented at the top of csrc/cuda/bn_relu.cu.
_PASSES = {
    ("bn_relu", "train fwd"): (2, 1), ("bn_relu", "eval fwd"): (1, 1), ("bn_relu", "train bwd"): (4, 1),
    ("bn_add_relu", "train fwd"): (3, 1), ("bn_add_relu", "eval fwd"): (2, 1),
    ("bn_add_relu", "train bwd"): (5, 2), ("bn_add_relu", "eval bwd"): (3, 2),
}


def _traffic(emu, fn):
    """fn()'s launches as [(requests, sectors, useful bytes, distinct bytes read, distinct bytes written)]."""
    emu.set_traffic(True)
    try:
        fn()
        return emu.traffic_log()
    finally:
        emu.set_traffic(False)


@pytest.mark.parametrize("shape", [(4, 64, 7, 7), (2, 32, 14, 14), (3, 16, 20, 24), (16, 64, 2, 2)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bn_memory_traffic(emu, shape, layout, dtype):
    """What each BatchNorm op moves, by the emulator's memory model: the activation bytes are the
    documented passes (within 5 %: sector rounding at row ends), the reduction workspace is counted
    apart (written once, read once by the finish kernel; the emulator splits far more finely than a GPU
    would, see kRowsPerThread), and the warp-level requests are coalesced: at least 90 % of the bytes of
    the 32-byte sectors they touch are bytes the threads asked for."""
    x = _input(shape, layout, dtype, 3)
    r = _input(shape, layout, dtype, 4)
    dy = _input(shape, layout, dtype, 5)
    w, b, rm, rv = _params(shape[1], dtype, 6)
    T = x.numel() * x.element_size()
    o = ops()
    _, mean, invstd, _ = o.bn_relu_fwd(x, w, b, rm, rv, True, 1e-5)
    y_add = o.bn_add_relu_fwd(x, r, w, b, rm, rv, True, 1e-5)[0]
    calls = {
        ("bn_relu", "train fwd"): lambda: o.bn_relu_fwd(x, w, b, rm, rv, True, 1e-5),
        ("bn_relu", "eval fwd"): lambda: o.bn_relu_fwd(x, w, b, rm, rv, False, 1e-5),
        ("bn_relu", "train bwd"): lambda: o.bn_relu_bwd(dy, x, w, b, mean, invstd, True),
        ("bn_add_relu", "train fwd"): lambda: o.bn_add_relu_fwd(x, r, w, b, rm, rv, True, 1e-5),
        ("bn_add_relu", "eval fwd"): lambda: o.bn_add_relu_fwd(x, r, w, b, rm, rv, False, 1e-5),
        ("bn_add_relu", "train bwd"): lambda: o.bn_add_relu_bwd(dy, y_add, x, w, mean, invstd, True),
        ("bn_add_relu", "eval bwd"): lambda: o.bn_add_relu_bwd(dy, y_add, x, w, mean, invstd, False),
    }
    for key, fn in calls.items():
        log = _traffic(emu, fn)
        reads, writes = _PASSES[key]
        minimal = (reads + writes) * T
        total = sum(rb + wb for _, _, _, rb, wb in log)
        # the reductions' second launch is the finish kernel: what it reads is the workspace
        workspace = 2 * log[1][3] if key[1] in ("train fwd", "train bwd", "eval bwd") else 0
        what = "%s %s %s %s %s" % (key, shape, layout, dtype, log)
        assert total - workspace <= 1.05 * minimal, what
        assert total - workspace >= 0.95 * minimal, what  # the model sees every pass
        useful = sum(u for _, _, u, _, _ in log)
        sectors = sum(s for _, s, _, _, _ in log)
        # Contiguous maps whose rows are not whole vectors (7x7: 196 bytes in fp32, 98 in bf16) or are
        # short (2x2: 16 bytes in fp32, 8 in bf16) take the channel-group reduction: a group of channels'
        # rows is one aligned span, read in whole sectors (before: one element per load and warp runs
        # crossing row ends, 0.56-0.90 at 7x7; each row's half sector at 2x2, 0.46-0.48).
        floor = 0.9
        assert useful >= floor * 32 * sectors, what


def test_clip_and_init_memory_traffic(emu):
    """Multi-tensor norm reads every gradient once, clip reads and writes it once, init writes every
    tensor once (within 5 %: sector rounding at tensor ends; the partials are 4 bytes per chunk), all
    with coalesced requests (>= 90 % of the sector bytes used), misaligned views included."""
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(20000, generator=g)
    tensors = [torch.randn(s, generator=g) for s in (4099, 33, 1, 6000)] + [buf[1:7001], buf[7003:7003 + 5000]]
    o = ops()

    def check(log, tensors, reads, writes, what, efficiency=0.9):
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        total_r = sum(rb for *_, rb, _ in log)
        total_w = sum(wb for *_, wb in log)
        assert reads * nbytes <= total_r <= 1.05 * reads * nbytes + 1024, (what, log)
        assert writes * nbytes <= total_w <= 1.05 * writes * nbytes + 1024, (what, log)
        assert sum(u for _, _, u, _, _ in log) >= efficiency * 32 * sum(s for _, s, _, _, _ in log), (what, log)
    check(_traffic(emu, lambda: o.multi_tensor_norm(tensors, 2.0)), tensors, 1, 0, "norm")
    total = torch.tensor(1e6)
    check(_traffic(emu, lambda: o.multi_tensor_clip_(tensors, total, 1.0)), tensors, 1, 1, "clip")
    # init writes a Philox block of 4 elements per thread as one 16-byte store; a misaligned view's
    # vectors straddle two blocks (warp shuffles), still one contiguous run of stores per warp (before:
    # 4 scalar stores per thread, 16 bytes apart, a quarter of each sector).
    for ts in (tensors[:4], tensors):
        n = len(ts)
        check(_traffic(emu, lambda: o.philox_fill_(ts, 7, list(range(n)), [0] * n, [0.0, 1.0, 0, 0, 0, 0, 0, 0] * n)),
              ts, 0, 1, "init")
    misaligned = [buf[2:2 + 3001], buf[5003:5003 + 4000]]  # offsets 2 and 3 (fp32)
    check(_traffic(emu, lambda: o.philox_fill_(misaligned, 7, [0, 1], [1, 1], [0.0, 1.0, 0, 0, 0, 0, 0, 0] * 2)),
          misaligned, 0, 1, "init")


def test_misaligned_vector_access_faults(emu):
    """A vector load at an address that is not a multiple of its size faults in the emulator, as on a GPU
    (the kernels pick their vector width from the pointers' alignment; this shows a wrong pick would
    not pass silently)."""
    with pytest.raises(RuntimeError, match="misaligned"):
        emu.emulator_self_test("misaligned")
