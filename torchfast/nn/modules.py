"""Drop-in fused BatchNorm+ReLU and BatchNorm+add+ReLU layers, and the functions the fuse pass calls.

``BatchNormReLU2d(C)`` is an ``nn.BatchNorm2d(C)`` (a subclass: same constructor, parameters,
buffers, ``state_dict`` and train/eval behaviour) whose forward returns ``relu(bn(x))`` computed by
one fused op; ``BatchNormAddReLU2d(C)(x, residual)`` returns ``relu(bn(x) + residual)``. A stock
BatchNorm checkpoint loads into either and back. ``bn_relu_module(bn, x)`` and
``bn_add_relu_module(bn, x, r)`` compute the same for any BatchNorm module ``bn`` (what
``torchfast.nn.fuse`` calls on the model's own modules).

``torch.jit.script`` compiles a fused layer through ``__prepare_scriptable__`` (see
``_FusedBatchNorm.__prepare_scriptable__``): the scripted layer calls the same fused op
(``torch.ops.torchfast.bn_relu`` / ``bn_add_relu``), so a saved scripted model needs ``import torchfast``
before ``torch.jit.load``, which otherwise does not know the op.
"""
import copyreg
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, fx, nn

from torchfast import _backends, _ext
from torchfast.nn import _sync
from torchfast.nn.functional import _kernel_dtypes, _stock_semantics_needed, batch_norm_add_relu, batch_norm_relu

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "BatchNormAddReLU1d", "BatchNormAddReLU2d",
           "BatchNormAddReLU3d", "SyncBatchNormReLU", "SyncBatchNormAddReLU", "convert_batchnorm_relu",
           "convert_sync_batchnorm"]


def _state(bn, table, name):
    """bn.<name>, read from `table` (the module's _parameters or _buffers) when it is there, as
    attribute access would find it but without nn.Module.__getattr__'s search; else by attribute (a
    parametrized weight, say)."""
    return table[name] if name in table else getattr(bn, name)


def _bn_call_args(bn, input):
    """What ``torch.nn.modules.batchnorm._BatchNorm.forward`` passes to ``F.batch_norm`` for module
    `bn`, with the same side effect (num_batches_tracked += 1 in training): (running_mean,
    running_var, training, momentum). momentum=None (cumulative average),
    track_running_stats=False and eval without running statistics behave as stock. The buffers are
    read from the module's buffer dict, where attribute access finds them, without
    nn.Module.__getattr__'s search (a small layer's step spent ~10 us here)."""
    bn._check_input_dim(input)
    running_mean = _state(bn, bn._buffers, "running_mean")
    running_var = _state(bn, bn._buffers, "running_var")
    momentum = bn.momentum
    exponential_average_factor = 0.0 if momentum is None else momentum
    if bn.training:
        if not bn.track_running_stats:  # batch statistics, running ones neither used nor updated
            return None, None, True, exponential_average_factor
        tracked = _state(bn, bn._buffers, "num_batches_tracked")
        if tracked is not None:
            tracked.add_(1)
            if momentum is None:
                exponential_average_factor = 1.0 / float(tracked)
        return running_mean, running_var, True, exponential_average_factor
    # eval: batch statistics only without running statistics, which are then both None
    bn_training = running_mean is None and running_var is None
    return running_mean, running_var, bn_training, exponential_average_factor


