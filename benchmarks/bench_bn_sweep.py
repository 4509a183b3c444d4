"""The per-shape sweep: every BatchNorm layer shape of torchvision's ResNet-50 (224x224 input) at batch 8
and 32, one training step (forward + backward) of the fused layer against stock's, on 1 and 2 CPU threads
(on a GPU: the device), in both layouts. BatchNorm->ReLU shapes run BatchNormReLU2d against
``relu_(bn(x))``; the block outputs (bn3 before the residual add) run BatchNormAddReLU2d against
``out = bn(x); out += r; relu_(out)``, as torchvision writes them.

Small layers are where per-call overhead shows (late stages, low resolution): the drop-in must not be
slower than stock on any of them. Stock and fused steps are timed interleaved (alternating blocks of
iterations, median per step), so a change in machine load hits both.
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.nn import BatchNormAddReLU2d, BatchNormReLU2d

import common

# (channels, height, width, residual add?) of ResNet-50's BatchNorm outputs, in network order.
RESNET50_BN = [
    (64, 112, 112, False),  # stem
    (64, 56, 56, False), (256, 56, 56, True),  # layer1: bn1/bn2, bn3 (+ add)
    (128, 56, 56, False), (128, 28, 28, False), (512, 28, 28, True),  # layer2 (bn1 of block 0 at 56x56)
    (256, 28, 28, False), (256, 14, 14, False), (1024, 14, 14, True),  # layer3
    (512, 14, 14, False), (512, 7, 7, False), (2048, 7, 7, True),  # layer4
]
BATCHES = (8, 32)


def cases(device, quick, dtypes=None):
    dtypes = dtypes or [torch.float32]
    threads = (None,) if device.type == "cuda" else (1, 2)
    layouts = ("contiguous", "channels_last")
    for batch in BATCHES:
        for c, h, w, add in RESNET50_BN:
            for dtype in dtypes:
                for layout in layouts:
                    for t in threads:
                        yield (batch, c, h, w), add, dtype, layout, t


def interleaved(fns, device, samples, target_s=0.004):
    """Median seconds per call of each fn, timed in alternating blocks of iterations (the order flips
    every sample). Block length: enough calls for ~target_s, from a calibration of the slowest fn."""
    for f in fns:
        f()
        f()
    common.sync(device)
    t0 = time.perf_counter()
    for f in fns:
        f()
    common.sync(device)
    reps = max(1, min(200, int(target_s / max((time.perf_counter() - t0) / len(fns), 1e-7))))
    per = [[] for _ in fns]
    for s in range(samples):
        order = range(len(fns)) if s % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            f = fns[i]
            common.sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            common.sync(device)
            per[i].append((time.perf_counter() - t0) / reps)
    return [sorted(p)[len(p) // 2] for p in per]


def _train_step(fn, inputs, params, gy):
    def run():
        for t in inputs + params:
            t.grad = None  # as optimizer.zero_grad(): nothing accumulated
        fn(*inputs).backward(gy)
    return run


def run(device, quick=True, dtypes=None, compile_stock=True, backends=None, progress=None, out_dir=None):
    device = torch.device(device)
    rows = []
    all_cases = list(cases(device, quick, dtypes))
    backend = (backends or [b for b in torchfast.available_backends(device) if b != "reference"])[0]
    threads_before = torch.get_num_threads()
    samples = 7 if quick else 15
    try:
        for shape, add, dtype, layout, nthreads in all_cases:
            if nthreads is not None:
                torch.set_num_threads(nthreads)
            g = torch.Generator().manual_seed(0)
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
            inputs = [x.requires_grad_()]
            if add:
                inputs.append(torch.randn(shape, generator=g).to(device=device, dtype=dtype)
                              .contiguous(memory_format=fmt).requires_grad_())
            gy = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
            c = shape[1]
            pdtype = torch.float64 if dtype == torch.float64 else torch.float32
            bn = nn.BatchNorm2d(c, device=device, dtype=pdtype)
            fused = (BatchNormAddReLU2d if add else BatchNormReLU2d)(c, device=device, dtype=pdtype)

            if add:
                def stock(x, r):
                    out = bn(x)
                    out += r
                    return F.relu(out, inplace=True)
            else:
                def stock(x):
                    return F.relu(bn(x), inplace=True)

            def fast(*args):
                with torchfast.use_backend(backend):
                    return fused(*args)
            steps = [_train_step(stock, inputs, list(bn.parameters()), gy),
                     _train_step(fast, inputs, list(fused.parameters()), gy)]
            t_stock, t_fast = interleaved(steps, device, samples)
            op = "bn_add_relu" if add else "bn_relu"
            case = "fwd+bwd" + ("" if nthreads is None else " %dt" % nthreads)
            nbytes = (11 if add else 8) * x.numel() * x.element_size()
            shape_s = common.fmt_shape(shape)
            rows.append(common.make_row(device, op, case, shape_s, dtype, layout, "stock eager", t_stock, nbytes, None))
            rows.append(common.make_row(device, op, case, shape_s, dtype, layout, "torchfast " + backend, t_fast,
                                        nbytes, None))
            if progress:
                progress.step("sweep %s %s %s" % (shape_s, layout, case))
    finally:
        torch.set_num_threads(threads_before)
    return rows, len(all_cases)


def count(device, quick, dtypes=None):
    return len(list(cases(torch.device(device), quick, dtypes)))


if __name__ == "__main__":
    common.standalone(run)
