// Every compiled torchfast op is declared here, once (the schemas are in schemas.h). The kernel
// files only register implementations (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA); fake kernels and autograd
// formulas are registered in Python (torchfast/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include "disjoint.h"
#include "schemas.h"

#include <string>

TORCH_LIBRARY(torchfast, m) { torchfast::define_ops(m); }

// Reads only the tensors' addresses and shapes: one implementation for every device.
TORCH_LIBRARY_IMPL(torchfast, CompositeExplicitAutograd, m) {
  m.impl("overlap_levels", [](at::TensorList tensors) { return torchfast::overlap_levels(tensors); });
}

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  std::string archs;
#ifdef TORCHFAST_WITH_CUDA
  archs = TORCHFAST_CUDA_ARCHS;
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
  return Py_BuildValue("{s:O,s:s,s:s}", "cuda", cuda ? Py_True : Py_False, "cuda_archs", archs.c_str(),
                       "compiler", __VERSION__);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this build of torchfast._C contains."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "torchfast compiled kernels (ops live in torch.ops.torchfast)",
                          -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
