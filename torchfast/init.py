"""Batched weight initialization: the torch.nn.init functions, each accepting one tensor or a list of
tensors that is initialized in one batched call, with torchfast's counter-based Philox stream.

Reproducibility: element ``i`` (row-major logical order) of the ``k``-th tensor of a call depends
only on the seed, ``k`` and ``i`` (see ``torchfast.reference.philox`` for the exact definition), so
every backend, device, layout and thread count gives the same values. Uniform values are bitwise
equal across backends; normal and truncated normal values agree to a few float32 ulp (they go
through log/sin/cos, whose last bit differs between math libraries). Values are generated in
float32 and rounded to the tensor's dtype, except for float64 tensors, which take a full-precision
variant of the stream (53-bit uniforms from two words, float64 arithmetic throughout).

Seeds: pass ``seed=`` (an int in [0, 2**63)) or ``generator=`` (a torch.Generator, from which one
seed is drawn per call). With neither, the seed is drawn from torch's default CPU generator, so
``torch.manual_seed`` makes the result reproducible. Drawing from a CUDA generator reads one
number back from the device; nothing else here synchronises with the host.
"""
import contextlib
import functools
import math
import operator
import sys
import threading
import warnings

import torch
from torch import Tensor, nn
from torch.nn.init import _calculate_correct_fan, _calculate_fan_in_and_fan_out, calculate_gain
from torch.utils._python_dispatch import TorchDispatchMode

from torchfast import _backends
from torchfast._overlap import disjoint_passes
from torchfast._ops import impl
from torchfast.reference.philox import CONSTANT, NORMAL, TRUNC_NORMAL, UNIFORM

__all__ = ["uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
           "kaiming_normal_", "zeros_", "ones_", "constant_", "eye_", "dirac_", "orthogonal_", "sparse_",
           "reset_parameters", "calculate_gain", "fast_init",
           # torch.nn.init's deprecated aliases, kept for drop-in compatibility
           "uniform", "normal", "constant", "eye", "dirac", "xavier_uniform", "xavier_normal", "kaiming_uniform",
           "kaiming_normal", "orthogonal", "sparse"]

_SEED_LIMIT = 2 ** 63


def _draw_seed(seed, generator) -> int:
    if seed is not None and generator is not None:
        raise ValueError("torchfast.init: pass seed or generator, not both")
    if seed is not None:
        try:
            seed = operator.index(seed)
        except TypeError:
            raise TypeError("torchfast.init: seed must be an int, got %s" % type(seed).__name__) from None
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError("torchfast.init: seed must be in [0, 2**63), got %d" % seed)
        return seed
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("torchfast.init: generator must be a torch.Generator, got %s" % type(generator).__name__)
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, _SEED_LIMIT - 1, (), dtype=torch.int64, device=device, generator=generator).item())


def _as_list(tensor, fname):
    single = isinstance(tensor, Tensor)
    tensors = [tensor] if single else list(tensor)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError("torchfast.init.%s: tensor %d is a %s, expected a Tensor" % (fname, i, type(t).__name__))
    return single, tensors


# torch.nn.init's own functions as imported (fast_init puts torchfast's in their place while it runs).
_STOCK = {name: getattr(nn.init, name) for name in (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_", "xavier_normal_",
    "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")}
_TENSOR_TF = Tensor.__torch_function__.__func__


def _overrides_torch_function(t) -> bool:
    """Whether t's class has a __torch_function__ of its own (not Tensor's, nor the disabled one of
    Parameter, DTensor and the like). Active torch function modes (torch.device contexts) don't count."""
    cls = type(t)
    if cls is Tensor or cls is nn.Parameter:
        return False
    f = getattr(cls, "__torch_function__", None)
    f = getattr(f, "__func__", f)
    return f is not _TENSOR_TF and f is not torch._C._disabled_torch_function_impl


def _stock_fills(t, random: bool, complex_ok: bool = True) -> bool:
    """Whether t goes to torch.nn.init's own function: a __torch_function__ subclass (which then sees the
    calls stock makes, as it expects), or, for a random fill, a dtype torchfast's stream does not fill
    (integers and bool: stock's error; complex where stock's function refuses it, or a conjugate view)."""
    if _overrides_torch_function(t):
        return True
    if not random or t.is_floating_point():
        return False
    return not (complex_ok and t.is_complex() and not t.is_conj())


def _to_stock(tensors, fname, random, seed, generator, stock_args, complex_ok=True):
    """Hand what _stock_fills picks to torch.nn.init's own function (with `stock_args`, and for a random
    fill `generator`, or one seeded from `seed`); return the rest, for torchfast to fill."""
    rest, seeded = [], {}  # one seeded generator per device for the whole list
    for t in tensors:
        if not _stock_fills(t, random, complex_ok):
            rest.append(t)
        elif not random:
            _STOCK[fname](t, *stock_args)
        else:
            gen = generator
            if seed is not None:
                if t.device not in seeded:
                    seeded[t.device] = torch.Generator(t.device).manual_seed(_draw_seed(seed, generator))
                gen = seeded[t.device]
            _STOCK[fname](t, *stock_args, generator=gen)
    return rest


