"""Shared benchmark machinery: timing, the device's copy bandwidth, result rows, table, CSV, plots.

Timing: warm-up, then the median of several repetitions; CUDA events (via triton.testing.do_bench
when Triton is importable) on a GPU, time.perf_counter on a CPU. Absolute times on shared machines
are noise; the ratios to stock PyTorch measured in the same run are the figures to quote.
"""
import csv
import datetime
import os
import platform
import statistics
import sys
import time

import torch

import torchfast

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def steady_cpu_allocator():
    """Keep freed large blocks in glibc's heap instead of returning them to the OS.

    By default glibc maps each tensor of tens of MB afresh and unmaps it on free, so every
    iteration of a CPU benchmark pays page faults for its outputs, and whether it does flips from run
    to run (glibc adapts its thresholds): +-5 ms on a 20 ms step. Raising the mmap and trim thresholds
    (what jemalloc/tcmalloc setups achieve) removes that noise for stock PyTorch and torchfast alike.
    Returns True if applied (glibc only).
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        big = 1 << 30
        return bool(libc.mallopt(M_MMAP_THRESHOLD, big)) and bool(libc.mallopt(M_TRIM_THRESHOLD, big))
    except (OSError, AttributeError):
        return False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%s (%d threads)" % (name, torch.get_num_threads())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device, reps=None, warmup=None, min_time=None):
    """Median seconds of fn()."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        except ImportError:
            pass
        from torchfast.tuning import cuda_time_ms
        return cuda_time_ms(fn, reps or 20, warmup or 3) / 1e3
    for _ in range(warmup if warmup is not None else 2):
        fn()
    reps = reps or 7
    times = []
    budget_end = time.perf_counter() + (min_time or 0)
    while len(times) < reps or time.perf_counter() < budget_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times)


def bench_interleaved(impls, device, reps, warmup=2, before_each=None, rotate=False):
    """{name: median seconds of its call} for impls = [(name, setup, call)]: each call preceded by its
    setup() (and before_each(), e.g. a barrier across ranks), neither timed; the implementations take
    turns call by call, so a change in machine load hits them alike; the first `warmup` rounds dropped.
    rotate: round i starts with implementation i % len(impls), so none always runs right after the
    same other one (whose freed memory it may inherit)."""
    times = {name: [] for name, _, _ in impls}
    for i in range(reps + warmup):
        k = i % len(impls) if rotate else 0
        for name, setup, call in impls[k:] + impls[:k]:
            setup()
            sync(device)
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            call()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def copy_bandwidth(device) -> float:
    """Measured device copy bandwidth in GB/s (read + write bytes of a large tensor copy)."""
    n = (64 << 20) // 4 if device.type == "cpu" else (1 << 30) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / t / 1e9


