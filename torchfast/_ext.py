"""Loads the compiled extension if it is there; torchfast works without it (reference backend)."""
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which torchfast._C links against)

_C = None
load_error = None
try:
    from torchfast import _C  # noqa: F811  (importing it registers torch.ops.torchfast.*)
except Exception as e:  # ImportError, or an undefined symbol from a torch/extension mismatch
    load_error = "%s: %s" % (type(e).__name__, e)
    if not isinstance(e, ModuleNotFoundError):
        # A missing build is an expected state (reference backend serves); a broken one is worth
        # one warning, since the user presumably meant to build it.
        warnings.warn("torchfast: the compiled extension failed to load (%s); using the reference "
                      "backend. Rebuild with `pip install --no-build-isolation -e .`." % load_error,
                      RuntimeWarning, stacklevel=2)


def build_info() -> dict:
    if _C is None:
        return {"built": False, "cuda": False, "cuda_archs": "", "error": load_error}
    info = dict(_C.build_info())
    info["built"] = True
    return info
