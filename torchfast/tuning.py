"""Measure which GPU backend, ``cuda`` (C++) or ``triton``, is faster for each op on this GPU.

    import torchfast.tuning
    result = torchfast.tuning.autotune_backends(save="~/.torchfast-choice.json")
    # later runs: TORCHFAST_BACKEND_CHOICE=~/.torchfast-choice.json python train.py

or from a shell: ``python -m torchfast.tuning --save choice.json``.

Each op is timed on a representative workload (ResNet-50 stage-2 BatchNorm+ReLU training step in
both layouts; clipping and init on a GPT-2-small-like parameter list), in float32 and bfloat16, with
CUDA events, median of several repetitions after warm-up (which also runs Triton's autotuning).
The backend with the lower total time wins the op; the choice then applies to automatic backend
selection on CUDA tensors for the rest of the process (``apply=True``) and is written to ``save``.
"""
import argparse
import json
import os
import statistics

import torch

import torchfast
from torchfast import _backends

DTYPES = (torch.float32, torch.bfloat16)


def cuda_time_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() on the current CUDA stream, by CUDA events, after `warmup` calls
    (compilation, autotuning, the caching allocator)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _gpt2_like_shapes(scale: float):
    """GPT-2 small's parameter shapes (148 tensors, 124M elements at scale 1); the layer count and
    vocabulary shrink with scale."""
    d, v, layers = 768, max(1024, int(50257 * scale)), max(1, int(12 * scale))
    shapes = [(v, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def _workloads(device, dtype, scale: float):
    """{op: fn} running the op once through the public API under the active backend."""
    n = max(2, int(32 * scale))
    x = torch.randn(n, 256, 56, 56, device=device, dtype=dtype)
    xs = [x, x.contiguous(memory_format=torch.channels_last)]
    grad = torch.randn_like(x)
    grads = [grad, grad.contiguous(memory_format=torch.channels_last)]
    layer = torchfast.nn.BatchNormReLU2d(256).to(device)

    def bn_relu():
        for inp, g in zip(xs, grads):
            layer(inp.detach().requires_grad_(True)).backward(g)

    params = [torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in _gpt2_like_shapes(scale)]
    for p in params:
        p.grad = torch.randn_like(p)

    def clip_grad():  # after the first call the norm is 0.5, so every call still reads and scales all
        torchfast.clip_grad_norm_(params, 0.5)

    weights = [p.data for p in params]

    def init():
        torchfast.init.normal_(weights, 0.0, 0.02)

    return {"bn_relu": bn_relu, "clip_grad": clip_grad, "init": init}


def autotune_backends(device="cuda", ops=None, save=None, apply=True, scale=1.0, reps=10, verbose=False):
    """Time the ``cuda`` and ``triton`` backends of each op on `device` and prefer the faster.

    Returns ``{"device": name, "ops": {op: {"cuda": ms, "triton": ms, "choice": name}}}`` (a
    backend that cannot run gets ``None`` and the reason under ``"why_not"``). With ``apply`` the
    choice takes effect at once (:func:`torchfast._backends.set_gpu_choice`); with ``save`` it is
    also written as JSON, for ``TORCHFAST_BACKEND_CHOICE``. ``scale`` shrinks or grows the
    workloads. An explicit ``torchfast.set_backend`` still overrides the automatic choice.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError("autotune_backends: needs a CUDA device (got %s; CUDA available: %s)"
                         % (device, torch.cuda.is_available()))
    ops = list(ops or _backends.OPS)
    for op in ops:
        if op not in _backends.OPS:
            raise ValueError("autotune_backends: unknown op %r; expected some of %s" % (op, ", ".join(_backends.OPS)))
    if not (scale > 0):
        raise ValueError("autotune_backends: scale must be > 0, got %r" % (scale,))
    with torch.cuda.device(device):
        result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "ops": {}}
        per_dtype = {dt: _workloads(device, dt, scale) for dt in DTYPES}
        for op in ops:
            entry = {}
            for name in _backends.GPU_BACKENDS:
                reasons = {_backends.why_not(name, op, "cuda", dt) for dt in DTYPES} - {None}
                if reasons:
                    entry[name], entry.setdefault("why_not", {})[name] = None, "; ".join(sorted(reasons))
                    continue
                try:
                    with _backends.use_backend(name):
                        total = sum(cuda_time_ms(per_dtype[dt][op], reps) for dt in DTYPES)
                except Exception as e:  # noqa: BLE001 - a backend that fails here must not be chosen
                    entry[name], entry.setdefault("why_not", {})[name] = None, "failed: %s: %s" % (
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                    continue
                entry[name] = round(total, 4)
                if verbose:
                    print("  %-9s %-6s %.3f ms" % (op, name, total))
            timed = [n for n in _backends.GPU_BACKENDS if entry.get(n) is not None]
            entry["choice"] = min(timed, key=lambda n: entry[n]) if timed else "cuda"
            result["ops"][op] = entry
    if apply:
        current = _backends.get_gpu_choice()
        current.update({op: e["choice"] for op, e in result["ops"].items()})
        _backends.set_gpu_choice(current)
    if save:
        path = os.path.expanduser(save)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", help="write the measured choice as JSON (for TORCHFAST_BACKEND_CHOICE)")
    parser.add_argument("--ops", nargs="*", default=None, choices=_backends.OPS)
    parser.add_argument("--scale", type=float, default=1.0, help="workload size factor (default 1)")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    result = autotune_backends(ops=args.ops, save=args.save, scale=args.scale, reps=args.reps, verbose=False)
    print("%s, float32 + bfloat16 (ms per workload, lower is better)" % result["device"])
    print("%-10s %10s %10s  %-7s %s" % ("op", "cuda", "triton", "choice", "triton/cuda"))
    for op, e in result["ops"].items():
        ratio = "%.2fx" % (e["triton"] / e["cuda"]) if e.get("cuda") and e.get("triton") else "-"
        fmt = lambda v: "%10.3f" % v if v is not None else "%10s" % "n/a"  # noqa: E731
        print("%-10s %s %s  %-7s %s" % (op, fmt(e.get("cuda")), fmt(e.get("triton")), e["choice"], ratio))
    if args.save:
        print("saved to %s; use it with TORCHFAST_BACKEND_CHOICE=%s" % (args.save, args.save))


if __name__ == "__main__":
    main()
