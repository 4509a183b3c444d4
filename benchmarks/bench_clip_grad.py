"""Gradient clipping: torchfast.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ (foreach), eager and
compiled, on real architectures' gradient lists.

Bytes of the minimal algorithm (T = bytes of all gradients): the norm reads T, the scale reads and
writes T: 3T per call (max_norm is set so every call clips).
"""
import math

import torch

import torchfast

import common
import shapes as S

LISTS = {"resnet50 (161)": S.resnet50, "gpt2-small (148)": S.gpt2_small, "2000 x 64": S.small_tensors}


def _params(shape_list, device, dtype):
    g = torch.Generator().manual_seed(0)
    ps = []
    for s in shape_list:
        p = torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype))
        p.grad = torch.randn(s, generator=g).to(device=device, dtype=dtype)
        ps.append(p)
    return ps


def cases(device, quick, dtypes=None):
    dtypes = dtypes or ([torch.float32] if quick and device.type == "cpu" else [torch.float32, torch.bfloat16])
    for name in LISTS:
        for dtype in dtypes:
            for p in (2.0, math.inf):
                yield name, dtype, p


def run(device, quick=True, dtypes=None, compile_stock=True, backends=None, progress=None, out_dir=None):
    device = torch.device(device)
    copy_bw = common.copy_bandwidth(device)
    backends = backends or [b for b in torchfast.available_backends(device) if b != "reference"]
    rows = []
    all_cases = list(cases(device, quick, dtypes))
    for name, dtype, p in all_cases:
        ps = _params(LISTS[name](), device, dtype)
        nbytes = 3 * common.nbytes_of([q.grad for q in ps])
        max_norm = 1e-3  # always clips, so the scale pass always writes

        def stock():
            torch.nn.utils.clip_grad_norm_(ps, max_norm, p)
        impls = [("stock eager", stock)]
        # Compiling the stock clip costs ~20 s per list on a 2-core CPU (and minutes for the list
        # of 2000 tensors, one graph input each): the quick suite compiles it for the 2-norm of the
        # real architectures only.
        if compile_stock and not (quick and (p != 2.0 or name == "2000 x 64")):
            compiled = common.try_compile(stock)
            if compiled is not None:
                impls.append(("stock compile", compiled))
        for b in backends:
            def fast(b=b):
                with torchfast.use_backend(b):
                    torchfast.clip_grad_norm_(ps, max_norm, p)
            impls.append(("torchfast " + b, fast))
        case = "norm %s" % ("inf" if math.isinf(p) else "%g" % p)
        for impl, fn in impls:
            try:
                t = common.bench(fn, device)
            except Exception as e:  # noqa: BLE001
                print("\n%s %s failed: %s" % (impl, name, str(e).splitlines()[0][:200]))
                continue
            rows.append(common.make_row(device, "clip_grad", case, name, dtype, "-", impl, t, nbytes, copy_bw))
        if progress:
            progress.step("clip %s %s" % (name, case))
    return rows, len(all_cases)


def count(device, quick, dtypes=None):
    return len(list(cases(torch.device(device), quick, dtypes)))


if __name__ == "__main__":
    common.standalone(run)
