"""``torchfast.nn.fuse(model)``: every BatchNorm -> ReLU and BatchNorm -> add -> ReLU of an unmodified
model computed by the fused ops.

How it works (torch.fx): the pass traces a module's ``forward`` (BatchNorm layers and modules with
hooks stay leaves), finds the patterns in the graph, and swaps each matched group of nodes for one
call of :func:`torchfast.nn.modules.bn_relu_module` / :func:`bn_add_relu_module` on the *same*
BatchNorm module object. The rewritten graph's code becomes that module's forward, bound to the
module itself (an instance attribute), so:

* nothing is rebuilt: every module keeps its class, Parameters, buffers, hooks, ``state_dict`` keys
  and attributes (``model.layer1[0]``, ``model.fc`` and the model's other methods stay as they were;
  an optimizer built before ``fuse`` keeps working);
* the BatchNorm modules are still stock ``nn.BatchNorm*d``; calling one of them (or a block) on its
  own runs stock code, only the traced forward calls the fused ops;
* ``train()``/``eval()``, ``.to()``, channels_last, ``copy.deepcopy``, ``torch.save`` of the module,
  DDP and ``torch.compile`` work on the fused model; so do ``torch.jit.trace`` and ``torch.jit.script``,
  which compiles the fused graph (see :meth:`FusedForward.prepare_scriptable`);
* a module the rewritten code inlined or removed that is replaced or given hooks after ``fuse`` is
  followed: the call runs the class's own forward (see :class:`FusedForward`).

A module whose forward does not trace is left as it is and its children are tried one by one. The
pass refuses (and says why in its report) whatever it cannot prove equivalent: a BatchNorm output
used by more than one node, another activation, a BatchNorm subclass it does not know, a BatchNorm
or ReLU module with hooks, a forward whose traced graph depends on ``self.training`` (traced in both modes and
compared), an in-place add that would mutate the residual, an add with ``alpha``.
"""
import copy
import copyreg
import inspect
import itertools
import linecache
import operator
import types
import warnings
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as _module_mod
from torch.nn.modules.batchnorm import _BatchNorm

from torchfast.nn import modules as _modules

__all__ = ["fuse", "FuseReport"]

_STOCK_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_FUSED_BN = (_modules.BatchNormReLU1d, _modules.BatchNormReLU2d, _modules.BatchNormReLU3d,
             _modules.BatchNormAddReLU1d, _modules.BatchNormAddReLU2d, _modules.BatchNormAddReLU3d,
             _modules.SyncBatchNormReLU, _modules.SyncBatchNormAddReLU)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_HOOK_DICTS = _modules.HOOK_DICTS


class FuseReport:
    """What :func:`fuse` did: BatchNorm layers fused with their ReLU (``pairs``) and with an add and a
    ReLU (``triples``), by qualified name; what it left alone and why (``left``: (name, reason));
    the modules whose forward it rewrote (``rewritten``) and those it could not trace
    (``untraced``: (name, reason))."""

    def __init__(self):
        self.pairs: List[str] = []
        self.triples: List[str] = []
        self.left: List[Tuple[str, str]] = []
        self.rewritten: List[str] = []
        self.untraced: List[Tuple[str, str]] = []

    def __str__(self):
        lines = ["torchfast.nn.fuse: %d BatchNorm->ReLU and %d BatchNorm->add->ReLU fused; %d BatchNorm left alone"
                 % (len(self.pairs), len(self.triples), len(self.left))]
        for name, why in self.left:
            lines.append("  left %s: %s" % (name or "<root>", why))
        for name, why in self.untraced:
            lines.append("  not traced %s: %s" % (name or "<root>", why))
        return "\n".join(lines)

    __repr__ = __str__


