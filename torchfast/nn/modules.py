"""Drop-in fused BatchNorm+ReLU layers.

``BatchNormReLU2d(C)`` is an ``nn.BatchNorm2d(C)`` (a subclass: same constructor, parameters,
buffers, ``state_dict`` and train/eval behaviour) whose forward returns ``relu(bn(x))`` computed by
one fused op. A stock BatchNorm checkpoint loads into it and back.
"""
from torch import nn

from torchfast.nn.functional import batch_norm_relu

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "convert_batchnorm_relu"]


class _BatchNormReLUMixin:
    def forward(self, input):
        self._check_input_dim(input)
        # Mirrors torch.nn.modules.batchnorm._BatchNorm.forward so momentum=None (cumulative
        # average), track_running_stats=False and num_batches_tracked behave identically.
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return batch_norm_relu(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )

    @classmethod
    def from_batchnorm(cls, bn):
        """A fused layer with `bn`'s configuration, parameters and running statistics."""
        floats = [t for t in list(bn.parameters()) + list(bn.buffers()) if t.is_floating_point()]
        fused = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats,
                    device=floats[0].device if floats else None, dtype=floats[0].dtype if floats else None)
        fused.load_state_dict(bn.state_dict())
        fused.train(bn.training)
        return fused


class BatchNormReLU1d(_BatchNormReLUMixin, nn.BatchNorm1d):
    """``relu(nn.BatchNorm1d(...)(x))`` fused; input (N, C) or (N, C, L)."""


class BatchNormReLU2d(_BatchNormReLUMixin, nn.BatchNorm2d):
    """``relu(nn.BatchNorm2d(...)(x))`` fused; input (N, C, H, W), contiguous or channels_last."""


class BatchNormReLU3d(_BatchNormReLUMixin, nn.BatchNorm3d):
    """``relu(nn.BatchNorm3d(...)(x))`` fused; input (N, C, D, H, W), contiguous or channels_last_3d."""


_FUSED = {nn.BatchNorm1d: BatchNormReLU1d, nn.BatchNorm2d: BatchNormReLU2d, nn.BatchNorm3d: BatchNormReLU3d}


def convert_batchnorm_relu(module: nn.Module) -> nn.Module:
    """Replace, in place, every BatchNorm{1,2,3}d immediately followed by a ReLU inside an
    ``nn.Sequential`` with the fused layer (and the ReLU with ``nn.Identity``). Returns `module`.

    Only Sequential pairs are rewritten: a BatchNorm whose ReLU is applied in a ``forward`` method
    cannot be detected without tracing, and is left alone.
    """
    for child in module.children():
        convert_batchnorm_relu(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules.keys())
        for a, b in zip(names, names[1:]):
            bn, act = module._modules[a], module._modules[b]
            if type(bn) in _FUSED and isinstance(act, nn.ReLU):
                module._modules[a] = _FUSED[type(bn)].from_batchnorm(bn)
                module._modules[b] = nn.Identity()
    return module
