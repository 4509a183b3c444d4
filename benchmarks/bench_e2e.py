"""End to end: training steps of a ResNet-style CNN with its BatchNorm+ReLU pairs as torchfast layers,
its gradients clipped by torchfast.clip_grad_norm_ and its weights initialized by torchfast.init,
against the same model in stock PyTorch from the same weights, on the same seeded data.

The model is defined here rather than taken from torchvision: torchvision's blocks apply ReLU inside
forward() through a shared module, so their BatchNorm+ReLU pairs cannot be swapped without
rewriting the blocks. This ResNet-18-shaped net has the same structure with the pairs as modules.
"""
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.nn import BatchNormReLU2d

import common


class StockBNReLU(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by ReLU, with BatchNorm2d's state_dict (so weights move between nets)."""

    def forward(self, x):
        return F.relu(super().forward(x), inplace=True)


class Block(nn.Module):
    def __init__(self, cin, cout, stride, bnrelu):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bnrelu1 = bnrelu(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.bnrelu1(self.conv1(x))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, bnrelu, width=32, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), bnrelu(width))
        layers, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            for b in range(2):
                layers.append(Block(cin, width * mult, 2 if (b == 0 and i > 0) else 1, bnrelu))
                cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def _train(model, clip, data, device, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses, times = [], []
    for i in range(steps):
        x, y = data[i % len(data)]
        common.sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        clip(model.parameters(), 1.0)
        opt.step()
        common.sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


def cases(device, quick):
    yield "train step"


def run(device, quick=True, dtypes=None, compile_stock=False, backends=None, progress=None, out_dir=None):
    device = torch.device(device)
    batch, size, steps = (16, 32, 30) if device.type == "cpu" else (128, 64, 40)
    if not quick:
        steps *= 2
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(4)]

    torch.manual_seed(0)
    stock = ResNet(StockBNReLU).to(device).to(memory_format=torch.channels_last)
    fused = ResNet(BatchNormReLU2d).to(device).to(memory_format=torch.channels_last)
    # torchfast.init in one batched call, then both nets start from exactly these weights.
    t0 = time.perf_counter()
    torchfast.init.reset_parameters(fused, seed=0)
    common.sync(device)
    init_s = time.perf_counter() - t0
    stock.load_state_dict(fused.state_dict())

    peaks = {}
    for name, model in (("stock", stock), ("torchfast", fused)):
        x, y = data[0]
        peaks[name] = common.peak_memory(lambda: F.cross_entropy(model(x), y).backward(), device)
        model.zero_grad(set_to_none=True)
    stock_losses, stock_times = _train(stock, torch.nn.utils.clip_grad_norm_, data, device, steps)
    fast_losses, fast_times = _train(fused, torchfast.clip_grad_norm_, data, device, steps)

    def med(ts):
        ts = sorted(ts[3:])  # drop warm-up steps
        return ts[len(ts) // 2]
    shape = "resnet18-w32 %dx3x%dx%d" % (batch, size, size)
    rows = [common.make_row(device, "e2e", "train step", shape, torch.float32, "channels_last", "stock eager",
                            med(stock_times), None, None, peaks["stock"]),
            common.make_row(device, "e2e", "train step", shape, torch.float32, "channels_last", "torchfast auto",
                            med(fast_times), None, None, peaks["torchfast"])]
    diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(stock_losses, fast_losses)]
    print("\ne2e on %s: torchfast.init.reset_parameters %.1f ms; losses stock %.4f -> %.4f, torchfast %.4f -> %.4f; "
          "relative loss difference: step 0 %.1e, step 1 %.1e, max over %d steps %.1e (last-bit differences "
          "grow through the training dynamics)" % (
              device.type, init_s * 1e3, stock_losses[0], stock_losses[-1], fast_losses[0], fast_losses[-1],
              diffs[0], diffs[1], steps, max(diffs)))
    _plot_losses(stock_losses, fast_losses, device, out_dir or common.RESULTS_DIR)
    if progress:
        progress.step("e2e train steps")
    return rows, 1


def _plot_losses(a, b, device, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(a, label="stock PyTorch", lw=2)
    ax.plot(b, label="torchfast", lw=1, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("ResNet-style CNN, same weights and data (%s)" % device.type, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "e2e-loss-%s.png" % device.type), dpi=110)
    plt.close(fig)


def count(device, quick, dtypes=None):
    return 1


if __name__ == "__main__":
    common.standalone(run)
