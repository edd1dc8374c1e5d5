// The extension module `lowbit._C`. Importing it runs the static initializers in csrc/cpu/*.cpp
// and csrc/cuda/*.cu, which register kernels for the ops whose schemas lowbit/_ops.py defines;
// the ops are then reached through torch.ops.lowbit. Its only Python functions control the
// process-wide ValidationCache (csrc/include/lowbit/validated_once.h), which is host state and
// not an op (wrapped by lowbit/validation_cache.py).
#include <Python.h>

#include "lowbit/validated_once.h"

namespace {

PyObject* validation_cache_clear(PyObject*, PyObject*) {
  lowbit::validation_cache().clear();
  Py_RETURN_NONE;
}

PyObject* validation_cache_set_enabled(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  lowbit::validation_cache().set_enabled(on != 0);
  Py_RETURN_NONE;
}

// (hits, misses, entries, enabled)
PyObject* validation_cache_stats(PyObject*, PyObject*) {
  const auto s = lowbit::validation_cache().stats();
  return Py_BuildValue("(LLLO)", static_cast<long long>(s.hits), static_cast<long long>(s.misses),
                       static_cast<long long>(s.entries), s.enabled ? Py_True : Py_False);
}

PyObject* validation_cache_reset_stats(PyObject*, PyObject*) {
  lowbit::validation_cache().reset_stats();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"_validation_cache_clear", validation_cache_clear, METH_NOARGS, nullptr},
    {"_validation_cache_set_enabled", validation_cache_set_enabled, METH_O, nullptr},
    {"_validation_cache_stats", validation_cache_stats, METH_NOARGS, nullptr},
    {"_validation_cache_reset_stats", validation_cache_reset_stats, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
