"""BatchNorm+ReLU: torchfast backends vs stock `relu(nn.BatchNorm2d(x))`, eager and torch.compile.

Byte counts of the minimal algorithm (T = bytes of the activation): eval forward 2T (read x, write y),
training forward 3T (statistics read, then read x / write y), training forward+backward 8T
(3T forward + backward reduction reading x, dy and the elementwise pass reading x, dy, writing dx).
The BatchNorm+add+ReLU benchmark (bench_bn_add_relu.py) runs through the same code with add=True.
"""

import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.nn import BatchNormAddReLU2d, BatchNormReLU2d

import common

# ResNet-50's BatchNorm shapes at batch 256 (GPU; the headline 256x256x56x56 first, so that a time-boxed
# GPU check measures it before anything else); scaled to a 2-core CPU.
GPU_SHAPES = [(256, 256, 56, 56), (256, 64, 112, 112), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
CPU_SHAPES = [(32, 64, 56, 56), (16, 256, 28, 28), (16, 1024, 7, 7)]
CPU_QUICK = [(32, 64, 56, 56)]
MODES = {"fwd-eval": 2, "fwd-train": 3, "fwd+bwd": 8}
# BatchNorm+add+ReLU: the residual is one more read in the forward; the backward reads dy, out, x and
# writes grad_residual, then reads it and x and writes dx (5 reads + 2 writes).
ADD_MODES = {"fwd-eval": 3, "fwd-train": 4, "fwd+bwd": 11}


def _stock(c, device, dtype, add):
    bn = nn.BatchNorm2d(c, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)

    def f(x):
        return F.relu(bn(x), inplace=True)

    def f_add(x, r):  # a ResNet block's tail, as torchvision writes it
        out = bn(x)
        out += r
        return F.relu(out, inplace=True)
    return bn, f_add if add else f


def _step(mod_fn, mode, inputs, gy):
    if mode == "fwd+bwd":
        def run():
            for t in inputs:
                t.grad = None  # gradients are not accumulated into the activations
            y = mod_fn(*inputs)
            y.backward(gy)
    else:
        def run():
            with torch.no_grad():
                mod_fn(*inputs)
    return run


def cases(device, quick, dtypes=None):
    if device.type == "cuda":
        # quick: the two largest activations of ResNet-50, training step only (each case compiles
        # the stock layer once, ~10 s): it has to fit the GPU check's time budget.
        shapes = GPU_SHAPES[:2] if quick else GPU_SHAPES
        dtypes = dtypes or [torch.float32, torch.bfloat16]
        modes = ["fwd+bwd"] if quick else list(MODES)
    else:
        shapes = CPU_QUICK if quick else CPU_SHAPES
        dtypes = dtypes or ([torch.float32] if quick else [torch.float32, torch.bfloat16])
        modes = ["fwd-train", "fwd+bwd"] if quick else list(MODES)
    for shape in shapes:
        for dtype in dtypes:
            for layout in ("contiguous", "channels_last"):
                for mode in modes:
                    yield shape, dtype, layout, mode


def run(device, quick=True, dtypes=None, compile_stock=True, backends=None, progress=None, out_dir=None, add=False,
        all_cases=None):
    device = torch.device(device)
    copy_bw = common.copy_bandwidth(device)
    rows = []
    backends = backends or [b for b in torchfast.available_backends(device) if b != "reference"]
    all_cases = list(all_cases or cases(device, quick, dtypes))
    op, bytes_per_mode = ("bn_add_relu", ADD_MODES) if add else ("bn_relu", MODES)
    fused_cls = BatchNormAddReLU2d if add else BatchNormReLU2d
    for shape, dtype, layout, mode in all_cases:
        c = shape[1]
        # made on the device: 200M-element inputs drawn on the host would take seconds per case
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, generator=g, device=device).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        training = mode != "fwd-eval"
        inputs = [x]
        if add:  # the residual arrives in the block's layout
            inputs.append(torch.randn(shape, generator=g, device=device).to(dtype).contiguous(
                memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format))
        for t in inputs:
            t.requires_grad_(mode == "fwd+bwd")
        gy = torch.randn_like(x) if mode == "fwd+bwd" else None
        nbytes = bytes_per_mode[mode] * x.numel() * x.element_size()
        impls = []
        bn, stock_fn = _stock(c, device, dtype, add)
        bn.train(training)
        impls.append(("stock eager", stock_fn))
        # Each case compiles stock cold (~10 s on a GPU): the quick GPU run compiles the headline shape only.
        if compile_stock and not (quick and device.type == "cuda" and shape != all_cases[0][0]):
            compiled = common.try_compile(stock_fn)
            if compiled is not None:
                impls.append(("stock compile", compiled))
        for b in backends:
            layer = fused_cls(c, device=device, dtype=bn.weight.dtype)
            layer.train(training)

            def fused(*args, layer=layer, b=b):
                with torchfast.use_backend(b):
                    return layer(*args)
            impls.append(("torchfast " + b, fused))
        shape_s = common.fmt_shape(shape)
        steps = []
        for name, fn in impls:
            step = _step(fn, mode, inputs, gy)
            try:
                step()  # a first call (compiles stock's compiled variant): a failure drops this row only
            except Exception as e:  # noqa: BLE001 - e.g. compile failing for one dtype
                print("\n%s %s %s failed: %s" % (name, shape_s, mode, str(e).splitlines()[0][:200]))
                continue
            steps.append((name, step))
        if device.type == "cpu":
            # Calls take turns in rotating order: on a CPU a call's time includes page faults of its fresh
            # outputs, whose cost depends on what the allocator last freed (the first case of a run
            # measured 0.94x one time and 2.7x the next when stock and torchfast ran one after the other).
            times = common.bench_interleaved([(name, lambda: None, step) for name, step in steps], device, reps=7,
                                             warmup=1, rotate=True)
        else:
            times = {name: common.bench(step, device) for name, step in steps}
        for name, step in steps:
            peak = common.peak_memory(step, device) if mode == "fwd+bwd" else None
            rows.append(common.make_row(device, op, mode, shape_s, dtype, layout, name, times[name], nbytes, copy_bw,
                                        peak))
        if progress:
            progress.step("%s %s %s" % (op, shape_s, mode))
    return rows, len(all_cases)


def count(device, quick, dtypes=None):
    return len(list(cases(torch.device(device), quick, dtypes)))


if __name__ == "__main__":
    common.standalone(run)