def peak_memory(fn, device):
    """Peak bytes allocated during fn() on a GPU; on a CPU, bytes saved for backward (via hooks)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    saved = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def try_compile(fn):
    """torch.compile(fn), or None when compiling fails on this machine (reason printed once)."""
    try:
        compiled = torch.compile(fn)
        return compiled
    except Exception as e:  # noqa: BLE001
        print("torch.compile unavailable: %s" % e, file=sys.stderr)
        return None


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total, label):
        self.total, self.done, self.label = max(total, 1), 0, label
        self.start = time.time()

    def step(self, what=""):
        self.done += 1
        frac = self.done / self.total
        bar = "#" * int(frac * 30)
        sys.stderr.write("\r[%-30s] %3d%% %-10s %-48s" % (bar, frac * 100, self.label, what[:48]))
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


def versions():
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "-"
    return {"torch": torch.__version__, "torchfast": torchfast.__version__, "triton": tv}


FIELDS = ["date", "device", "device_type", "op", "case", "shape", "dtype", "layout", "impl", "median_ms",
          "vs_eager", "vs_compile", "gbps", "pct_copy_bw", "peak_mb", "torch", "torchfast"]


# Every row made in this process, in order: run.py writes these if it is stopped part-way (SIGTERM
# from `timeout`, Ctrl-C), so a time-boxed GPU check keeps the cases it finished.
LIVE_ROWS = []


def make_row(device, op, case, shape, dtype, layout, impl, seconds, nbytes, copy_bw, peak_bytes=None):
    row = _row(device, op, case, shape, dtype, layout, impl, seconds, nbytes, copy_bw, peak_bytes)
    LIVE_ROWS.append(row)
    return row


def _row(device, op, case, shape, dtype, layout, impl, seconds, nbytes, copy_bw, peak_bytes):
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "device_type": device.type,
        "op": op, "case": case, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "layout": layout,
        "impl": impl,
        "median_ms": seconds * 1e3,
        "vs_eager": None, "vs_compile": None,
        "gbps": (nbytes / seconds / 1e9) if nbytes else None,
        "pct_copy_bw": (100.0 * nbytes / seconds / 1e9 / copy_bw) if nbytes and copy_bw else None,
        "peak_mb": peak_bytes / 2 ** 20 if peak_bytes is not None else None,
        **{k: v for k, v in versions().items() if k in ("torch", "torchfast")},
    }


def add_ratios(rows):
    """Fill vs_eager / vs_compile: stock time / this impl's time, per (op, case, shape, dtype, layout)."""
    key = lambda r: (r["op"], r["case"], r["shape"], r["dtype"], r["layout"])  # noqa: E731
    base = {}
    for r in rows:
        if r["impl"] in ("stock eager", "stock compile"):
            base[(key(r), r["impl"])] = r["median_ms"]
    for r in rows:
        e, c = base.get((key(r), "stock eager")), base.get((key(r), "stock compile"))
        r["vs_eager"] = e / r["median_ms"] if e else None
        r["vs_compile"] = c / r["median_ms"] if c else None
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows, out=sys.stdout):
    header = ("%-10s %-22s %-20s %-9s %-13s %-15s %10s %8s %8s %8s %6s %9s" %
              ("op", "case", "shape", "dtype", "layout", "impl", "median ms", "x eager", "x compile", "GB/s",
               "%copy", "peak MB"))
    print(header, file=out)
    print("-" * len(header), file=out)
    last = None
    for r in rows:
        group = (r["op"], r["case"], r["shape"], r["dtype"], r["layout"])
        if last is not None and group != last:
            print("", file=out)
        last = group
        print("%-10s %-22s %-20s %-9s %-13s %-15s %10s %8s %8s %8s %6s %9s" % (
            r["op"], r["case"][:22], r["shape"][:20], r["dtype"], r["layout"], r["impl"],
            _fmt(r["median_ms"], ".3f"), _fmt(r["vs_eager"], ".2f"), _fmt(r["vs_compile"], ".2f"),
            _fmt(r["gbps"], ".1f"), _fmt(r["pct_copy_bw"], ".0f"), _fmt(r["peak_mb"], ".1f")), file=out)


def write_csv(rows, out_dir, device):
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in device_name(device).split(" (")[0]).strip("-").lower()
    path = os.path.join(out_dir, "%s-%s.csv" % (device.type, slug or "device"))
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k in FIELDS})
    return path


def plot(rows, out_dir, device):
    """One PNG per device: speedup vs stock eager for every torchfast backend, case by case."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fast = [r for r in rows if r["impl"].startswith("torchfast") and r["vs_eager"]]
    if not fast:
        return None
    labels = ["%s %s %s %s %s" % (r["op"], r["case"], r["shape"], r["dtype"], r["layout"]) for r in fast]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(fast))))
    colors = {"torchfast cpu": "#1f77b4", "torchfast cuda": "#2ca02c", "torchfast triton": "#d62728",
              "torchfast reference": "#7f7f7f"}
    ax.barh(range(len(fast)), [r["vs_eager"] for r in fast], color=[colors.get(r["impl"], "#9467bd") for r in fast])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(fast)))
    ax.set_yticklabels(["%s [%s]" % (lab, r["impl"].split()[-1]) for lab, r in zip(labels, fast)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup over stock PyTorch eager (log scale, >1 is faster)")
    ax.set_title("torchfast on %s" % device_name(device), fontsize=9)
    fig.tight_layout()
    slug = device.type
    path = os.path.join(out_dir, "speedup-%s.png" % slug)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt_shape(shape):
    return "x".join(str(s) for s in shape) if not isinstance(shape, str) else shape


def nbytes_of(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)




def standalone(run):
    """`python benchmarks/bench_X.py [--device D] [--quick]`: one op's cases, printed as a table."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steady-alloc", action="store_true", help="see steady_cpu_allocator (off: the default allocator)")
    args = ap.parse_args()
    if args.device == "cpu" and args.steady_alloc:
        steady_cpu_allocator()
    rows, _ = run(torch.device(args.device), args.quick)
    print_table(add_ratios(rows))
