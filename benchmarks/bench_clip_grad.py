"""Gradient clipping: each torchfast drop-in against its torch.nn.utils original (foreach), on real
architectures' gradient lists, on 1 and 2 CPU threads (on a GPU: the device):

  op "clip"         clip_grad_norm_, when it clips (p = 2 and inf) and when it does not (p = 2)
  op "total_norm"   get_total_norm (p = 2)
  op "clip_wnorm"  clip_grads_with_norm_, when it clips and when it does not

FSDP-style loops call the last two separately, so each must hold on its own. A call that clips must
write every gradient; so that repeated calls keep clipping without shrinking the values to nothing,
each timed call is preceded (untimed) by doubling the gradients (exact in floating point) and clips
them back to the original norm. Stock compiled (torch.compile) is timed for clip_grad_norm_, p = 2.
The implementations take turns call by call (median of each).

Bytes of the minimal algorithm (T = bytes of all gradients): norm T, scale 2T, clip_grad_norm_ 3T
when it clips and T when it does not (a coefficient of 1 leaves the gradients as they are).
"""
import math

import torch

import torchfast

import common
import shapes as S

LISTS = {"resnet50 (161)": S.resnet50, "gpt2-small (148)": S.gpt2_small, "2000 x 64": S.small_tensors}

# (op, case label, norm_type, clips?)
FUNCTIONS = [("clip", "p=2 clips", 2.0, True), ("clip", "p=inf clips", math.inf, True),
             ("clip", "p=2 no clip", 2.0, False), ("total_norm", "p=2", 2.0, None),
             ("clip_wnorm", "clips", 2.0, True), ("clip_wnorm", "no clip", 2.0, False)]


def _params(shape_list, device, dtype):
    g = torch.Generator().manual_seed(0)
    ps = []
    for s in shape_list:
        p = torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype))
        p.grad = torch.randn(s, generator=g).to(device=device, dtype=dtype)
        ps.append(p)
    return ps


def cases(device, quick, dtypes=None):
    dtypes = dtypes or ([torch.float32] if quick and device.type == "cpu" else [torch.float32, torch.bfloat16])
    threads = (None,) if device.type == "cuda" else (1, 2)
    for name in LISTS:
        for dtype in dtypes:
            for fn in FUNCTIONS:
                for t in threads:
                    yield name, dtype, fn, t


def _calls(op, norm_type, clips, ps, grads, norm0, torch_fn, fast):
    """(setup, stock call, torchfast call) for one function and case."""
    if op == "total_norm":
        return (lambda: None, lambda: torch.nn.utils.get_total_norm(grads, norm_type),
                lambda: fast(torchfast.get_total_norm, grads, norm_type))
    if clips:
        def setup():
            torch._foreach_mul_(grads, 2.0)  # back to twice the original norm: the call halves it
        max_norm = norm0
    else:
        def setup():
            pass
        max_norm = 1e30
    if op == "clip":
        return (setup, lambda: torch_fn(ps, max_norm, norm_type),
                lambda: fast(torchfast.clip_grad_norm_, ps, max_norm, norm_type))
    # clip_grads_with_norm_ is given the norm the gradients have (a tensor, as stock requires)
    twice = torch.tensor(norm0 * 2 if clips else norm0, device=grads[0].device)
    return (setup, lambda: torch.nn.utils.clip_grads_with_norm_(ps, max_norm, twice),
            lambda: fast(torchfast.clip_grads_with_norm_, ps, max_norm, twice))


def run(device, quick=True, dtypes=None, compile_stock=True, backends=None, progress=None, out_dir=None):
    device = torch.device(device)
    copy_bw = common.copy_bandwidth(device)
    backends = backends or [b for b in torchfast.available_backends(device) if b != "reference"]
    rows = []
    all_cases = list(cases(device, quick, dtypes))
    threads_before = torch.get_num_threads()
    params = {}
    compiled = {}
    reps = 9 if quick else 21
    try:
        for name, dtype, (op, label, norm_type, clips), nthreads in all_cases:
            if nthreads is not None:
                torch.set_num_threads(nthreads)
            if (name, dtype) not in params:
                params.clear()  # one list in memory at a time
                params[(name, dtype)] = _params(LISTS[name](), device, dtype)
            ps = params[(name, dtype)]
            grads = [q.grad for q in ps]
            norm0 = {p: float(torch.nn.utils.get_total_norm(grads, p)) for p in (2.0, math.inf)}[norm_type]
            t_bytes = common.nbytes_of(grads)
            nbytes = {"total_norm": t_bytes, "clip_wnorm": 2 * t_bytes if clips else 0,
                      "clip": 3 * t_bytes if clips else t_bytes}[op]
            impls = []
            for b in backends:
                def fast(fn, *args, b=b):
                    with torchfast.use_backend(b):
                        return fn(*args)
                setup, stock_call, fast_call = _calls(op, norm_type, clips, ps, grads, norm0,
                                                      torch.nn.utils.clip_grad_norm_, fast)
                if not impls:
                    impls.append(("stock eager", setup, stock_call))
                    # Compiling the stock clip costs ~20 s per list on a 2-core CPU (minutes for the
                    # 2000-tensor list, one graph input each): p = 2, clipping, real architectures only.
                    if (compile_stock and op == "clip" and label == "p=2 clips"
                            and not (quick and name == "2000 x 64")):
                        key = (name, dtype)
                        if key not in compiled:
                            compiled[key] = common.try_compile(torch.nn.utils.clip_grad_norm_)
                        if compiled[key] is not None:
                            _, comp_call, _ = _calls(op, norm_type, clips, ps, grads, norm0, compiled[key], fast)
                            impls.append(("stock compile", setup, comp_call))
                impls.append(("torchfast " + b, setup, fast_call))
            case = label + ("" if nthreads is None else " %dt" % nthreads)
            try:
                medians = common.bench_interleaved(impls, device, reps)
            except Exception as e:  # noqa: BLE001
                print("\n%s %s failed: %s" % (name, case, str(e).splitlines()[0][:200]))
                continue
            for impl, t in medians.items():
                rows.append(common.make_row(device, op, case, name, dtype, "-", impl, t, nbytes, copy_bw))
            if progress:
                progress.step("%s %s %s" % (op, name, case))
    finally:
        torch.set_num_threads(threads_before)
    return rows, len(all_cases)


def count(device, quick, dtypes=None):
    return len(list(cases(torch.device(device), quick, dtypes)))


if __name__ == "__main__":
    common.standalone(run)