def _complex_target(t, spec):
    """The real view a complex tensor is filled through, and its spec: stock draws real and imaginary
    parts each from U(a, b), or each from N(mean, std^2 / 2)."""
    if spec[0] == NORMAL:
        p = spec[1]
        spec = (NORMAL, _params(p[0], p[1] / math.sqrt(2.0)))
    return torch.view_as_real(t), spec


def _f32_resolves(spec) -> bool:
    """Whether the float32 stream's truncated normal has the interval's resolution: at least 2^16
    float32 values between its erf-domain bounds lo and hi. An interval deep in a tail (a and b both
    beyond ~3 std on one side, e.g. trunc_normal_(t, 0, 1, 5.5, 6), or a mean far outside [a, b]) has
    few or none -- there every value came out at one bound -- and takes the float64 stream instead
    (erfc-based bounds, exact to 1e-300), rounded to the tensor's dtype."""
    lo, hi = spec[1][0], spec[1][1]
    top = max(abs(lo), abs(hi))
    return top == 0.0 or hi - lo >= 2.0 ** (math.frexp(top)[1] - 24) * 2 ** 16


def _fill(tensors, specs, seed, streams=None):
    """Fill tensors[k] with distribution specs[k] = (kind, 6 params) using stream k (streams[k] when
    given). One op call per (device, dtype) group; non-contiguous tensors are filled through a
    contiguous buffer, and truncated normals the float32 stream cannot resolve (_f32_resolves) through
    a float64 one, and complex tensors through their real view (_complex_target). Tensors that share
    memory (one listed twice, views of one buffer) are filled in separate passes, in list order: the
    last listing wins, as with one call per tensor (in one op call the threads would mix them)."""
    tensors, specs = list(tensors), list(specs)
    streams = list(range(len(tensors))) if streams is None else list(streams)
    passes = disjoint_passes(tensors)
    if len(passes) > 1:
        for part in passes:
            _fill([tensors[i] for i in part], [specs[i] for i in part], seed, [streams[i] for i in part])
        return
    groups = {}
    for k, (t, spec) in enumerate(zip(tensors, specs)):
        if t.numel() == 0:
            continue
        if spec[0] == CONSTANT and not (t.is_floating_point() and t.is_contiguous()):
            with torch.no_grad():  # (an expanded tensor too: stock fills it, a buffer copy could not)
                t.fill_(spec[1][0])
            continue
        if t.is_complex():
            t, spec = _complex_target(t, spec)
            tensors[k], specs[k] = t, spec
        dtype = t.dtype
        if spec[0] == TRUNC_NORMAL and dtype != torch.float64 and not _f32_resolves(spec):
            dtype = torch.float64
        groups.setdefault((t.device, dtype), []).append(k)
    with torch.no_grad():
        for (device, dtype), ks in groups.items():
            backend = _backends.choose("init", device, dtype)
            targets, copies = [], []
            for k in ks:
                t = tensors[k]
                if t.dtype != dtype:
                    buf = torch.empty(t.shape, dtype=dtype, device=t.device)
                    targets.append(buf)
                    copies.append((t, buf))
                elif t.is_contiguous():
                    targets.append(t)
                else:
                    buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
                    targets.append(buf)
                    copies.append((t, buf))
            f64 = dtype == torch.float64
            params = [float(p) for k in ks
                      for p in (_params_f64(*specs[k][:2]) if f64 else _kernel_params(specs[k], dtype) + (0.0, 0.0))]
            impl(backend).philox_fill_(targets, seed, [streams[k] for k in ks], [specs[k][0] for k in ks], params)
            for t, buf in copies:
                t.copy_(buf)
            if dtype == torch.float64:
                # trunc_normal_ with bounds beyond 6 std takes the normal stream (_trunc_normal_spec),
                # whose float64 values reach 8.65 std: clamp those to [a, b].
                for k in ks:
                    if len(specs[k]) == 3:
                        tensors[k].clamp_(*specs[k][2])


def _adjacent(x: float, dtype, up: bool) -> float:
    """The float16/bfloat16 number next to x (a number of that dtype), towards +inf or -inf."""
    if x == 0:
        bits = 1 if up else -32767  # the smallest subnormals, 0x0001 and 0x8001
    else:
        bits = int(torch.tensor([x], dtype=dtype).view(torch.int16).item())
        bits += 1 if (x > 0) == up else -1
    return float(torch.tensor([bits], dtype=torch.int16).view(dtype).item())