def _sync_needed(bn) -> bool:
    """torch.nn.SyncBatchNorm.forward's own test: does this call synchronise statistics across
    processes (training, torch.distributed initialised, more than one process in the group)?"""
    if not isinstance(bn, nn.SyncBatchNorm):
        return False
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not (bn_training and bn.training and dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(bn.process_group or dist.group.WORLD) > 1


def _sync_call(bn, input, residual):
    """A SyncBatchNorm training call across processes: the fused synchronised op (torchfast.nn._sync),
    or stock SyncBatchNorm and then the add and ReLU for what the fused kernels do not take (mixed
    dtypes, another residual shape or dtype, forward-mode AD, torch.func transforms)."""
    if input.dim() < 2:
        bn._check_input_dim(input)
    if input.size(1) == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    fusable = (_kernel_dtypes(input, bn.running_mean, bn.running_var, bn.weight, bn.bias)
               and not _stock_semantics_needed(input, residual, bn.running_mean, bn.running_var, bn.weight, bn.bias)
               and (residual is None or (isinstance(residual, torch.Tensor) and residual.shape == input.shape
                                         and residual.dtype == input.dtype and residual.device == input.device)))
    if not fusable:
        return _sync.stock_sync_forward(bn, input, residual)
    running_mean, running_var, _training, momentum = _bn_call_args(bn, input)
    return _sync.sync_forward(bn, input, residual, running_mean, running_var, momentum)


def bn_relu_module(bn, input):
    """``relu(bn(input))`` for a BatchNorm module `bn`, fused (what the ``fuse`` pass calls). A
    SyncBatchNorm whose call synchronises statistics across processes runs the fused synchronised op."""
    if _sync_needed(bn):
        return _sync_call(bn, input, None)
    running_mean, running_var, training, momentum = _bn_call_args(bn, input)
    params = bn._parameters
    return batch_norm_relu(input, running_mean, running_var, _state(bn, params, "weight"), _state(bn, params, "bias"),
                           training, momentum, bn.eps)


def bn_add_relu_module(bn, input, residual):
    """``relu(bn(input) + residual)`` for a BatchNorm module `bn`, fused (what the ``fuse`` pass calls);
    SyncBatchNorm as in ``bn_relu_module``."""
    if _sync_needed(bn):
        return _sync_call(bn, input, residual)
    running_mean, running_var, training, momentum = _bn_call_args(bn, input)
    params = bn._parameters
    return batch_norm_add_relu(input, residual, running_mean, running_var, _state(bn, params, "weight"),
                               _state(bn, params, "bias"), training, momentum, bn.eps)


# ------------------------------------------------------------------------------------------------
# TorchScript: what a scripted fused layer (and a scripted fused model, torchfast.nn.fusion) runs. The
# eager path's choices (torchfast.nn.functional) are Python that TorchScript does not compile, so they
# are written again here in TorchScript's subset; the fused op is the eager layer's, so the results are.

# Whether the compiled kernels serve each device: the eager default backend there (a forced backend,
# TORCHFAST_BACKEND, is not consulted). Read when a module is scripted, as a constant of its code.
_FUSED_CPU = _backends._HAS_CPU_KERNEL["bn_relu"] and _backends._HAS_CPU_KERNEL["bn_add_relu"]
_FUSED_CUDA = _backends._HAS_CUDA_KERNEL["bn_relu"] and _backends._HAS_CUDA_KERNEL["bn_add_relu"]
_is_scripting = torch.jit.is_scripting  # TorchScript's builtin: a compile-time True in compiled code

if _ext._C is not None:
    def _fused_bn_relu(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                       running_var: Optional[Tensor], training: bool, momentum: float, eps: float) -> Tensor:
        """The compiled whole-call op (forward and running-statistics update), the eager layer's."""
        return torch.ops.torchfast.bn_relu(input, weight, bias, running_mean, running_var, training, momentum, eps)

    def _fused_bn_add_relu(input: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                           momentum: float, eps: float) -> Tensor:
        return torch.ops.torchfast.bn_add_relu(input, residual, weight, bias, running_mean, running_var, training,
                                               momentum, eps)
else:
    # Without torchfast._C no device is fused (_FUSED_CPU/_CUDA): never called. The ops' names must not
    # appear in the compiled code, which would refer to ops that do not exist.
    def _fused_bn_relu(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                       running_var: Optional[Tensor], training: bool, momentum: float, eps: float) -> Tensor:
        raise RuntimeError("torchfast._C is not built")

    def _fused_bn_add_relu(input: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                           momentum: float, eps: float) -> Tensor:
        raise RuntimeError("torchfast._C is not built")


def _script_kernels_take(input: Tensor, residual: Optional[Tensor], params: List[Optional[Tensor]], training: bool,
                         eps: float, fused_cpu: bool, fused_cuda: bool) -> bool:
    """The eager choice of the compiled whole-call op (functional.batch_norm_relu): a device whose kernels
    are built, an eps the op takes (_plain_scalars), a kernel dtype with the parameters' and running
    statistics' dtypes of _kernel_dtypes, a residual of the input's shape, dtype and device."""
    device = input.device.type
    if not ((device == "cpu" and fused_cpu) or (device == "cuda" and fused_cuda)):
        return False
    if not (eps > 0.0 if training else eps >= 0.0):
        return False
    dt = input.dtype
    reduced = dt == torch.float16 or dt == torch.bfloat16
    if not (reduced or dt == torch.float32 or dt == torch.float64):
        return False
    if residual is not None and not (residual.shape == input.shape and residual.dtype == dt
                                     and residual.device == input.device):
        return False
    same = True
    mixed = True
    for p in params:
        if p is not None:
            same = same and p.dtype == dt
            mixed = mixed and p.dtype == torch.float32
    return same or (mixed and reduced)


def _script_bn_args(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    num_batches_tracked: Optional[Tensor], training: bool, momentum: Optional[float],
                    track_running_stats: bool, sync: bool
                    ) -> Tuple[Optional[Tensor], Optional[Tensor], bool, float]:
    """_bn_call_args in TorchScript (stock ``_BatchNorm.forward``'s arguments to F.batch_norm, with its
    num_batches_tracked update): (running_mean, running_var, training, momentum)."""
    if sync and training:
        raise RuntimeError("torchfast: a scripted SyncBatchNorm layer cannot synchronise statistics across "
                           "processes (TorchScript has no torch.distributed; stock SyncBatchNorm does not script "
                           "at all): script it in eval mode, or convert it to a BatchNorm layer first")
    factor = 0.0
    if momentum is not None:
        factor = momentum
    if training and track_running_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    if training and not track_running_stats:  # batch statistics; running ones neither used nor updated
        return None, None, True, factor
    # eval: batch statistics only without running statistics, which are then both None
    return running_mean, running_var, training or (running_mean is None and running_var is None), factor


def _script_bn_relu(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor], training: bool,
                    momentum: Optional[float], eps: float, track_running_stats: bool, sync: bool, fused_cpu: bool,
                    fused_cuda: bool) -> Tensor:
    """``relu(bn(input))`` in TorchScript for a BatchNorm's state: the fused op where the eager layer calls
    it, stock's composition where it does (another dtype mix), so the result is the eager layer's."""
    running_mean, running_var, training, factor = _script_bn_args(running_mean, running_var, num_batches_tracked,
                                                                  training, momentum, track_running_stats, sync)
    if _script_kernels_take(input, None, [weight, bias, running_mean, running_var], training, eps, fused_cpu,
                            fused_cuda):
        return _fused_bn_relu(input, weight, bias, running_mean, running_var, training,
                              factor if training else 0.0, eps)
    return torch.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, factor, eps))


