"""Fused layers: drop-in subclasses of torch.nn.BatchNorm*d that apply ReLU (or add a residual and
apply ReLU) in the same op, and ``fuse``, which puts the fused ops into an unmodified model."""
from torchfast.nn import functional  # noqa: F401
from torchfast.nn.fusion import FuseReport, FusedForward, fuse  # noqa: F401
from torchfast.nn.modules import (BatchNormAddReLU1d, BatchNormAddReLU2d, BatchNormAddReLU3d,  # noqa: F401
                                  BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d, SyncBatchNormAddReLU,
                                  SyncBatchNormReLU, convert_batchnorm_relu, convert_sync_batchnorm)

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "BatchNormAddReLU1d", "BatchNormAddReLU2d",
           "BatchNormAddReLU3d", "SyncBatchNormReLU", "SyncBatchNormAddReLU", "convert_batchnorm_relu",
           "convert_sync_batchnorm", "fuse", "FuseReport", "FusedForward", "functional"]