def _kernel_params(spec, dtype):
    """The float32 stream's six parameters for a tensor of `dtype`. U(a, b) on float16/bfloat16: values
    are drawn in float32 and rounded, and one within half a step of b would round up to b, which stock's
    uniform_ never gives; the top is lowered to the midpoint below b (less float32 rounding slack), so
    every value rounds into [a, b) and every step but the lowest keeps its full share."""
    p = spec[1]
    if spec[0] != UNIFORM or dtype not in (torch.float16, torch.bfloat16) or not p[0] < p[1]:
        return p
    return (p[0], _half_top(p[0], p[1], dtype)) + tuple(p[2:])


@functools.lru_cache(maxsize=1024)  # (a model's layers repeat a few bounds; each costs a few tensor ops)
def _half_top(a: float, b: float, dtype) -> float:
    b_rounded = float(torch.tensor([b], dtype=torch.float64).to(dtype).item())
    top = b_rounded if b_rounded < b else _adjacent(b_rounded, dtype, up=False)
    mid = (top + _adjacent(top, dtype, up=True)) / 2
    slack = 8 * 2.0 ** (math.frexp(max(abs(a), abs(mid)))[1] - 24)  # 8 float32 ulp of the largest magnitude
    hi = mid - slack
    return hi if hi > a else b


def _params(*values):
    return tuple(values) + (0.0,) * (6 - len(values))


def _uniform_spec(a, b):
    return (UNIFORM, _params(a, b))


def _normal_spec(mean, std):
    return (NORMAL, _params(mean, std))


# The largest |z| Box-Muller can produce from the stream: sqrt(-2 ln 2^-24) = 5.77 (u >= 2^-24).
BOX_MULLER_MAX = math.sqrt(-2.0 * math.log(2.0 ** -24))


def _trunc_normal_spec(mean, std, a, b):
    def norm_cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    if (mean < a - 2 * std) or (mean > b + 2 * std):
        warnings.warn("mean is more than 2 std from [a, b] in nn.init.trunc_normal_. "
                      "The distribution of values may be incorrect.", stacklevel=3)
    std = abs(std)  # (stock's rejection sampler draws N(mean, std^2) for a negative std too)
    if std > 0 and (a - mean) / std <= -6.0 and (b - mean) / std >= 6.0:
        # Bounds beyond 6 standard deviations (e.g. std=0.02 with the default a=-2, b=2) truncate
        # nothing the float32 stream can produce: the normal path never leaves +-5.77 std, and is
        # cheaper than the inverse CDF. (The float64 stream reaches 8.65 std: _fill clamps those.)
        return _normal_spec(mean, std) + ((a, b),)
    lo = 2 * norm_cdf((a - mean) / std) - 1
    hi = 2 * norm_cdf((b - mean) / std) - 1
    return (TRUNC_NORMAL, _params(lo, hi, a, b, mean, std * math.sqrt(2.0)))


def _params_f64(kind, params):
    """The float64 stream's eight parameters (csrc/philox.h): the float32 stream's six, except for the
    truncated normal, whose erf-domain interval is given as (lo, span, ..., qlo, qhi), each number at
    its own relative precision: lo = erf(alpha'), span = erf(beta') - erf(alpha') (from erfc where both
    bounds are on one side, so a narrow interval deep in a tail keeps its width), and the distances of
    the bounds from -1 and 1, qlo = erfc(-alpha') and qhi = erfc(beta'), which 1 -+ erf would round away
    beyond a few standard deviations."""
    if kind != TRUNC_NORMAL:
        return tuple(params) + (0.0, 0.0)
    a, b, mean, scale = params[2:6]
    lo_x, hi_x = (a - mean) / scale, (b - mean) / scale
    if lo_x >= 0:
        span = math.erfc(lo_x) - math.erfc(hi_x)
    elif hi_x <= 0:
        span = math.erfc(-hi_x) - math.erfc(-lo_x)
    else:
        span = math.erf(hi_x) - math.erf(lo_x)
    return (math.erf(lo_x), span, a, b, mean, scale, math.erfc(-lo_x), math.erfc(hi_x))


# What ATen's uniform_ and normal_ refuse, which torch.nn.init's functions reach, with their messages:
# the C++ name of the dtype, and numbers printed as C++ prints a double (6 significant digits).
_C_TYPE = {torch.float32: ("float", "Float"), torch.float64: ("double", "Double"),
           torch.float16: ("c10::Half", "Half"), torch.bfloat16: ("c10::BFloat16", "BFloat16")}


