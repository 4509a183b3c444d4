"""BatchNorm+add+ReLU: torchfast backends vs stock ``out = bn(x); out += r; relu_(out)`` (a ResNet
block's tail, as torchvision writes it), eager and torch.compile, on ResNet-50's block-output shapes.

Minimal bytes (T = bytes of the activation): eval forward 3T, training forward 4T (statistics read,
then read x and the residual, write y), training forward+backward 11T (4T + a backward of 5 reads
and 2 writes). The timing code is bench_bn_relu's, with add=True.
"""
import torch

import bench_bn_relu
import common

# The BatchNorm before each residual add in ResNet-50 (bn3 of the bottlenecks) at batch 256 (GPU),
# and scaled to a 2-core CPU (32x256x56x56 is the target shape).
GPU_SHAPES = [(256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
CPU_SHAPES = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]
CPU_QUICK = [(32, 256, 56, 56)]


def cases(device, quick, dtypes=None):
    if device.type == "cuda":
        shapes = GPU_SHAPES[:1] if quick else GPU_SHAPES
        dtypes = dtypes or [torch.float32, torch.bfloat16]
        modes = ["fwd+bwd"] if quick else list(bench_bn_relu.ADD_MODES)
    else:
        shapes = CPU_QUICK if quick else CPU_SHAPES
        dtypes = dtypes or [torch.float32]
        modes = ["fwd-train", "fwd+bwd"] if quick else list(bench_bn_relu.ADD_MODES)
    for shape in shapes:
        for dtype in dtypes:
            for layout in ("contiguous", "channels_last"):
                for mode in modes:
                    yield shape, dtype, layout, mode


def run(device, quick=True, dtypes=None, compile_stock=True, backends=None, progress=None, out_dir=None):
    return bench_bn_relu.run(device, quick, dtypes, compile_stock, backends, progress, out_dir, add=True,
                             all_cases=cases(torch.device(device), quick, dtypes))


def count(device, quick, dtypes=None):
    return len(list(cases(torch.device(device), quick, dtypes)))


if __name__ == "__main__":
    common.standalone(run)