def fuse(model: nn.Module, *, verbose: bool = False, return_report: bool = False):
    """Fuse, in place, every BatchNorm{1,2,3}d -> ReLU and BatchNorm -> add -> ReLU in `model`
    (and timm's ``BatchNormAct2d`` with a ReLU) into torchfast's fused ops. Returns `model` (and
    the :class:`FuseReport` with ``return_report=True``; ``verbose=True`` prints it).

    The model stays the same object with the same modules, Parameters, buffers and ``state_dict``;
    see the module docstring for what the pass rewrites and what it leaves alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError("fuse: model must be a torch.nn.Module, got %s" % type(model).__name__)
    report = FuseReport()
    global_hooks = _global_hooks()
    if global_hooks:
        report.untraced.append(("", "global module hooks are registered (%s); fused calls would skip them"
                                % ", ".join(global_hooks)))
    else:
        _fuse_module(model, "", report)
    if verbose:
        print(report)
    return (model, report) if return_report else model


# ------------------------------------------------------------------------------------------------
# Tracing

_has_hooks = _modules.has_hooks


class _Tracer(fx.Tracer):
    """fx's default tracer, with every BatchNorm layer and every module that has hooks kept as a
    leaf (a hooked module must still be called as a module, or its hooks would not run). Records the
    modules whose forward it inlines (`inlined`, qualified names)."""

    def __init__(self):
        super().__init__()
        self.inlined = set()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _BatchNorm) or _has_hooks(m):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if not self.is_leaf_module(m, qualname):
            self.inlined.add(qualname)
        return super().call_module(m, forward, args, kwargs)


def _trace(module: nn.Module):
    """The module's class forward traced in training and in eval mode, and the qualified names of the
    submodules whose forward the graph inlines; raises if the two graphs differ (the forward branches
    on self.training in Python, which a single graph cannot keep)."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        graphs, tracers = [], []
        for mode in (True, False):
            module.train(mode)
            tracers.append(_Tracer())
            graphs.append(tracers[-1].trace(module))
    finally:
        for m, flag in flags:
            m.training = flag
    if str(graphs[0]) != str(graphs[1]):
        raise RuntimeError("its traced graph depends on train/eval mode")
    return graphs[0], tracers[0].inlined


# ------------------------------------------------------------------------------------------------
# Matching