def _check_spec(spec, dtype):
    """Raise torch.nn.init's error for a fill it refuses on a tensor of `dtype`: U(a, b) with a bound
    outside the dtype's range, a > b or b - a beyond it (xavier_uniform_ with a negative gain too);
    N(mean, std) with std < 0 or NaN; trunc_normal_ with a > b (stock samples U(a, b) there)."""
    kind, p = spec[0], spec[1]
    names = _C_TYPE.get(dtype)
    if kind == UNIFORM and names is not None:
        a, b = p[0], p[1]
        info = torch.finfo(dtype)
        for name, v in (("from", a), ("to", b)):
            if not info.min <= v <= info.max:
                raise RuntimeError("%s is out of bounds for %s" % (name, names[0]))
        if not a <= b:
            raise RuntimeError("uniform_ expects to return a [from, to) range, but found from=%g > to=%g" % (a, b))
        if not b - a <= info.max:
            raise RuntimeError("uniform_ expects to-from <= std::numeric_limits<%s>::max(), but found to=%g and "
                               "from=%g which result in to-from to exceed the limit" % (names[1], b, a))
    elif kind == NORMAL and not p[1] >= 0:
        raise RuntimeError("normal expects std >= 0.0, but found std %g" % p[1])
    elif kind == TRUNC_NORMAL and not p[2] <= p[3]:
        raise RuntimeError("uniform_ expects to return a [from, to) range, but found from=%g > to=%g" % (p[2], p[3]))


def _apply(tensor, fname, spec_of, seed, generator, random=True, stock_args=(), complex_ok=True):
    """Shared driver: spec_of(t) gives each tensor's spec (or None to skip it). Inside fast_init the
    fills are recorded, to run batched later. What _stock_fills picks goes to torch.nn.init's own
    function (with `stock_args`, and a generator seeded from `seed` when one is given)."""
    single, tensors = _as_list(tensor, fname)
    kept, specs = [], []
    for t in _to_stock(tensors, fname, random, seed, generator, stock_args, complex_ok):
        spec = spec_of(t)
        if spec is None:
            continue
        if random:
            _check_spec(spec, t.dtype.to_real())
        kept.append(t)
        specs.append(spec)
    if kept:
        recorder = _active_recorder()
        if recorder is not None and seed is None and generator is None:
            recorder.record(kept, specs)  # (an explicit seed or generator runs now, with it)
        else:
            _fill(kept, specs, _draw_seed(seed, generator) if random else 0)
    return tensor if single else tensors


def uniform_(tensor, a: float = 0.0, b: float = 1.0, generator=None, *, seed=None):
    """Fill with values from U(a, b) (``torch.nn.init.uniform_``)."""
    return _apply(tensor, "uniform_", lambda t: _uniform_spec(a, b), seed, generator, stock_args=(a, b))


def normal_(tensor, mean: float = 0.0, std: float = 1.0, generator=None, *, seed=None):
    """Fill with values from N(mean, std^2) (``torch.nn.init.normal_``)."""
    return _apply(tensor, "normal_", lambda t: _normal_spec(mean, std), seed, generator, stock_args=(mean, std))


def trunc_normal_(tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0, generator=None,
                  *, seed=None):
    """Fill with a normal N(mean, std^2) truncated to [a, b] (``torch.nn.init.trunc_normal_``), by the
    inverse-CDF method: no rejection loop, no host synchronisation."""
    spec = _trunc_normal_spec(mean, std, a, b)
    return _apply(tensor, "trunc_normal_", lambda t: spec, seed, generator, stock_args=(mean, std, a, b),
                  complex_ok=False)  # (stock refuses complex tensors)


def constant_(tensor, val: float):
    """Fill with `val` (``torch.nn.init.constant_``)."""
    return _apply(tensor, "constant_", lambda t: (CONSTANT, _params(val)), None, None, random=False, stock_args=(val,))


def ones_(tensor):
    """Fill with ones (``torch.nn.init.ones_``)."""
    return _apply(tensor, "ones_", lambda t: (CONSTANT, _params(1.0)), None, None, random=False)


def zeros_(tensor):
    """Fill with zeros (``torch.nn.init.zeros_``)."""
    return _apply(tensor, "zeros_", lambda t: (CONSTANT, _params(0.0)), None, None, random=False)


def _nonempty(t) -> bool:
    if 0 in t.shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=4)
        return False
    return True


def xavier_uniform_(tensor, gain: float = 1.0, generator=None, *, seed=None):
    """Glorot uniform: U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)) (``torch.nn.init.xavier_uniform_``)."""
    def spec(t):
        fan_in, fan_out = _calculate_fan_in_and_fan_out(t)
        std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
        bound = math.sqrt(3.0) * std
        return _uniform_spec(-bound, bound)
    return _apply(tensor, "xavier_uniform_", spec, seed, generator, stock_args=(gain,))


def xavier_normal_(tensor, gain: float = 1.0, generator=None, *, seed=None):
    """Glorot normal: N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out)) (``torch.nn.init.xavier_normal_``)."""
    def spec(t):
        fan_in, fan_out = _calculate_fan_in_and_fan_out(t)
        return _normal_spec(0.0, gain * math.sqrt(2.0 / float(fan_in + fan_out)))
    return _apply(tensor, "xavier_normal_", spec, seed, generator, stock_args=(gain,))


