"""The synchronised training call of ``SyncBatchNormReLU`` / ``SyncBatchNormAddReLU``: statistics over a
process group, fused with the ReLU (and the residual add).

Per call, as stock ``torch.nn.SyncBatchNorm`` but fused:
  forward:  local per-channel mean and biased variance (one read of the input), one collective that
            gathers (mean, var, count) of every process, the global statistics combined exactly (Chan's pairwise
            formula, float64), the running statistics updated with the global count, then one fused
            elementwise pass relu((x - mean) * scale + shift [+ residual]).
  backward: local sums of the masked gradient (sum gm, sum gm * (x - mean)), one all-reduce of them, then
            one fused elementwise pass for the input gradient. The weight and bias gradients are the
            process's own, as stock's (DDP averages them).

Stock SyncBatchNorm needs a GPU; these layers run on CPUs too (gloo). The local pieces come from one of
three engines: the CPU kernels (csrc/cpu, ops bn_stats / bn_relu_bwd_reduce / bn_relu_bwd_elemt), stock's
own CUDA kernels for the statistics and gradient sums (what SyncBatchNorm calls) around torchfast's fused
elementwise forward, and tensor ops on any device (the reference backend).
"""
import torch
import torch.distributed as dist
from torch import nn

from torchfast import _backends, _ext
from torchfast._ops import impl

_C_OPS = _ext._C is not None and hasattr(torch.ops.torchfast, "bn_stats")
_update_op = torch.ops.torchfast.bn_update_running_stats_.default if _ext._C is not None else None


def _engine(x, backend: str) -> str:
    if backend == "cpu" and _C_OPS and x.device.type == "cpu":
        return "cpu"
    if backend != "reference" and x.device.type == "cuda":
        return "cuda"
    return "tensor"


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _channel_view(t, x):
    return t.view([1, -1] + [1] * (x.dim() - 2))


def _local_stats(x, engine):
    """(mean, biased var) per channel of this process's batch, in the statistics dtype."""
    if engine == "cpu":
        return torch.ops.torchfast.bn_stats(x)
    if engine == "cuda":
        mean, invstd = torch.batch_norm_stats(x, 0.0)  # stock's kernel; eps 0: var = invstd^-2 exactly enough
        return mean, invstd.pow(-2)
    var, mean = torch.var_mean(x.to(_acc(x)), _dims(x), correction=0)
    return mean, var


def _gather_stats(mean, var, n_local, group, world):
    """Every process's (mean, var, count) as a (world, 2C + 1) float64 table: each process fills its own
    row of a zero table and one all-reduce sums them. (An all-gather in effect, but all-reduce is the
    collective every backend has for every device: gloo has no all-gather of CUDA tensors.)"""
    c = mean.numel()
    table = torch.zeros(world, 2 * c + 1, dtype=torch.float64, device=mean.device)
    row = table[dist.get_rank(group)]
    if n_local > 0:  # an empty batch has no statistics (NaN): its row stays 0 and counts 0 below
        row[:c] = mean
        row[c:2 * c] = var
    row[2 * c] = n_local
    dist.all_reduce(table, dist.ReduceOp.SUM, group=group)
    return table


def _combine(gathered, c):
    """Global mean and biased variance from per-process (mean, var, count): the count-weighted mean,
    and the within plus between-process variance. No host synchronisation."""
    means, variances, counts = gathered[:, :c], gathered[:, c:2 * c], gathered[:, 2 * c:]
    total = counts.sum()
    share = counts / total
    mean = (means * share).sum(0)
    var = ((variances + (means - mean).square()) * share).sum(0)
    return mean, var, total


def _update_running(running_mean, running_var, mean, var, total, momentum, engine):
    if running_mean is None and running_var is None:
        return
    if engine == "cpu" and _update_op is not None:
        n = int(total)  # a CPU tensor: no device synchronisation
        if n > 0:
            _update_op(running_mean, running_var, mean, var, float(momentum), n)
        return
    # On the device, without reading the count back: nothing changes when every batch was empty.
    some = total > 0
    m = momentum
    if running_mean is not None:
        new = running_mean * (1.0 - m) + mean.to(running_mean.dtype) * m
        running_mean.copy_(torch.where(some, new, running_mean))
    if running_var is not None:
        unbiased = var * (total / (total - 1).clamp_min(1))
        new = running_var * (1.0 - m) + unbiased.to(running_var.dtype) * m
        running_var.copy_(torch.where(some, new, running_var))


