"""Batched init: one torchfast.init call over a whole parameter list vs a per-tensor torch.nn.init loop,
and whole-model construction (stock constructor vs meta-device construction + torchfast reset).

Bytes of the minimal algorithm: one write of every tensor (T). torch.compile is not compared: stock
init is a loop of in-place RNG calls with nothing to fuse.
"""
import math
import time

import torch
from torch import nn

import torchfast

import common
import shapes as S


class GPT2Small(nn.Module):
    """GPT-2 small's parameter structure (embeddings, 12 blocks of LN/attention/MLP linears, LN)."""

    def __init__(self, d=768, layers=12, vocab=50257, ctx=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(d), attn=nn.Linear(d, 3 * d), proj=nn.Linear(d, d),
                ln2=nn.LayerNorm(d), fc=nn.Linear(d, 4 * d), out=nn.Linear(4 * d, d))))
        self.ln_f = nn.LayerNorm(d)


class GPT2Medium(GPT2Small):
    """GPT-2 medium's parameter structure: 24 blocks of width 1024."""

    def __init__(self):
        super().__init__(d=1024, layers=24)


def _tensors(shape_list, device, dtype, min_dim=1):
    return [torch.empty(s, device=device, dtype=dtype) for s in shape_list if len(s) >= min_dim]


def cases(device, quick):
    yield "kaiming_uniform", "gpt2-small weights"
    yield "normal(0,0.02)", "gpt2-small (148)"
    yield "trunc_normal(0.02)", "gpt2-small (148)"
    if not quick:
        yield "kaiming_normal", "resnet50 convs"
    yield "construct model", "GPT2Small"
    if not quick:  # GPT-2 medium's structure (24 x 1024, 355M parameters): ~5 s per stock build on 2 cores
        yield "construct model", "GPT2Medium"
        for name in _LIBRARY_MODELS:  # real models with their own init code (stock vs fast_init only)
            if _library_model(name) is not None:
                yield "construct model", name
        # A user builds a model once per process: the first build there, into memory the process has
        # never touched, with whatever one-time costs the first call pays (imports, page faults).
        for name in ["GPT2Medium"] + list(_LIBRARY_MODELS):
            if name == "GPT2Medium" or _library_model(name) is not None:
                yield "construct model, new process", name


# name -> (module, constructor): torchvision and timm models built with their own init, when installed.
_LIBRARY_MODELS = {"torchvision resnet50": ("torchvision", lambda tv: tv.models.resnet50()),
                   "timm vit_tiny": ("timm", lambda timm: timm.create_model("vit_tiny_patch16_224")),
                   "timm resnet50": ("timm", lambda timm: timm.create_model("resnet50"))}


def _library_model(name):
    """A constructor for a _LIBRARY_MODELS entry, or None when its library is missing."""
    import importlib
    module, make = _LIBRARY_MODELS[name]
    try:
        lib = importlib.import_module(module)
    except ImportError:
        return None
    return lambda: make(lib)


def _constructor(what):
    if what in _LIBRARY_MODELS:
        return _library_model(what)
    return {"GPT2Small": GPT2Small, "GPT2Medium": GPT2Medium}[what]


