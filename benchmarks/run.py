"""The benchmark runner (the README's main command): every op on every present device, each torchfast
backend against stock PyTorch eager and torch.compile in the same process, then a table, CSV rows
under benchmarks/results/ and a speedup plot.

    python benchmarks/run.py --quick                 # the quick suite (README main command)
    python benchmarks/run.py --ops bn_relu,clip_grad --device cpu --dtype bfloat16
"""
import argparse
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_bn_add_relu  # noqa: E402
import bench_bn_relu  # noqa: E402
import bench_bn_sweep  # noqa: E402
import bench_clip_grad  # noqa: E402
import bench_e2e  # noqa: E402
import bench_init  # noqa: E402
import common  # noqa: E402

OPS = {"bn_relu": bench_bn_relu, "bn_add_relu": bench_bn_add_relu, "bn_sweep": bench_bn_sweep,
       "clip_grad": bench_clip_grad, "init": bench_init, "e2e": bench_e2e}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of %s" % ",".join(OPS))
    ap.add_argument("--device", default="all", help="cpu, cuda, or all (every device present; default)")
    ap.add_argument("--dtype", default=None, help="restrict to one dtype: %s" % ", ".join(DTYPES))
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases (a few minutes on a 2-core CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--out", default=common.RESULTS_DIR, help="folder for CSV and plots")
    ap.add_argument("--steady-alloc", action="store_true",
                    help="keep large blocks in glibc's heap (less page-fault noise; not what a user's process does, "
                         "so off by default)")
    args = ap.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        ap.error("unknown op(s) %s; choose from %s" % (", ".join(unknown), ", ".join(OPS)))
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    dtypes = [DTYPES[args.dtype]] if args.dtype else None

    import torchfast.info
    print(torchfast.info.report().split("\n\nwhy")[0])
    if "cpu" in devices and args.steady_alloc and common.steady_cpu_allocator():
        print("\n(glibc malloc: large blocks kept in the heap between iterations; see common.steady_cpu_allocator)")
    print()
    started = time.time()

    def _stop(signum, frame):  # `timeout` sends SIGTERM: finish like Ctrl-C, keeping the rows so far
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    stopped = False
    for dev in devices:
        device = torch.device(dev)
        total = sum(OPS[o].count(device, args.quick, dtypes) for o in ops)
        progress = common.Progress(total, dev)
        first = len(common.LIVE_ROWS)
        try:
            for o in ops:
                OPS[o].run(device, quick=args.quick, dtypes=dtypes, compile_stock=not args.no_compile,
                           progress=progress, out_dir=args.out)
        except KeyboardInterrupt:
            stopped = True
            print("\n\nstopped after %.0f s: writing the %d rows measured so far"
                  % (time.time() - started, len(common.LIVE_ROWS) - first))
        rows = common.LIVE_ROWS[first:]
        common.add_ratios(rows)
        print("\n== %s: %s  (copy bandwidth %.1f GB/s, torch %s) ==" % (
            dev, common.device_name(device), common.copy_bandwidth(device), torch.__version__))
        common.print_table(rows)
        csv_path = common.write_csv(rows, args.out, device)
        png = common.plot(rows, args.out, device)
        print("\nCSV: %s%s" % (csv_path, "\nplot: %s" % png if png else ""))
        if stopped:
            break
    print("total %.0f s" % (time.time() - started))
    return 130 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