def kaiming_uniform_(tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu", generator=None,
                     *, seed=None):
    """He uniform: U(-bound, bound), bound = gain * sqrt(3 / fan_mode) (``torch.nn.init.kaiming_uniform_``)."""
    def spec(t):
        if not _nonempty(t):
            return None
        fan = _calculate_correct_fan(t, mode)
        std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
        bound = math.sqrt(3.0) * std
        return _uniform_spec(-bound, bound)
    return _apply(tensor, "kaiming_uniform_", spec, seed, generator, stock_args=(a, mode, nonlinearity))


def kaiming_normal_(tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu", generator=None,
                    *, seed=None):
    """He normal: N(0, std^2), std = gain / sqrt(fan_mode) (``torch.nn.init.kaiming_normal_``)."""
    def spec(t):
        if not _nonempty(t):
            return None
        fan = _calculate_correct_fan(t, mode)
        return _normal_spec(0.0, calculate_gain(nonlinearity, a) / math.sqrt(fan))
    return _apply(tensor, "kaiming_normal_", spec, seed, generator, stock_args=(a, mode, nonlinearity))


# ----------------------------------------------------------------------------------------------
# Whole models.

def _kaiming_sqrt5_spec(weight):
    # kaiming_uniform_(w, a=sqrt(5)), the default of Linear and Conv*.
    fan = _calculate_correct_fan(weight, "fan_in")
    bound = math.sqrt(3.0) * (calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan))
    return _uniform_spec(-bound, bound)


def _fan_in_bias_spec(weight):
    fan_in, _ = _calculate_fan_in_and_fan_out(weight)
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    return _uniform_spec(-bound, bound)


def _module_specs(m):
    """[(tensor, spec)] reproducing m's own PyTorch default init, None if m is not a known layer."""
    ones, zeros = (CONSTANT, _params(1.0)), (CONSTANT, _params(0.0))
    out = []
    if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
        if isinstance(m.weight, nn.parameter.UninitializedParameter):
            return []
        if m.weight.numel() > 0:
            out.append((m.weight, _kaiming_sqrt5_spec(m.weight)))
            if m.bias is not None:
                out.append((m.bias, _fan_in_bias_spec(m.weight)))
        return out
    if isinstance(m, nn.Bilinear):
        bound = 1 / math.sqrt(m.weight.size(1))
        out.append((m.weight, _uniform_spec(-bound, bound)))
        if m.bias is not None:
            out.append((m.bias, _uniform_spec(-bound, bound)))
        return out
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return [(m.weight, _normal_spec(0.0, 1.0))]
    if isinstance(m, nn.modules.batchnorm._NormBase):
        m.reset_running_stats()
        if m.affine:
            out += [(m.weight, ones), (m.bias, zeros)]
        return out
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        for name, spec in (("weight", ones), ("bias", zeros)):
            p = getattr(m, name, None)
            if isinstance(p, Tensor):
                out.append((p, spec))
        return out
    if isinstance(m, nn.MultiheadAttention):
        def xavier_u(w):
            fan_in, fan_out = _calculate_fan_in_and_fan_out(w)
            bound = math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out))
            return _uniform_spec(-bound, bound)

        def xavier_n(w):
            fan_in, fan_out = _calculate_fan_in_and_fan_out(w)
            return _normal_spec(0.0, math.sqrt(2.0 / float(fan_in + fan_out)))

        if m._qkv_same_embed_dim:
            out.append((m.in_proj_weight, xavier_u(m.in_proj_weight)))
        else:
            out += [(w, xavier_u(w)) for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
        if m.in_proj_bias is not None:
            out += [(m.in_proj_bias, zeros), (m.out_proj.bias, zeros)]
        out += [(b, xavier_n(b)) for b in (m.bias_k, m.bias_v) if b is not None]
        return out
    if isinstance(m, nn.RNNBase):
        stdv = 1.0 / math.sqrt(m.hidden_size) if m.hidden_size > 0 else 0
        return [(w, _uniform_spec(-stdv, stdv)) for w in m.parameters()]
    return None


_OWN_INIT_METHODS = ("reset_parameters", "_reset_parameters", "init_weights")


def _own_init(m):
    """m's own init method (reset_parameters, _reset_parameters or init_weights) if it can be called
    without arguments, else None."""
    import inspect

    for name in _OWN_INIT_METHODS:
        fn = getattr(m, name, None)
        if not callable(fn):
            continue
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        if all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params):
            return fn
    return None