def _new_process_build(what, impl, backend, device):
    """Seconds of one build of `what` in a new Python process, imports and device set-up excluded:
    stock constructor (impl "stock") or fast_init with `backend`."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, __file__, "--one-build", what, impl, backend or "-", str(device)],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError("new-process build of %s (%s) failed:\n%s" % (what, impl, out.stderr[-2000:]))
    return float(out.stdout.split()[-1])


def _one_build(what, impl, backend, device):
    device = torch.device(device)
    make = _constructor(what)
    torch.empty(1, device=device)  # device set-up (a CUDA context) is not the build's
    common.sync(device)
    t0 = time.perf_counter()
    if impl == "stock":
        with torch.device(device):
            m = make()
    else:
        with torchfast.use_backend(backend), torchfast.init.fast_init(seed=0, device=device):
            m = make()
    common.sync(device)
    print("%.6f" % (time.perf_counter() - t0))
    return m


def run(device, quick=True, dtypes=None, compile_stock=False, backends=None, progress=None, out_dir=None):
    device = torch.device(device)
    copy_bw = common.copy_bandwidth(device)
    backends = backends or [b for b in torchfast.available_backends(device) if b != "reference"]
    dtype = torch.float32
    rows = []
    all_cases = list(cases(device, quick))
    for case, what in all_cases:
        impls = []
        if case == "construct model, new process":
            with torch.device("meta"):
                nbytes = 4 * sum(p.numel() for p in _constructor(what)().parameters())
            runs = [("stock eager", "stock", None)] + [("fast_init " + b, "fast_init", b) for b in backends]
            times = {name: [] for name, _, _ in runs}
            for i in range(3):  # the processes take turns; the median of 3 each
                for name, impl, b in runs[i % len(runs):] + runs[:i % len(runs)]:
                    times[name].append(_new_process_build(what, impl, b, device))
            for name, _, _ in runs:
                rows.append(common.make_row(device, "init", case, what, dtype, "-", name,
                                            sorted(times[name])[1], nbytes, copy_bw))
            if progress:
                progress.step("init %s" % case)
            continue
        if case == "construct model" and what in _LIBRARY_MODELS:
            make = _library_model(what)
            with torch.device("meta"):
                nbytes = 4 * sum(p.numel() for p in make().parameters())
            impls.append(("stock eager", lambda: make().to(device)))
            for b in backends:
                def build_lib(b=b):
                    with torchfast.use_backend(b), torchfast.init.fast_init(seed=0, device=device):
                        return make()
                impls.append(("fast_init " + b, build_lib))
        elif case == "construct model":
            model_cls = GPT2Small if what == "GPT2Small" else GPT2Medium
            with torch.device("meta"):
                nbytes = 4 * sum(p.numel() for p in model_cls().parameters())
            impls.append(("stock eager", lambda: model_cls().to(device) if device.type != "cpu" else model_cls()))
            for b in backends:
                def build(b=b):
                    with torch.device("meta"):
                        m = model_cls()
                    m.to_empty(device=device)
                    with torchfast.use_backend(b):
                        torchfast.init.reset_parameters(m)
                    return m
                impls.append(("torchfast " + b, build))

                def build_fast(b=b):  # the model's own init code, fills recorded and batched
                    with torchfast.use_backend(b), torchfast.init.fast_init(seed=0, device=device):
                        return model_cls()
                impls.append(("fast_init " + b, build_fast))
        else:
            if case == "kaiming_normal":
                ts = _tensors([s for s in S.resnet50() if len(s) == 4], device, dtype)
            else:
                ts = _tensors(S.gpt2_small(), device, dtype, min_dim=2 if case == "kaiming_uniform" else 1)
            nbytes = common.nbytes_of(ts)
            stock_fn, fast_fn = {
                "kaiming_uniform": (lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)),
                                    lambda l: torchfast.init.kaiming_uniform_(l, a=math.sqrt(5))),
                "normal(0,0.02)": (lambda t: nn.init.normal_(t, 0.0, 0.02),
                                   lambda l: torchfast.init.normal_(l, 0.0, 0.02)),
                "trunc_normal(0.02)": (lambda t: nn.init.trunc_normal_(t, std=0.02),
                                       lambda l: torchfast.init.trunc_normal_(l, std=0.02)),
                "kaiming_normal": (lambda t: nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu"),
                                   lambda l: torchfast.init.kaiming_normal_(l, mode="fan_out", nonlinearity="relu")),
            }[case]

            def stock(ts=ts, stock_fn=stock_fn):
                for t in ts:
                    stock_fn(t)
            impls.append(("stock eager", stock))
            for b in backends:
                def fast(b=b, ts=ts, fast_fn=fast_fn):
                    with torchfast.use_backend(b):
                        fast_fn(ts)
                impls.append(("torchfast " + b, fast))
        if case == "construct model" and device.type == "cpu":
            # Builds take turns in rotating order: a build's time on this VM moves with the page-fault
            # cost of its fresh memory, which depends on what ran just before (measured: the build right
            # after another build's memory was freed is 2-3x faster). The median of 9 rounds.
            times = common.bench_interleaved([(impl, lambda: None, fn) for impl, fn in impls], device, reps=9,
                                             warmup=1, rotate=True)
            for impl, _ in impls:
                rows.append(common.make_row(device, "init", case, what, dtype, "-", impl, times[impl], nbytes,
                                            copy_bw))
        else:
            for impl, fn in impls:
                t = common.bench(fn, device, reps=5 if device.type == "cpu" else None, warmup=1)
                rows.append(common.make_row(device, "init", case, what, dtype, "-", impl, t, nbytes, copy_bw))
        if progress:
            progress.step("init %s" % case)
    return rows, len(all_cases)


def count(device, quick, dtypes=None):
    return len(list(cases(torch.device(device), quick)))


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 1 and sys.argv[1] == "--one-build":  # _new_process_build's child
        _, _, what, impl, backend, device = sys.argv
        _one_build(what, impl, None if backend == "-" else backend, device)
    else:
        common.standalone(run)