def _local_grad_sums(engine, grad_out, out, x, weight, bias, mean, invstd, add):
    """(sum gm, sum gm * (x - mean)) in float64 and gm (the residual's gradient, and what the elementwise
    pass reads unless the CPU engine masks again from the input)."""
    if engine == "cpu":
        s1, s2, gm = torch.ops.torchfast.bn_relu_bwd_reduce(grad_out, out if add else None, x, weight, bias, mean,
                                                            invstd)
        return s1, s2, (gm if add else None)
    gm = torch.where(out > 0, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
    if engine == "cuda":
        if not (gm.is_contiguous(memory_format=torch.channels_last)
                or gm.is_contiguous(memory_format=torch.channels_last_3d)):
            gm = gm.contiguous()
        s1, s2, _, _ = torch.batch_norm_backward_reduce(gm, x, mean, invstd, weight, True, False, False)
        return s1.double(), s2.double(), gm
    acc = _acc(x)
    g = gm.to(acc)
    s1 = g.sum(_dims(x), dtype=torch.float64)
    s2 = (g * (x.to(acc) - _channel_view(mean, x))).sum(_dims(x), dtype=torch.float64)
    return s1, s2, gm


def _input_grad(engine, grad_out, gm, x, weight, bias, mean, invstd, s1, s2, total):
    if engine == "cpu":
        if gm is None:  # bn_relu: dy, masked again from the input in the same pass
            return torch.ops.torchfast.bn_relu_bwd_elemt(grad_out, x, weight, bias, mean, invstd, s1, s2, int(total),
                                                         True)
        return torch.ops.torchfast.bn_relu_bwd_elemt(gm, x, weight, bias, mean, invstd, s1, s2, int(total), False)
    if engine == "cuda":
        w = weight.to(mean.dtype) if weight is not None and weight.dtype != mean.dtype else weight
        count = total.to(torch.int32).view(1)
        return torch.batch_norm_backward_elemt(gm, x, mean, invstd, w, s1.to(mean.dtype), s2.to(mean.dtype), count)
    acc = _acc(x)
    inv = invstd.double()
    w = weight.double() if weight is not None else torch.ones_like(inv)
    k0 = (w * inv).to(acc)
    k1 = (w * inv * s1 / total).to(acc)
    k2 = (w * inv * inv * inv * s2 / total).to(acc)
    v = lambda t: _channel_view(t, x)  # noqa: E731
    gi = gm.to(acc) * v(k0) - v(k1) - (x.to(acc) - v(mean)) * v(k2)
    return gi.to(x.dtype)


class _SyncBatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, residual, weight, bias, running_mean, running_var, momentum, eps, group, world, backend):
        add = residual is not None
        c = input.shape[1]
        n_local = input.numel() // c
        engine = _engine(input, backend)
        acc = _acc(input)
        if n_local > 0:
            mean, var = _local_stats(input, engine)
        else:
            mean = var = torch.zeros(c, dtype=acc, device=input.device)
        gathered = _gather_stats(mean, var, n_local, group, world)
        gmean64, gvar64, total = _combine(gathered, c)
        gmean, gvar = gmean64.to(acc), gvar64.to(acc)
        _update_running(running_mean, running_var, gmean, gvar, total, momentum, engine)
        ops = impl(backend)
        if n_local > 0:
            if add:
                out, _, invstd, _ = ops.bn_add_relu_fwd(input, residual, weight, bias, gmean, gvar, False, float(eps))
            else:
                out, _, invstd, _ = ops.bn_relu_fwd(input, weight, bias, gmean, gvar, False, float(eps))
        else:
            out = torch.empty_like(input)
            invstd = (gvar64 + eps).rsqrt().to(acc)
        # The CPU engine recomputes bn_relu's mask from the input; the others read it from the output.
        keep_out = add or engine != "cpu"
        ctx.save_for_backward(input, weight, bias, gmean, invstd, out if keep_out else None)
        ctx.add, ctx.engine, ctx.total, ctx.group = add, engine, total, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd, out = ctx.saved_tensors
        need_in, need_res, need_w, need_b = ctx.needs_input_grad[:4]
        c = x.shape[1]
        if x.numel() > 0:
            s1, s2, gm = _local_grad_sums(ctx.engine, grad_out, out, x, weight, bias, mean, invstd, ctx.add)
        else:
            s1 = s2 = torch.zeros(c, dtype=torch.float64, device=x.device)
            gm = torch.zeros_like(x)
        grad_w = (s2 * invstd.double()).to(weight.dtype) if need_w and weight is not None else None
        grad_b = s1.to(bias.dtype) if need_b and bias is not None else None
        grad_in = None
        if need_in:
            combined = torch.cat([s1, s2])
            dist.all_reduce(combined, dist.ReduceOp.SUM, group=ctx.group)  # every process's sums
            if x.numel() > 0:
                grad_in = _input_grad(ctx.engine, grad_out, gm, x, weight, bias, mean, invstd, combined[:c],
                                      combined[c:], ctx.total)
            else:
                grad_in = torch.zeros_like(x)
        grad_res = gm if ctx.add and need_res else None
        return grad_in, grad_res, grad_w, grad_b, None, None, None, None, None, None, None


def sync_forward(bn, input, residual, running_mean, running_var, momentum):
    """The fused synchronised training call for SyncBatchNorm module `bn` (after _bn_call_args)."""
    group = bn.process_group or dist.group.WORLD
    world = dist.get_world_size(group)
    op = "bn_add_relu" if residual is not None else "bn_relu"
    backend = _backends.choose(op, input.device, input.dtype)
    return _SyncBatchNormReLU.apply(input, residual, bn.weight, bn.bias, running_mean, running_var, momentum, bn.eps,
                                    group, world, backend)


def stock_sync_forward(bn, input, residual):
    """Stock SyncBatchNorm, then the add and the ReLU: for the calls the fused kernels do not take
    (mixed dtypes, forward-mode AD, torch.func transforms), with stock's results and errors."""
    y = nn.SyncBatchNorm.forward(bn, input)
    return torch.relu(y if residual is None else y + residual)