def reset_parameters(module: nn.Module, generator=None, *, seed=None, strict: bool = False) -> nn.Module:
    """Re-initialize every standard layer of `module` (Linear, Bilinear, Conv*/ConvTranspose*,
    Embedding(Bag), BatchNorm/InstanceNorm, LayerNorm, GroupNorm, RMSNorm, MultiheadAttention,
    RNN/LSTM/GRU) with its PyTorch default distribution, all in one batched call. Running
    statistics are reset and Embedding padding rows zeroed, as the layers' own reset_parameters do.

    Then every other module that holds parameters or floating-point buffers of its own and has an
    init method callable without arguments (``reset_parameters``, ``_reset_parameters`` or
    ``init_weights``, e.g. timm's VisionTransformer) gets it called, innermost first (the stock,
    unbatched path; an outer model's init_weights may re-initialize its layers its own way).

    A parameter or floating buffer that none of this writes (after a meta-device build and
    ``to_empty`` it holds garbage: ViT class tokens and position embeddings, Swin's relative position
    bias tables, ConvNeXt layer scales) is named in a warning, or raises with ``strict=True``.
    Returns `module`.
    """
    specs = {}  # id(tensor) -> (tensor, spec); later (outer) modules override inner ones
    covered = set()
    own = []  # modules whose own init method runs after the batched fill

    def visit(m):
        for child in m.children():
            visit(child)
        found = _module_specs(m)
        if found is None:
            direct = list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False)
                                                           if b.is_floating_point()]
            fn = _own_init(m) if direct else None
            if fn is not None:
                own.append((fn, direct))
            return
        for t, spec in found:
            specs[id(t)] = (t, spec)
        covered.update(id(t) for t in m.parameters(recurse=False))
        covered.update(id(b) for b in m.buffers(recurse=False))  # running statistics: reset above

    visit(module)
    if specs:
        tensors = [t for t, _ in specs.values()]
        _fill(tensors, [s for _, s in specs.values()], _draw_seed(seed, generator))
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.padding_idx is not None:
                m.weight[m.padding_idx].fill_(0)
    for fn, direct in own:
        fn()
        covered.update(id(t) for t in direct)
    left = [name for name, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_floating_point() and id(t) not in covered]
    if left:
        msg = ("torchfast.init.reset_parameters: %d tensor(s) have no known init and no reset_parameters/"
               "_reset_parameters/init_weights method to call, and were left as they were: %s"
               % (len(left), ", ".join(left[:20]) + (", ..." if len(left) > 20 else "")))
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return module


# ------------------------------------------------------------------------------------------------
# The rest of torch.nn.init's surface. eye_ and dirac_ draw no random numbers (torch's own per
# tensor); orthogonal_ and sparse_ draw their normal values in one batched Philox call for the whole
# list, then need per-tensor work that does not batch: a QR decomposition (orthogonal_) and a random
# choice of rows per column (sparse_, from a torch.Generator seeded from the same seed).

def eye_(tensor):
    """Fill 2-D tensors with the identity (``torch.nn.init.eye_``); a list is filled tensor by tensor."""
    single, tensors = _as_list(tensor, "eye_")
    for t in tensors:
        nn.init.eye_(t)
    return tensor if single else tensors


def dirac_(tensor, groups: int = 1):
    """Fill {3,4,5}-D tensors with the Dirac delta (``torch.nn.init.dirac_``), tensor by tensor."""
    single, tensors = _as_list(tensor, "dirac_")
    for t in tensors:
        nn.init.dirac_(t, groups)
    return tensor if single else tensors


_INFERENCE_UPDATE = ("Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone to "
                     "get a normal tensor before doing inplace update.See https://github.com/pytorch/rfcs/pull/17 "
                     "for more details.")


def orthogonal_(tensor, gain: float = 1.0, generator=None, *, seed=None):
    """A (semi-)orthogonal matrix, as ``torch.nn.init.orthogonal_``: torch's algorithm (QR of a
    standard normal matrix, signs fixed by R's diagonal, scaled by `gain`), with the normal matrices
    of the whole list drawn in one seeded Philox call."""
    single, tensors = _as_list(tensor, "orthogonal_")
    # (complex tensors too: stock's QR sign fix refuses them)
    mine = _to_stock(tensors, "orthogonal_", True, seed, generator, (gain,), complex_ok=False)
    for t in mine:
        if t.ndimension() < 2:
            raise ValueError("Only tensors with 2 or more dimensions are supported")
    work = [t for t in mine if t.numel() > 0]
    for t in work:  # (refused before anything is written, as the fills refuse it)
        if t.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(_INFERENCE_UPDATE)
    flats = []
    for t in work:
        rows = t.size(0)
        cols = t.numel() // rows
        flats.append(t.new_empty((rows, cols)))
    if flats:
        _fill(flats, [_normal_spec(0.0, 1.0)] * len(flats), _draw_seed(seed, generator))
    with torch.no_grad():
        for t, flat in zip(work, flats):
            rows, cols = flat.shape
            if rows < cols:
                flat.t_()
            q, r = torch.linalg.qr(flat)
            q *= torch.diag(r, 0).sign()
            if rows < cols:
                q.t_()
            t.view_as(q).copy_(q)
            t.mul_(gain)
    return tensor if single else tensors