def _script_bn_add_relu(input: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        num_batches_tracked: Optional[Tensor], training: bool, momentum: Optional[float], eps: float,
                        track_running_stats: bool, sync: bool, fused_cpu: bool, fused_cuda: bool) -> Tensor:
    """``relu(bn(input) + residual)`` as _script_bn_relu; stock's composition also for a residual the op
    does not take (one that broadcasts or promotes), as eager."""
    running_mean, running_var, training, factor = _script_bn_args(running_mean, running_var, num_batches_tracked,
                                                                  training, momentum, track_running_stats, sync)
    if _script_kernels_take(input, residual, [weight, bias, running_mean, running_var], training, eps, fused_cpu,
                            fused_cuda):
        return _fused_bn_add_relu(input, residual, weight, bias, running_mean, running_var, training,
                                  factor if training else 0.0, eps)
    return torch.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, factor, eps) + residual)


def _share_state(fused, bn):
    """Make `fused` use `bn`'s own Parameter and buffer objects, training flag and hooks, as
    torch.nn.SyncBatchNorm.convert_sync_batchnorm does: an optimizer built before the conversion
    keeps updating the layer, and requires_grad stays as it was. (The hooks are ones that see the same
    values on the fused layer: from_batchnorm refuses a BatchNorm whose output hooks would not.)"""
    for name, p in bn._parameters.items():
        fused._parameters[name] = p
    for name, b in bn._buffers.items():
        fused._buffers[name] = b
    fused._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    fused.training = bn.training
    for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks"):
        if hasattr(bn, attr):
            setattr(fused, attr, getattr(bn, attr).copy())
    if hasattr(bn, "qconfig"):
        fused.qconfig = bn.qconfig
    return fused