def _is_relu(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":  # (a hooked ReLU must be called, or its hooks would not run)
        module = root.get_submodule(node.target)
        return type(module) is nn.ReLU and not _has_hooks(module)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs
    return False


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return "%s %s" % (node.op, node.target)


def _add_operands(node: fx.Node, bn_node: fx.Node):
    """(residual, None) if `node` adds `bn_node` and a tensor with alpha 1 in a way the fused op can
    take over; (None, reason) otherwise."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        inplace = node.target is operator.iadd
        kwargs = dict(node.kwargs)
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        inplace = node.target == "add_"
        kwargs = dict(node.kwargs)
    else:
        return None, None
    args = list(node.args)
    if "other" in kwargs:
        args.append(kwargs.pop("other"))
    if kwargs.get("alpha", 1) != 1 or set(kwargs) - {"alpha"} or len(args) != 2:
        return None, "add with alpha or extra arguments"
    a, b = args
    if a is bn_node and b is bn_node:
        return None, "adds its output to itself"
    if inplace and a is not bn_node:
        return None, "in-place add into the residual (the residual tensor would be modified)"
    other = b if a is bn_node else a
    if not isinstance(other, fx.Node):
        return None, "add of a constant, not a tensor"
    return other, None


def _act_kind(module: nn.Module):
    """For a fusable BatchNorm: "relu" when the layer applies a ReLU itself (timm's BatchNormAct2d),
    None when it is a plain BatchNorm (a BatchNormAct2d whose activation and dropout are Identity)."""
    if type(module) in _STOCK_BN or isinstance(getattr(module, "act", None), nn.Identity):
        return None
    return "relu"


def _fusable_bn(module: nn.Module):
    """None if the pass may replace calls of `module`, else the reason."""
    if isinstance(module, _FUSED_BN):
        return "already a torchfast fused layer"
    if _has_hooks(module):
        return "has hooks, which a fused call would skip"
    if type(module) in _STOCK_BN:
        return None
    if type(module).__name__ == "BatchNormAct2d" and isinstance(module, nn.BatchNorm2d):
        if isinstance(getattr(module, "act", None), nn.Identity) and isinstance(getattr(module, "drop", None),
                                                                                 (nn.Identity, type(None))):
            return None  # a plain BatchNorm
        try:
            _modules._activation_of(module)
        except ValueError as e:
            return str(e).replace("from_batchnorm: ", "")
        return None
    return "%s is a BatchNorm subclass the pass does not know (its forward may differ from stock)" % (
        type(module).__name__)


def _drop_identities(graph: fx.Graph, root: nn.Module, removed: set):
    """Calls of nn.Identity modules (timm's drop_block / drop_path when disabled) return their input:
    take them out of the graph so that they do not hide a BatchNorm -> ReLU (not hooked ones). Their
    names go into `removed`."""
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = root.get_submodule(node.target)
        if type(module) is nn.Identity and not _has_hooks(module) and len(node.args) == 1 and not node.kwargs \
                and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed.add(node.target)


def _rewrite(graph: fx.Graph, root: nn.Module, prefix: str, report: FuseReport, removed: set) -> int:
    """Replace the patterns in `graph` by fused calls; returns how many. The names of the modules
    whose calls it removes (BatchNorms, ReLU modules) go into `removed`."""
    done = 0
    fused_by = {}  # residual node -> name of the BatchNorm whose fused add took it
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = root.get_submodule(node.target)
        if not isinstance(module, _BatchNorm):
            continue
        name = prefix + node.target
        why = _fusable_bn(module)
        if why is not None:
            if not isinstance(module, _FUSED_BN):
                report.left.append((name, why))
            continue
        if len(node.args) != 1 or node.kwargs:
            report.left.append((name, "called with extra arguments"))
            continue
        users = list(node.users)
        if _act_kind(module) == "relu":  # BatchNormAct2d(act=ReLU): the ReLU is inside
            with graph.inserting_before(node):
                bn_ref = graph.get_attr(node.target)
                fused = graph.call_function(_modules.bn_relu_module, (bn_ref, node.args[0]))
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            removed.add(node.target)
            report.pairs.append(name)
            done += 1
            continue
        if len(users) != 1:
            report.left.append((name, "its output is used by %d nodes, not a ReLU alone" % len(users)))
            continue
        user = users[0]
        if _is_relu(user, root) and user.args[0] is node:
            with graph.inserting_before(user):
                bn_ref = graph.get_attr(node.target)
                fused = graph.call_function(_modules.bn_relu_module, (bn_ref, node.args[0]))
            user.replace_all_uses_with(fused)
            graph.erase_node(user)
            graph.erase_node(node)
            removed.update(n.target for n in (node, user) if n.op == "call_module")
            report.pairs.append(name)
            done += 1
            continue
        if user.op == "call_function" and user.target is _modules.bn_add_relu_module and user.args[2] is node:
            report.left.append((name, "feeds the residual side of the add fused with %s" % fused_by.get(user, "?")))
            continue
        residual, why = _add_operands(user, node)
        if residual is None:
            report.left.append((name, why or "followed by %s, not a ReLU or an add" % _describe(user, root)))
            continue
        add_users = list(user.users)
        if len(add_users) != 1 or not (_is_relu(add_users[0], root) and add_users[0].args[0] is user):
            report.left.append((name, "its add is followed by %s, not a ReLU alone" % (
                _describe(add_users[0], root) if len(add_users) == 1 else "%d nodes" % len(add_users))))
            continue
        relu = add_users[0]
        with graph.inserting_before(relu):
            bn_ref = graph.get_attr(node.target)
            fused = graph.call_function(_modules.bn_add_relu_module, (bn_ref, node.args[0], residual))
        relu.replace_all_uses_with(fused)
        graph.erase_node(relu)
        graph.erase_node(user)
        graph.erase_node(node)
        removed.update(n.target for n in (node, relu) if n.op == "call_module")
        fused_by[fused] = name
        report.triples.append(name)
        done += 1
    graph.lint()
    return done


# ------------------------------------------------------------------------------------------------
# The rewritten forward

class FusedForward:
    """A module's forward rewritten by :func:`fuse`: the code fx generated for the rewritten graph,
    run with the module itself as ``self`` (so every attribute it reads is the module's live one).
    Set as the module's ``forward`` instance attribute, with :meth:`prepare_scriptable` as its
    ``__prepare_scriptable__`` (``torch.jit.script``); survives ``copy.deepcopy`` and pickling.

    The generated code stands for the submodules it inlined (Sequentials, blocks) and the calls it
    removed (BatchNorms, ReLU and Identity modules) as they were at fuse time. Each call first checks
    that they still are: the same module objects in the same places (a copy: their copies), none given
    hooks since, and no global module hooks. Otherwise it runs the class's own forward (stock
    behaviour: the new module, the hook), and warns once; ``fuse(model)`` again fuses the new
    structure."""

    def __init__(self, owner: nn.Module, src: str, globals_: dict, watch):
        self.owner = owner
        self.src = src
        self.globals = globals_
        # (parent, attribute name, module, qualified name) of every module the code stands for
        self.watch = watch
        self.checks = None  # _changed's flat view of watch (with the hook dicts), built at the first call
        self.warned = False
        self.fn = _compile_forward(src, globals_, "<torchfast.nn.fuse %s %x>" % (type(owner).__name__, id(self)))

    def _changed(self):
        """The first watched module replaced, removed or given hooks since fuse (its qualified name),
        "global module hooks", or None. Every call of the model pays it (ResNet-50: 90 modules, ~15 us),
        so the hook registries are read as cached dicts (registering a hook adds to the module's dict);
        an entry that looks changed is read again live, in case a dict was replaced wholesale."""
        if any(_GLOBAL_HOOK_DICTS):
            return "global module hooks"
        if self.checks is None:
            self.checks = [entry + tuple(getattr(entry[2], d) for d in _HOOK_DICTS) for entry in self.watch]
        for parent, name, module, path, h0, h1, h2, h3 in self.checks:
            if parent._modules.get(name) is not module or h0 or h1 or h2 or h3:
                if parent._modules.get(name) is not module or _has_hooks(module):
                    return "'%s'" % path
                self.checks = None  # stale cached dicts: rebuilt at the next call
        return None

    def __call__(self, *args, **kwargs):
        changed = self._changed()
        if changed is None:
            return self.fn(self.owner, *args, **kwargs)
        if not self.warned:
            self.warned = True
            warnings.warn("torchfast.nn.fuse: %s changed since it was fused (%s replaced or given hooks); running "
                          "its unfused forward. Call torchfast.nn.fuse on it again to fuse it as it is now."
                          % (type(self.owner).__name__, changed), stacklevel=2)
        return type(self.owner).forward(self.owner, *args, **kwargs)

    def prepare_scriptable(self):
        """What ``torch.jit.script`` compiles for the owner: :func:`fuse` sets this as the owner's
        ``__prepare_scriptable__``, which TorchScript calls first (it cannot compile an instance
        ``forward``). Returns a shallow copy of the owner (its Parameters, buffers, submodules and
        attributes, in dicts of its own, so that scripting leaves the model as it was) whose class is
        the owner's with the fused graph as forward, the fused calls in TorchScript's form
        (``modules._script_bn_relu``: the fused ops on each BatchNorm's own state). Where that graph does
        not compile (a call TorchScript does not take; a warning says so), or the owner changed since
        ``fuse`` (its eager calls run the class's forward), the copy is of the owner's class, and
        TorchScript compiles the class's own forward, as it would unfused.

        TorchScript puts what this returns in the owner's place in a parent it scripts (a fused
        submodule of a model scripted as a whole), the eager parent included; there the copy goes on
        computing the same results, pickles and copies as the owner's class, unfused."""
        owner = self.owner
        if owner.__dict__.get("forward") is not self:  # forward replaced since: TorchScript sees what it is
            return owner
        if self._changed() is None:
            try:
                view = _script_view(owner, self._scriptable_forward())
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # compiled here to know that it compiles; the caller's torch.jit.script reuses the type
                    torch.jit.script(view)
                return view
            except Exception as e:  # noqa: BLE001 (whatever TorchScript refuses: the class's own forward)
                warnings.warn("torchfast.nn.fuse: the fused forward of %s does not script (%s: %s); scripting "
                              "its own forward instead (unfused)" % (type(owner).__name__, type(e).__name__,
                                                                     (str(e).strip().splitlines() or [""])[0][:200]),
                              stacklevel=2)
        return _script_view(owner, None)

    def _scriptable_forward(self):
        """The fused graph again (the owner's forward traced and rewritten, as at fuse time: _changed says
        nothing it stands for changed), with each fused call in TorchScript's form; compiled."""
        owner = self.owner
        graph, _ = _trace(owner)
        removed = set()
        _drop_identities(graph, owner, removed)
        _rewrite(graph, owner, "", FuseReport(), removed)
        _scriptable_calls(graph, owner)
        code = graph.python_code(root_module="self")
        return _compile_forward(code.src, code.globals, "<torchfast.nn.fuse scriptable %s %d>"
                                % (type(owner).__name__, next(_SCRIPTABLE_KEYS)))

    @property
    def __code__(self):
        """The generated function's code object (torch.export reads a forward's ``__code__``)."""
        return self.fn.__code__

    @property
    def __signature__(self):
        """The forward's own parameters, without self (``inspect.signature``, torch.export)."""
        sig = inspect.signature(self.fn)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __deepcopy__(self, memo):
        # The watched modules through the same memo: their copies are the ones in the copied tree (a
        # module replaced before the copy maps to a copy outside it, so the copy follows the change).
        watch = [tuple(copy.deepcopy(v, memo) for v in entry) for entry in self.watch]
        return FusedForward(copy.deepcopy(self.owner, memo), self.src, self.globals, watch)

    def __reduce__(self):
        # Modules among the generated code's globals are pickled by name; the watched modules in the
        # same pickle as the owner, so they unpickle as the same objects.
        globals_ = {k: _ModuleRef(v.__name__) if isinstance(v, types.ModuleType) else v
                    for k, v in self.globals.items()}
        return _rebuild_forward, (self.owner, self.src, globals_, self.watch)


_SCRIPTABLE_KEYS = itertools.count()


def _compile_forward(src: str, globals_: dict, key: str):
    """The function `src` defines (fx's generated ``forward``), its source registered under `key` in
    linecache: readable tracebacks, and TorchScript reads a function's source from there."""
    linecache.cache[key] = (len(src), None, src.splitlines(True), key)
    namespace = dict(globals_)
    exec(compile(src, key, "exec"), namespace)
    return namespace["forward"]


# What the TorchScript form of a fused call reads from the BatchNorm module (modules._script_bn_relu):
# TorchScript passes no module to a function, so the graph reads them as attributes.
_SCRIPT_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked", "training", "momentum",
                 "eps", "track_running_stats")


def _scriptable_calls(graph: fx.Graph, root: nn.Module):
    """Replace each fused call (bn_relu_module / bn_add_relu_module(bn, x[, residual])) by the
    BatchNorm's input check and modules._script_bn_relu / _script_bn_add_relu on its state."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (_modules.bn_relu_module, _modules.bn_add_relu_module):
            continue
        bn_ref, inputs = node.args[0], node.args[1:]  # (x,) or (x, residual)
        sync = isinstance(root.get_submodule(bn_ref.target), nn.SyncBatchNorm)
        fn = _modules._script_bn_relu if node.target is _modules.bn_relu_module else _modules._script_bn_add_relu
        with graph.inserting_before(node):
            graph.call_method("_check_input_dim", (bn_ref, inputs[0]))
            state = [graph.call_function(getattr, (bn_ref, name)) for name in _SCRIPT_STATE]
            fused = graph.call_function(fn, (*inputs, *state, sync, _modules._FUSED_CPU, _modules._FUSED_CUDA))
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
    graph.lint()


class _ScriptView:
    """Base of the class a fused module is scripted as (FusedForward.prepare_scriptable): its own class
    with the scriptable fused graph as forward. Pickled and copied as its own class."""

    def __reduce_ex__(self, protocol):
        # copyreg's reconstructor: pickle refuses a __newobj__ of another class than the object's
        return copyreg._reconstructor, (type(self).__bases__[1], object, None), self.__dict__


def _script_view(owner: nn.Module, forward):
    """A shallow copy of `owner` without its FusedForward: its dicts (Parameters, buffers, submodules,
    hooks) copied, their entries shared; of a subclass of its class with `forward` as forward, or of its
    class when `forward` is None."""
    cls = type(owner)
    if forward is not None:
        cls = type(cls.__name__, (_ScriptView, cls), {"forward": forward, "__module__": cls.__module__,
                                                       "__qualname__": cls.__qualname__})
    view = object.__new__(cls)
    object.__setattr__(view, "__dict__", {k: copy.copy(v) if isinstance(v, (dict, set)) else v
                                          for k, v in owner.__dict__.items()
                                          if k not in ("forward", "__prepare_scriptable__")})
    return view


class _ModuleRef:
    def __init__(self, name):
        self.name = name


def _rebuild_forward(owner, src, globals_, watch):
    import importlib
    globals_ = {k: importlib.import_module(v.name) if isinstance(v, _ModuleRef) else v for k, v in globals_.items()}
    return FusedForward(owner, src, globals_, watch)


_GLOBAL_HOOK_NAMES = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")
# torch.nn.modules.module's global hook registries (registering a global hook adds to these dicts)
_GLOBAL_HOOK_DICTS = tuple(getattr(_module_mod, n, {}) for n in _GLOBAL_HOOK_NAMES)


def _global_hooks():
    """The names of the global module hook registries (torch.nn.modules.module) that hold hooks."""
    return [n for n in _GLOBAL_HOOK_NAMES if getattr(_module_mod, n, None)]


def _install(module: nn.Module, graph: fx.Graph, watched):
    code = graph.python_code(root_module="self")
    watch = []
    for path in sorted(watched):
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        watch.append((parent, name, parent._modules[name], path))
    module.forward = FusedForward(module, code.src, dict(code.globals), watch)
    # torch.jit.script calls it first and compiles what it returns (TorchScript compiles no instance forward)
    module.__prepare_scriptable__ = module.forward.prepare_scriptable


def _fuse_module(module: nn.Module, prefix: str, report: FuseReport):
    if isinstance(module, _BatchNorm):
        return
    try:
        graph, inlined = _trace(module)
    except Exception as e:  # noqa: BLE001 (any tracing failure: fall back to the children)
        if next(module.children(), None) is None:
            return  # a leaf with no BatchNorm inside: nothing to fuse here
        report.untraced.append((prefix.rstrip("."), "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:200]
                                                              if str(e) else "")))
        for name, child in module.named_children():
            _fuse_module(child, prefix + name + ".", report)
        return
    removed = set()
    _drop_identities(graph, module, removed)
    if _rewrite(graph, module, prefix, report, removed):
        _install(module, graph, (inlined | removed) - {""})
        report.rewritten.append(prefix.rstrip("."))
    # Modules kept as leaves because they have hooks are fused inside, as roots of their own.
    for node in graph.nodes:
        if node.op == "call_module":
            sub = module.get_submodule(node.target)
            if _has_hooks(sub) and not isinstance(sub, _BatchNorm):
                _fuse_module(sub, prefix + node.target + ".", report)
