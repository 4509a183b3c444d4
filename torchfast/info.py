"""``python -m torchfast.info``: versions, what was compiled, and which backend each op uses."""
import platform

import torch

import torchfast
from torchfast import _backends, _ext


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        return "not importable (%s)" % type(e).__name__


def _devices():
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devs


def report() -> str:
    build = _ext.build_info()
    lines = [
        "torchfast %s" % torchfast.__version__,
        "python    %s" % platform.python_version(),
        "torch     %s (CUDA %s)" % (torch.__version__, torch.version.cuda),
        "triton    %s" % _triton_version(),
        "",
        "compiled extension torchfast._C: %s" % ("built" if build["built"] else "NOT built (%s)" % build.get("error")),
    ]
    if build["built"]:
        lines.append("  CPU kernels : yes (%s)" % build.get("compiler", ""))
        lines.append("  CUDA kernels: %s" % ("yes, archs %s" % build["cuda_archs"] if build["cuda"] else "no"))
    forced = _backends.get_backend()
    lines += ["", "backend choice: %s" % ("forced to %r" % forced if forced else "automatic")]
    gpu_choice = _backends.get_gpu_choice()
    lines += ["measured GPU choice: %s" % (", ".join("%s=%s" % kv for kv in sorted(gpu_choice.items()))
                                           if gpu_choice else "none (cuda before triton; see torchfast.tuning)"), ""]
    header = "%-10s %-10s %-10s %-10s %s" % ("device", "bn_relu", "clip_grad", "init", "available")
    lines.append(header)
    lines.append("-" * len(header))
    for dev in _devices():
        picks = []
        for op in _backends.OPS:
            try:
                picks.append(_backends.choose(op, dev, torch.float32))
            except _backends.BackendUnavailable:
                picks.append("(none)")
        lines.append("%-10s %-10s %-10s %-10s %s" % (str(dev), picks[0], picks[1], picks[2],
                                                      ", ".join(_backends.available_backends(dev))))
    lines.append("")
    lines.append("why a backend cannot serve float32 on each device:")
    for dev in _devices():
        for name in _backends.BACKENDS:
            reasons = {_backends.why_not(name, op, dev.type, torch.float32) for op in _backends.OPS} - {None}
            if reasons:
                lines.append("  %-6s %-9s %s" % (dev.type, name, "; ".join(sorted(reasons))))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
