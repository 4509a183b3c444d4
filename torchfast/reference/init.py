"""Batched init in pure PyTorch: see torchfast.reference.philox for the stream's definition."""
from torchfast.reference.philox import philox_fill_  # noqa: F401
