// The extension module `lowbit._C`. It has no Python functions of its own: importing it runs
// the static initializers in csrc/cpu/*.cpp and csrc/cuda/*.cu, which register kernels for the
// ops whose schemas lowbit/_ops.py defines. The ops are then reached through torch.ops.lowbit.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
