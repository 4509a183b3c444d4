"""End to end: training steps of unmodified torchvision ResNets, stock against the same model fused by
``torchfast.nn.fuse`` (and against ``torch.compile`` of stock), from the same weights on the same
seeded data, in the layouts CNN training uses.

Each step is what a training loop runs: zero_grad(set_to_none), forward, cross-entropy, backward,
clip (torch.nn.utils.clip_grad_norm_ for stock, torchfast.clip_grad_norm_ for torchfast), SGD with
momentum. Stock and fused steps are interleaved (one of each per iteration) so that load on a shared
machine hits both alike. Reports the median step time, the ratio to stock eager and to stock
compiled, the bytes saved for backward (CPU) or the peak memory (GPU), and a loss-curve plot.
"""
import copy
import os
import time

import torch
import torch.nn.functional as F

import torchfast

import common


def _configs(device, quick):
    """(model name, batch, image size, layout, dtype under autocast or None)."""
    if device.type == "cpu":
        layouts = ("channels_last",) if quick else ("channels_last", "contiguous")
        return [(m, 16, 224, layout, None) for m in ("resnet50", "resnet18") for layout in layouts]
    layouts = ("channels_last",) if quick else ("channels_last", "contiguous")
    return [(m, 128, 224, layout, torch.bfloat16) for m in ("resnet50", "resnet18") for layout in layouts]


def _step_fn(model, opt, clip, amp_dtype, device):
    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        clip(model.parameters(), 5.0)
        opt.step()
        return loss
    return step


def _train_interleaved(steps_by_name, data, device, n):
    """Run n iterations, one step of each model per iteration; {name: (losses, times)}."""
    out = {name: ([], []) for name in steps_by_name}
    for i in range(n):
        x, y = data[i % len(data)]
        for name, step in steps_by_name.items():
            common.sync(device)
            t0 = time.perf_counter()
            loss = step(x, y)
            common.sync(device)
            out[name][1].append(time.perf_counter() - t0)
            out[name][0].append(loss.item())
    return out


def cases(device, quick):
    return _configs(device, quick)


def run(device, quick=True, dtypes=None, compile_stock=True, backends=None, progress=None, out_dir=None):
    try:
        import torchvision
    except ImportError:
        print("\ne2e skipped: torchvision is not installed (pip install .[bench])")
        return [], 0

    device = torch.device(device)
    rows = []
    warm, timed = (2, 6) if device.type == "cpu" else (5, 20)
    if not quick:
        timed *= 2
    for name, batch, size, layout, amp_dtype in _configs(device, quick):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt),
                 torch.randint(0, 1000, (batch,), generator=g).to(device)) for _ in range(2)]
        torch.manual_seed(0)
        stock = getattr(torchvision.models, name)().to(device).to(memory_format=fmt)
        fused, report = torchfast.nn.fuse(copy.deepcopy(stock), return_report=True)
        models = {"stock eager": stock, "torchfast auto": fused}
        steps = {}
        for impl, model in models.items():
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            clip = torchfast.clip_grad_norm_ if impl.startswith("torchfast") else torch.nn.utils.clip_grad_norm_
            steps[impl] = _step_fn(model, opt, clip, amp_dtype, device)
        if compile_stock:
            compiled_model = copy.deepcopy(stock)
            compiled = torch.compile(compiled_model)
            opt = torch.optim.SGD(compiled_model.parameters(), lr=0.01, momentum=0.9)
            steps["stock compile"] = _step_fn(compiled, opt, torch.nn.utils.clip_grad_norm_, amp_dtype, device)
        peaks = {}
        for impl, model in list(models.items()) + ([("stock compile", compiled)] if compile_stock else []):
            x, y = data[0]

            def fwd_bwd(model=model):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    F.cross_entropy(model(x), y).backward()
            peaks[impl] = common.peak_memory(fwd_bwd, device)  # also the compile's first call
        for model in models.values():
            model.zero_grad(set_to_none=True)
        res = _train_interleaved(steps, data, device, warm + timed)
        shape = "%s %dx3x%dx%d" % (name, batch, size, size)
        dtype = amp_dtype or torch.float32
        for impl, (losses, times) in res.items():
            t = sorted(times[warm:])[len(times[warm:]) // 2]
            rows.append(common.make_row(device, "e2e", "train step", shape, dtype, layout, impl, t, None, None,
                                        peaks[impl]))
        s, f = res["stock eager"][0], res["torchfast auto"][0]
        print("\ne2e %s %s %s: fuse %d BatchNorm->ReLU + %d BatchNorm->add->ReLU; loss stock %.3f -> %.3f, torchfast "
              "%.3f -> %.3f (step 0 relative difference %.1e; later steps drift apart as float32 rounding grows "
              "through training)" % (device.type, name, layout, len(report.pairs), len(report.triples), s[0], s[-1],
                                     f[0], f[-1], abs(s[0] - f[0]) / abs(s[0])))
        if layout == "channels_last":
            _plot_losses(res, name, device, out_dir or common.RESULTS_DIR)
        if progress:
            progress.step("e2e %s %s" % (name, layout))
    return rows, len(rows)


def _plot_losses(res, name, device, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    styles = {"stock eager": dict(lw=2), "torchfast auto": dict(lw=1, ls="--"), "stock compile": dict(lw=1, ls=":")}
    for impl, (losses, _) in res.items():
        ax.plot(losses, label=impl, **styles.get(impl, {}))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("torchvision %s, same weights and data (%s)" % (name, device.type), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "e2e-loss-%s-%s.png" % (name, device.type)), dpi=110)
    plt.close(fig)


def count(device, quick, dtypes=None):
    return len(_configs(torch.device(device), quick))


if __name__ == "__main__":
    common.standalone(run)
