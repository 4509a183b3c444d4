"""The benchmark runner's own behaviour (the timings themselves are not tested)."""
import csv
import glob
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import common  # noqa: E402
import run  # noqa: E402


class _StoppedOp:
    """Measures one case, then is stopped (as SIGTERM from `timeout` stops a run)."""

    @staticmethod
    def count(device, quick, dtypes=None):
        return 2

    @staticmethod
    def run(device, quick=True, dtypes=None, compile_stock=True, progress=None, out_dir=None):
        common.make_row(device, "fake", "case 1", "4x4", torch.float32, "-", "stock eager", 2e-3, 1e6, 10.0)
        raise KeyboardInterrupt


def test_stopped_run_writes_the_rows_it_measured(tmp_path, monkeypatch):
    monkeypatch.setitem(run.OPS, "fake", _StoppedOp)
    monkeypatch.setattr(common, "steady_cpu_allocator", lambda: False)  # leave this process's malloc alone
    rc = run.main(["--device", "cpu", "--ops", "fake", "--out", str(tmp_path)])
    assert rc == 130
    (path,) = glob.glob(str(tmp_path / "cpu-*.csv"))
    rows = list(csv.DictReader(open(path)))
    assert [(r["op"], r["case"], r["impl"]) for r in rows] == [("fake", "case 1", "stock eager")]


def test_bn_benchmarks_time_every_backend_against_stock():
    """bench_bn_relu's code, with and without the residual, on a tiny case (stock eager + each backend)."""
    import bench_bn_relu

    for add in (False, True):
        cases = [((2, 4, 3, 3), torch.float32, layout, mode) for layout in ("contiguous", "channels_last")
                 for mode in ("fwd-train", "fwd+bwd")]
        rows, n = bench_bn_relu.run(torch.device("cpu"), compile_stock=False, backends=["reference"], add=add,
                                    all_cases=cases)
        assert n == 4
        assert {r["op"] for r in rows} == {"bn_add_relu" if add else "bn_relu"}
        assert sorted({r["impl"] for r in rows}) == ["stock eager", "torchfast reference"]
        assert len(rows) == 8 and all(r["median_ms"] > 0 for r in rows)


def test_bn_sweep_times_each_shape_on_each_thread_count(monkeypatch):
    """bench_bn_sweep's code on two tiny layer shapes: a stock and a fused row per shape, layout and
    thread count, on both ops, and the thread count restored afterwards."""
    import bench_bn_sweep

    monkeypatch.setattr(bench_bn_sweep, "RESNET50_BN", [(4, 3, 3, False), (8, 2, 2, True)])
    monkeypatch.setattr(bench_bn_sweep, "BATCHES", (2,))
    before = torch.get_num_threads()
    rows, n = bench_bn_sweep.run(torch.device("cpu"), backends=["reference"])
    assert torch.get_num_threads() == before
    assert n == 8 and len(rows) == 16
    assert {(r["op"], r["case"]) for r in rows} == {(op, "fwd+bwd %dt" % t) for op in ("bn_relu", "bn_add_relu")
                                                    for t in (1, 2)}
    assert sorted({r["impl"] for r in rows}) == ["stock eager", "torchfast reference"]
    assert all(r["median_ms"] > 0 for r in rows)


def test_e2e_benchmark_runs_a_fused_torchvision_model(monkeypatch, tmp_path):
    """bench_e2e's code on a tiny configuration: stock and fused rows, the fuse summary, the plot."""
    import pytest

    pytest.importorskip("torchvision", reason="torchvision is a benchmark extra (pip install .[bench])")
    import bench_e2e

    monkeypatch.setattr(bench_e2e, "_configs", lambda device, quick: [("resnet18", 2, 32, "channels_last", None),
                                                                      ("resnet18", 2, 32, "contiguous", None)])
    rows, n = bench_e2e.run(torch.device("cpu"), quick=True, compile_stock=False, out_dir=str(tmp_path))
    assert n == 4
    assert [(r["layout"], r["impl"]) for r in rows] == [("channels_last", "stock eager"),
                                                        ("channels_last", "torchfast auto"),
                                                        ("contiguous", "stock eager"), ("contiguous", "torchfast auto")]
    assert all(r["median_ms"] > 0 and r["peak_mb"] > 0 for r in rows)


def test_gpu_check_dry_run_plans_inside_its_budget(tmp_path):
    """benchmarks/gpu_check.sh --dry-run on this CPU machine: the preflight runs (torch, toolkit, ninja),
    and the plan (every step at its full slot) ends inside the global budget, headline work first."""
    import re
    import subprocess
    out = tmp_path / "gpu"
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out), "--dry-run"],
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert "CUDA toolkit:" in summary and "ninja:" in summary
    planned = re.findall(r"\[(\d+)s\] (.+?): would run for up to (\d+)s", summary)
    names = [name for _, name, _ in planned]
    assert names[:3] == ["build", "GPU tests", "bench bn_relu"], names
    end = max(int(at) + int(slot) + 15 for at, _, slot in planned)
    assert end <= 480, summary
    assert re.search(r"\[(\d+)s\] done", summary)


def test_distributed_benchmark_runs_on_two_gloo_ranks():
    """benchmarks/bench_distributed.py under torchrun (2 CPU processes, gloo), tiny gradients: both clipping
    cases timed, one all-reduce per torchfast call; the SyncBatchNormReLU rows in both layouts."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=%d" % port, os.path.join(ROOT, "benchmarks", "bench_distributed.py"), "--tiny",
                        "--iters", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith(("dtensor", "zero"))}
    assert set(lines) == {"dtensor", "zero"}, r.stdout
    assert all(line.rstrip().endswith("/ 1") for line in lines.values()), r.stdout
    bn = [line for line in r.stdout.splitlines() if line.startswith("vs ")]
    assert len(bn) == 4 and all(float(line.split()[-1]) > 0 for line in bn), r.stdout