def _activation_of(bn):
    """For layers that carry their own activation (timm's BatchNormAct2d): None when `bn` is a plain
    BatchNorm; otherwise raise unless it is a ReLU with no dropout in between."""
    act = getattr(bn, "act", None)
    if act is None and not hasattr(bn, "drop"):
        return None
    drop = getattr(bn, "drop", None)
    if type(act) is not nn.ReLU or not (drop is None or isinstance(drop, nn.Identity)):
        raise ValueError("from_batchnorm: %s applies %s%s after the normalisation, not a plain ReLU; only a "
                         "ReLU can be fused" % (type(bn).__name__, type(act).__name__ if act is not None else "no "
                                                "activation", " and %s" % type(drop).__name__
                                                if drop is not None and not isinstance(drop, nn.Identity) else ""))
    return act


def _fx_leaf_call(module, *args):
    """Under torch.fx symbolic tracing (a Proxy input), record the fused layer as one call_module
    node, as fx does for stock BatchNorm, instead of tracing into its Python-level checks."""
    tracer = next(a for a in args if isinstance(a, fx.Proxy)).tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


class _FusedBatchNorm:
    @classmethod
    def from_batchnorm(cls, bn):
        """The fused layer for `bn` (a BatchNorm{1,2,3}d, or timm's BatchNormAct2d with a ReLU), sharing
        `bn`'s Parameters, buffers, training mode and hooks. Refuses a plain BatchNorm with forward or
        backward hooks: fused, they would see the output after the ReLU (or its gradient through the
        ReLU's mask), where they see the BatchNorm's own; forward pre-hooks (the input) are carried."""
        if (_activation_of(bn) is None and not isinstance(bn, _FusedBatchNorm)
                and has_hooks(bn, output_only=True)):
            raise ValueError("from_batchnorm: this %s has forward or backward hooks, which would see the output "
                             "after the ReLU (or its gradient after the ReLU's mask) once fused; remove them "
                             "first, or keep this BatchNorm and its ReLU stock (convert_batchnorm_relu and "
                             "torchfast.nn.fuse leave such a BatchNorm unconverted)" % type(bn).__name__)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for key in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(fused, key, getattr(bn, key))
        if isinstance(fused, nn.SyncBatchNorm):
            fused.process_group = getattr(bn, "process_group", None)
        return _share_state(fused, bn)

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles for this layer (it calls this first): the layer itself, its
        very ``__dict__`` (Parameters, buffers, hooks, mode), as its ``_Scriptable`` class, whose forward
        TorchScript compiles; the eager forward stays free of any scripting test. TorchScript puts what
        this returns in the layer's place in a parent it scripts, the eager parent included: there it is
        the same layer in everything but identity, and it pickles and copies as the layer's class. A
        subclass of a fused layer is scripted as its own class."""
        twin = _SCRIPTABLE.get(type(self))
        if twin is None:
            return self
        prepared = object.__new__(twin)
        object.__setattr__(prepared, "__dict__", self.__dict__)
        return prepared


class _BatchNormReLUMixin(_FusedBatchNorm):
    def forward(self, input):
        if isinstance(input, fx.Proxy):
            return _fx_leaf_call(self, input)
        return bn_relu_module(self, input)


class _BatchNormAddReLUMixin(_FusedBatchNorm):
    def forward(self, input, residual):
        if isinstance(input, fx.Proxy) or isinstance(residual, fx.Proxy):
            return _fx_leaf_call(self, input, residual)
        return bn_add_relu_module(self, input, residual)


class BatchNormAddReLU1d(_BatchNormAddReLUMixin, nn.BatchNorm1d):
    """``relu(nn.BatchNorm1d(...)(x) + residual)`` fused; called as ``layer(x, residual)``."""


class BatchNormAddReLU2d(_BatchNormAddReLUMixin, nn.BatchNorm2d):
    """``relu(nn.BatchNorm2d(...)(x) + residual)`` fused, the tail of a ResNet block; called as
    ``layer(x, residual)``; x and residual contiguous or channels_last."""


class BatchNormAddReLU3d(_BatchNormAddReLUMixin, nn.BatchNorm3d):
    """``relu(nn.BatchNorm3d(...)(x) + residual)`` fused; called as ``layer(x, residual)``."""


class BatchNormReLU1d(_BatchNormReLUMixin, nn.BatchNorm1d):
    """``relu(nn.BatchNorm1d(...)(x))`` fused; input (N, C) or (N, C, L)."""


class BatchNormReLU2d(_BatchNormReLUMixin, nn.BatchNorm2d):
    """``relu(nn.BatchNorm2d(...)(x))`` fused; input (N, C, H, W), contiguous or channels_last."""


class BatchNormReLU3d(_BatchNormReLUMixin, nn.BatchNorm3d):
    """``relu(nn.BatchNorm3d(...)(x))`` fused; input (N, C, D, H, W), contiguous or channels_last_3d."""


_FUSED = {nn.BatchNorm1d: BatchNormReLU1d, nn.BatchNorm2d: BatchNormReLU2d, nn.BatchNorm3d: BatchNormReLU3d}


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# The hooks that see a module's output or its gradient (backward pre-hooks see the output's gradient).
OUTPUT_HOOK_DICTS = ("_forward_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(m: nn.Module, output_only: bool = False) -> bool:
    """Whether module `m` has forward, forward-pre or backward hooks of its own: the fuse pass's test,
    whose fused calls are no module calls and would run none of them. With ``output_only``, only hooks
    that see its output or output gradient: convert_batchnorm_relu's test for a BatchNorm, whose fused
    layer is still called as a module (its pre-hooks run and see the same input) but outputs after the
    ReLU."""
    return any(getattr(m, name, None) for name in (OUTPUT_HOOK_DICTS if output_only else HOOK_DICTS))


def convert_batchnorm_relu(module: nn.Module) -> nn.Module:
    """Replace, in place, every BatchNorm{1,2,3}d immediately followed by a ReLU inside an
    ``nn.Sequential`` with the fused layer (and the ReLU with ``nn.Identity``). Returns `module`. A ReLU
    subclass or a ReLU module with hooks is left alone, and so is a BatchNorm with forward or backward
    hooks (fused, they would see the output after the ReLU); forward pre-hooks are carried over.

    Only Sequential pairs are rewritten: a BatchNorm whose ReLU is applied in a ``forward`` method
    cannot be detected without tracing, and is left alone.
    """
    for child in module.children():
        convert_batchnorm_relu(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules.keys())
        for a, b in zip(names, names[1:]):
            bn, act = module._modules[a], module._modules[b]
            # exactly nn.ReLU (a subclass may compute something else), without hooks (they would be lost),
            # after a BatchNorm without hooks on its output (they would see the ReLU's output)
            if (type(bn) in _FUSED and type(act) is nn.ReLU and not has_hooks(act)
                    and not has_hooks(bn, output_only=True)):
                module._modules[a] = _FUSED[type(bn)].from_batchnorm(bn)
                module._modules[b] = nn.Identity()
    return module


class SyncBatchNormReLU(_BatchNormReLUMixin, nn.SyncBatchNorm):
    """``relu(nn.SyncBatchNorm(...)(x))``: SyncBatchNorm's constructor, state_dict and semantics. A
    training call in a group of several processes computes the statistics over the group (one
    all-reduce forward, one backward) around fused kernels, on GPUs and on CPUs (gloo; stock
    SyncBatchNorm needs a GPU); any other call (one process, eval) runs the fused op. What
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` makes of a ``BatchNormReLU*d`` (see below)."""


class SyncBatchNormAddReLU(_BatchNormAddReLUMixin, nn.SyncBatchNorm):
    """``relu(nn.SyncBatchNorm(...)(x) + residual)``, as ``SyncBatchNormReLU``."""


class _ScriptableLayer:
    """What the _Scriptable classes add to a fused layer class: the forward TorchScript compiles, and a
    pickled or copied instance being the layer's own class."""

    def __prepare_scriptable__(self):
        return self

    def __reduce_ex__(self, protocol):
        # copyreg's reconstructor, as pickle protocols 0 and 1 use: pickle refuses a __newobj__ of
        # another class than the object's
        return copyreg._reconstructor, (self._torchfast_layer, object, None), self.__dict__


class _ScriptableBatchNormReLU(_ScriptableLayer):
    def forward(self, input: Tensor) -> Tensor:
        if not _is_scripting():  # decided when compiled: eager calls run the layer's own forward
            return _BatchNormReLUMixin.forward(self, input)
        self._check_input_dim(input)
        return _script_bn_relu(input, self.weight, self.bias, self.running_mean, self.running_var,
                               self.num_batches_tracked, self.training, self.momentum, self.eps,
                               self.track_running_stats, self._torchfast_sync, self._torchfast_cpu,
                               self._torchfast_cuda)


class _ScriptableBatchNormAddReLU(_ScriptableLayer):
    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        if not _is_scripting():
            return _BatchNormAddReLUMixin.forward(self, input, residual)
        self._check_input_dim(input)
        return _script_bn_add_relu(input, residual, self.weight, self.bias, self.running_mean, self.running_var,
                                   self.num_batches_tracked, self.training, self.momentum, self.eps,
                                   self.track_running_stats, self._torchfast_sync, self._torchfast_cpu,
                                   self._torchfast_cuda)


class _Scriptable:
    """The classes torch.jit.script compiles the fused layers as (``_Scriptable.BatchNormReLU2d``...):
    each layer class with a TorchScript forward, under the layer's own name (the scripted module's
    ``original_name``). Instances are only made by ``__prepare_scriptable__``."""


def _scriptable_class(cls, forward_mixin):
    twin = type(cls.__name__, (forward_mixin, cls), {
        "__module__": __name__, "__qualname__": "_Scriptable." + cls.__name__, "__doc__": cls.__doc__,
        # constants of the compiled code (TorchScript reads a module's constants, not Python globals)
        "__constants__": list(cls.__constants__) + ["_torchfast_sync", "_torchfast_cpu", "_torchfast_cuda"],
        "_torchfast_sync": issubclass(cls, nn.SyncBatchNorm), "_torchfast_cpu": _FUSED_CPU,
        "_torchfast_cuda": _FUSED_CUDA, "_torchfast_layer": cls})
    setattr(_Scriptable, cls.__name__, twin)
    return twin


_SCRIPTABLE = {cls: _scriptable_class(cls, _ScriptableBatchNormReLU)
               for cls in (BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d, SyncBatchNormReLU)}
_SCRIPTABLE.update({cls: _scriptable_class(cls, _ScriptableBatchNormAddReLU)
                    for cls in (BatchNormAddReLU1d, BatchNormAddReLU2d, BatchNormAddReLU3d, SyncBatchNormAddReLU)})

_TO_SYNC = {BatchNormReLU1d: SyncBatchNormReLU, BatchNormReLU2d: SyncBatchNormReLU, BatchNormReLU3d: SyncBatchNormReLU,
            SyncBatchNormReLU: SyncBatchNormReLU, BatchNormAddReLU1d: SyncBatchNormAddReLU,
            BatchNormAddReLU2d: SyncBatchNormAddReLU, BatchNormAddReLU3d: SyncBatchNormAddReLU,
            SyncBatchNormAddReLU: SyncBatchNormAddReLU}
_TO_SYNC.update({twin: _TO_SYNC[cls] for cls, twin in _SCRIPTABLE.items()})
_stock_convert_sync_batchnorm = nn.SyncBatchNorm.convert_sync_batchnorm.__func__


def _convert_sync_batchnorm(cls, module, process_group=None):
    target = _TO_SYNC.get(type(module))
    if target is None:
        return _stock_convert_sync_batchnorm(cls, module, process_group)
    converted = target.from_batchnorm(module)
    converted.process_group = process_group
    for name, child in module.named_children():
        converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
    return converted


# torch.nn.SyncBatchNorm.convert_sync_batchnorm sees the fused layers as BatchNorms (they are subclasses)
# and would replace them with a plain SyncBatchNorm, silently dropping the ReLU. PyTorch offers no hook
# for this, so importing torchfast extends that classmethod: fused layers become the fused sync layers
# (sharing their Parameters and buffers); every other module converts exactly as before.
nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(_convert_sync_batchnorm)


def _patch_ddp_cpu_check():
    """DistributedDataParallel refuses CPU modules holding a SyncBatchNorm ("SyncBatchNorm layers only
    work with GPU modules": stock's needs CUDA kernels). torchfast's synchronised layers run on CPUs too
    (gloo), so the check is narrowed to the layers it is about: a module with a stock SyncBatchNorm still
    gets DDP's error; one whose synchronised layers are all torchfast's does not."""
    ddp = getattr(getattr(nn, "parallel", None), "DistributedDataParallel", None)
    stock = getattr(ddp, "_passing_sync_batchnorm_handle", None)
    if stock is None or getattr(stock, "_torchfast", False):
        return

    def check(self, module):
        if any(isinstance(m, nn.SyncBatchNorm) and not isinstance(m, _FusedBatchNorm) for m in module.modules()):
            return stock(self, module)
        return None
    check._torchfast = True
    ddp._passing_sync_batchnorm_handle = check


_patch_ddp_cpu_check()


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` keeping every fusion: stock BatchNorms become
    SyncBatchNorm, fused layers their synchronised counterparts. Returns the converted module."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
