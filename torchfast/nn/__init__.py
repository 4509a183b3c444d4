"""Fused layers: drop-in subclasses of torch.nn.BatchNorm*d that apply ReLU in the same op."""
from torchfast.nn import functional  # noqa: F401
from torchfast.nn.modules import (BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d,  # noqa: F401
                                  convert_batchnorm_relu)

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "convert_batchnorm_relu", "functional"]
