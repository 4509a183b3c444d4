"""torchfast: fused BatchNorm+ReLU, fused gradient-norm clipping and batched weight init for PyTorch.

    import torchfast
    layer = torchfast.nn.BatchNormReLU2d(64)          # drop-in for nn.BatchNorm2d + nn.ReLU
    torchfast.clip_grad_norm_(model.parameters(), 1.0)  # drop-in for torch.nn.utils.clip_grad_norm_
    torchfast.init.kaiming_uniform_(list_of_weights)  # one batched call, reproducible everywhere

Every op has a pure-PyTorch reference backend, so ``import torchfast`` works without the compiled
extension; ``python -m torchfast.info`` shows what was built and which backend each op uses.
"""
__version__ = "0.1.0"

from torchfast import _ext  # noqa: F401  (loads torchfast._C when it was built)
from torchfast._backends import (BackendUnavailable, available_backends, get_backend,  # noqa: F401
                                 set_backend, use_backend)
from torchfast import _ops  # noqa: F401  (fake kernels, autograd)
from torchfast import init, nn, tuning  # noqa: F401
from torchfast.clip_grad import (clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_,  # noqa: F401
                                 get_total_norm)

__all__ = ["nn", "init", "tuning", "clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_", "get_total_norm",
           "set_backend", "get_backend", "use_backend", "available_backends", "BackendUnavailable"]