def sparse_(tensor, sparsity, std: float = 0.01, generator=None, *, seed=None):
    """2-D tensors from N(0, std^2) with a fraction `sparsity` of each column zeroed, as
    ``torch.nn.init.sparse_``; normal values in one batched call, zeroed rows chosen per column
    by a torch.Generator seeded from the same seed."""
    single, tensors = _as_list(tensor, "sparse_")
    spec = _normal_spec(0.0, std)
    mine = _to_stock(tensors, "sparse_", True, seed, generator, (sparsity, std))
    for t in mine:
        if t.ndimension() != 2:
            raise ValueError("Only tensors with 2 dimensions are supported")
        _check_spec(spec, t.dtype.to_real())
    seed = _draw_seed(seed, generator)
    _fill(mine, [spec] * len(mine), seed)
    picker = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in mine:
            rows, cols = t.shape
            num_zeros = int(math.ceil(sparsity * rows))
            for col_idx in range(cols):
                row_indices = torch.randperm(rows, generator=picker)
                t[row_indices[:num_zeros].to(t.device), col_idx] = 0
    return tensor if single else tensors


def _deprecated(new):
    old = new.__name__[:-1]

    def alias(*args, **kwargs):
        warnings.warn("torchfast.init.%s is now deprecated in favor of torchfast.init.%s." % (old, new.__name__),
                      FutureWarning, stacklevel=2)
        return new(*args, **kwargs)

    alias.__name__ = old
    alias.__doc__ = "Deprecated alias of :func:`%s`, as in torch.nn.init." % new.__name__
    return alias


uniform = _deprecated(uniform_)
normal = _deprecated(normal_)
constant = _deprecated(constant_)
eye = _deprecated(eye_)
dirac = _deprecated(dirac_)
xavier_uniform = _deprecated(xavier_uniform_)
xavier_normal = _deprecated(xavier_normal_)
kaiming_uniform = _deprecated(kaiming_uniform_)
kaiming_normal = _deprecated(kaiming_normal_)
orthogonal = _deprecated(orthogonal_)
sparse = _deprecated(sparse_)


# ----------------------------------------------------------------------------------------------
# Deferred, batched construction: fast_init.

_TLS = threading.local()


def _active_recorder():
    return getattr(_TLS, "recorder", None)


def _storage_key(t):
    """What identifies a tensor's memory (views share it); None for tensors without data (meta)."""
    if t.device.type == "meta":
        return None
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return None


def _same_region(a, b) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()


_RNG_OPS = None


def _rng_ops():
    """The in-place aten ops fast_init records instead of running (Tensor.uniform_/normal_/zero_/fill_,
    as model init code writes them: ``module.weight.data.normal_(mean=0.0, std=0.02)``)."""
    global _RNG_OPS
    if _RNG_OPS is None:
        aten = torch.ops.aten
        _RNG_OPS = {aten.uniform_.default: "uniform", aten.normal_.default: "normal", aten.zero_.default: "zero",
                    aten.fill_.Scalar: "fill"}
    return _RNG_OPS


