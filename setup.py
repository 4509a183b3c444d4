"""Build torchfast._C: C++ CPU kernels always, CUDA kernels when a toolkit is usable.

Environment knobs:
  TORCHFAST_FORCE_CUDA=1   build the CUDA sources even when torch sees no GPU (CI does this)
  TORCHFAST_SKIP_CUDA=1    never build the CUDA sources
  TORCH_CUDA_ARCH_LIST     architectures to compile for (default below when no GPU is visible)
  MAX_JOBS                 parallel compile jobs (ninja)
  CUDA_HOME / CUDA_PATH    the CUDA toolkit, if it cannot be found from `nvcc` on the PATH
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Architectures built when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: Turing, Ampere,
# Hopper and Blackwell SASS, plus PTX of the newest so later chips JIT-compile it. CUDA 13 dropped
# everything below sm_75.
DEFAULT_ARCHS = "7.5;8.0;9.0;10.0+PTX"


def _toolkit_root(path):
    """The toolkit folder for an nvcc path, or None if it does not look like one."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(path)))
    return root if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) else None


def find_cuda_home():
    """Locate the CUDA toolkit without trusting the folder of a wrapper script called nvcc.

    torch guesses CUDA_HOME as the parent of the folder holding the first `nvcc` on the PATH. On
    machines where that `nvcc` is a small shell script exec'ing the real compiler (ours), the guess
    is wrong. We follow symlinks, then read a wrapper script for the absolute nvcc path it runs,
    then try the standard install folders.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root(nvcc)
        if root:
            return root
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for target in re.findall(rb"(/[^\s'\"]+/bin/nvcc)\b", head):
                    root = _toolkit_root(target.decode())
                    if root:
                        return root
        except OSError:
            pass
    for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(cand, "bin", "nvcc")) and _toolkit_root(
            os.path.join(cand, "bin", "nvcc")
        ):
            return cand
    return None


def pip_cuda_include_dirs():
    """Headers torch needs that a bare toolkit may lack (cusparse.h, cublas_v2.h ...) ship in the
    nvidia-* pip wheels: site-packages/nvidia/cu13/include, or nvidia/<lib>/include for CUDA 12."""
    dirs = []
    try:
        import nvidia  # namespace package from the nvidia-* wheels

        for base in list(getattr(nvidia, "__path__", [])):
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    seen, out = set(), []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def want_cuda(torch, cuda_home):
    """(build the CUDA sources?, why). TORCHFAST_FORCE_CUDA=1 turns "cannot" into an error instead
    of a CPU-only build, so a CI run that must prove the CUDA code compiles cannot quietly skip it."""
    forced = os.environ.get("TORCHFAST_FORCE_CUDA", "0") == "1"
    if os.environ.get("TORCHFAST_SKIP_CUDA", "0") == "1":
        if forced:
            raise SystemExit("torchfast: TORCHFAST_FORCE_CUDA=1 and TORCHFAST_SKIP_CUDA=1 contradict each other")
        return False, "TORCHFAST_SKIP_CUDA=1"
    reason = None
    if torch.version.cuda is None:
        reason = "torch %s was built without CUDA" % torch.__version__
    elif cuda_home is None:
        reason = "no CUDA toolkit found (no nvcc on the PATH, no CUDA_HOME, no /usr/local/cuda*)"
    if reason:
        if forced:
            raise SystemExit("torchfast: TORCHFAST_FORCE_CUDA=1 but the CUDA kernels cannot be built: " + reason)
        return False, reason
    return True, "torch has CUDA %s and nvcc was found in %s%s" % (
        torch.version.cuda, cuda_home, " (TORCHFAST_FORCE_CUDA=1)" if forced else "")


def main():
    cuda_home = find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    build_cuda, why = want_cuda(torch, cuda_home)
    print("torchfast: CUDA kernels %s (%s)" % ("ON" if build_cuda else "OFF", why), file=sys.stderr)

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: the init kernels promise bitwise-equal uniform values on every backend, so
    # the compiler must not fuse a*b+c into an FMA on targets that have one (aarch64, -march=native).
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    define_macros = []
    include_dirs = [os.path.join(HERE, "csrc")]
    ext_kwargs = {}
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join("%d.%d" % c for c in caps)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("TORCHFAST_WITH_CUDA", None))
        define_macros.append(("TORCHFAST_CUDA_ARCHS", '"%s"' % os.environ["TORCH_CUDA_ARCH_LIST"]))
        include_dirs += pip_cuda_include_dirs()
        ext_kwargs["extra_compile_args"] = {
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo"],
        }
        ext_cls = CUDAExtension
    else:
        ext_kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext_cls = CppExtension
    ext = ext_cls(
        "torchfast._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
        **ext_kwargs,
    )
    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
