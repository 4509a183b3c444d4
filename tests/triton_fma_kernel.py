"""A one-op Triton kernel around torchfast.triton.init._fma, for test_init (Triton resolves a kernel's
names from its module's globals, so it cannot live inside the test function)."""
import triton
import triton.language as tl

from torchfast.triton.init import _fma


@triton.jit
def fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _fma(a, b, c), mask=mask)