class _Recorder(TorchDispatchMode):
    """Records init fills (torch.nn.init calls routed to torchfast.init, and in-place RNG ops on tensors)
    instead of running them, and runs them batched: at the end, or, for the tensors an operation
    touches, just before it (so that every read, rescale, copy or QR sees the values sequential
    execution would have given them)."""

    @classmethod
    def _should_skip_dynamo(cls):
        # TorchDispatchMode wraps a subclass's __torch_dispatch__ in torch._disable_dynamo unless this
        # says no; that wrapper imports torch._dynamo on its first call, which made the first fast_init
        # of a process 2 s slower on a 2-core machine (GPT-2-medium fresh-process build: 1.1x stock
        # instead of 3.4x). The recorder runs in eager code only: nothing for Dynamo to skip.
        return False

    def __init__(self, seed):
        super().__init__()
        self.seed = seed
        self.pending = {}       # storage key -> (tensor, spec), in recording order
        self.flushes = 0
        self.recorded = 0
        self.launch_groups = 0

    def record(self, tensors, specs):
        for t, spec in zip(tensors, specs):
            key = _storage_key(t)
            if key is None:
                continue  # a meta tensor: nothing to fill (to_empty + reset_parameters later)
            if key in self.pending and not _same_region(self.pending[key][0], t):
                self.flush({key})  # another view of the same memory: keep the order exact
            self.pending.pop(key, None)  # a later init of the same tensor replaces the earlier one
            self.pending[key] = (t, spec)
            self.recorded += 1

    def flush(self, keys=None):
        """Run the pending fills (those of `keys` only, when given: fills of other memory can wait)."""
        if keys is None:
            todo, self.pending = self.pending, {}
        else:
            todo = {k: self.pending.pop(k) for k in list(self.pending) if k in keys}
        if not todo:
            return
        tensors, specs = zip(*todo.values())
        seed = (self.seed + 0x9E3779B97F4A7C15 * self.flushes) % _SEED_LIMIT  # one seed per flush
        self.flushes += 1
        self.launch_groups += len({(t.device, t.dtype) for t in tensors})
        prev, _TLS.recorder = _TLS.recorder, None  # the fills themselves must not be recorded
        try:
            _fill(list(tensors), list(specs), seed)
        finally:
            _TLS.recorder = prev

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _rng_ops().get(func)
        if kind is not None and _TLS.recorder is self and kwargs.get("generator") is None:
            t = args[0]
            if t.is_floating_point() and _storage_key(t) is not None and t.is_contiguous():
                if kind == "uniform":
                    lo = args[1] if len(args) > 1 else kwargs.get("from", 0.0)
                    hi = args[2] if len(args) > 2 else kwargs.get("to", 1.0)
                    spec = _uniform_spec(float(lo), float(hi))
                elif kind == "normal":
                    mean = args[1] if len(args) > 1 else kwargs.get("mean", 0.0)
                    std = args[2] if len(args) > 2 else kwargs.get("std", 1.0)
                    spec = _normal_spec(float(mean), float(std))
                else:
                    spec = (CONSTANT, _params(0.0 if kind == "zero" else float(args[1])))
                if kind in ("uniform", "normal"):
                    _check_spec(spec, t.dtype)  # refused at the call, as the aten op refuses it
                self.record([t], [spec])
                return t
        if self.pending and not getattr(func, "is_view", False):  # views (.data, .t(), slices) move no data
            touched = {_storage_key(a) for a in torch.utils._pytree.tree_leaves((args, kwargs))
                       if isinstance(a, torch.Tensor)}
            if not touched.isdisjoint(self.pending):
                self.flush(touched)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fast_init(seed=None, device=None, generator=None):
    """Build models with their own init code, with the random fills batched::

        with torchfast.init.fast_init(seed=0):
            model = torchvision.models.resnet50()

    Inside the context every ``torch.nn.init`` call (the layers' ``reset_parameters`` and the models'
    own init loops: ``kaiming_normal_(mode="fan_out")``, ``trunc_normal_(std=.02)``, ...) and every
    in-place ``uniform_`` / ``normal_`` / ``zero_`` / ``fill_`` on a tensor (Hugging Face-style
    ``module.weight.data.normal_(std=0.02)``) is recorded with its distribution (fan and gain computed
    when it is recorded, as stock does) and run later as one batched torchfast fill per (device,
    dtype): when the context exits, or as soon as any other operation touches a tensor with a pending
    fill (a rescale, a copy, ``orthogonal_``'s QR), so every operation sees what sequential execution
    would have given it; a later init of the same tensor replaces the earlier one. The values are
    torchfast's Philox values for the context's seed (``seed=``, else drawn from ``generator`` or
    torch's default generator): the same on every device and thread count, distributed as the model's
    own init, not stock's exact numbers. ``device=`` builds on that device. Yields a dict that reports,
    after the context, how many fills were recorded and in how many batched calls they ran.
    """
    if _active_recorder() is not None:
        raise RuntimeError("torchfast.init.fast_init: already inside fast_init")
    recorder = _Recorder(_draw_seed(seed, generator))
    report = {}
    patched = {}
    for name in ("uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                 "kaiming_normal_", "zeros_", "ones_", "constant_"):
        patched[name] = getattr(nn.init, name)
        setattr(nn.init, name, globals()[name])
    # timm's trunc_normal_ (imported by name into every timm model module) calls its module's
    # _trunc_normal_(tensor, mean, std, a, b) at run time: recorded too, when timm is loaded
    timm_init = sys.modules.get("timm.layers.weight_init")
    timm_patched = getattr(timm_init, "_trunc_normal_", None) if timm_init is not None else None
    if timm_patched is not None:
        timm_init._trunc_normal_ = lambda tensor, mean, std, a, b: trunc_normal_(tensor, mean, std, a, b)
    device_ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    _TLS.recorder = recorder
    try:
        with device_ctx, recorder:
            yield report
            recorder.flush()
    finally:
        _TLS.recorder = None
        for name, fn in patched.items():
            setattr(nn.init, name, fn)
        if timm_patched is not None:
            timm_init._trunc_normal_ = timm_patched
        report.update(recorded=recorder.recorded, batched_calls=recorder.flushes,
                      launch_groups=recorder.launch_groups)
