// The extension module `lowbit._C`. Importing it runs the static initializers in csrc/cpu/*.cpp
// and csrc/cuda/*.cu, which register kernels for the ops whose schemas lowbit/_ops.py defines;
// the ops are then reached through torch.ops.lowbit. Its only Python functions reach the
// process-wide ValidationCache (csrc/include/lowbit/validated_once.h), which is host state and
// not an op: clear / enable / stats, and check_once for the Python backends' own data checks
// (wrapped by lowbit/validation_cache.py).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstring>

#include "lowbit/sparse24_layout.h"
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

// The tags Python code may use, by content -> the one address the C++ kernels use for them, so
// a tensor validated by a Python backend (Triton) counts for the C++ ones and back.
const char* known_tag(const char* tag) {
  for (const char* t : {lowbit::sparse24_layout::kMetaNibblesValid})
    if (std::strcmp(tag, t) == 0) return t;
  return nullptr;
}

// _validation_cache_check_once(tensor, tag, validate): calls validate() unless `tensor` in its
// current state is cached as valid for `tag`; records it when validate() returns. True on a hit.
// (The GIL is held throughout; the cache's mutex is never held while Python code runs.)
PyObject* validation_cache_check_once(PyObject*, PyObject* args) {
  PyObject* tensor_obj = nullptr;
  const char* tag = nullptr;
  PyObject* validate = nullptr;
  if (!PyArg_ParseTuple(args, "OsO", &tensor_obj, &tag, &validate)) return nullptr;
  if (!THPVariable_Check(tensor_obj)) {
    PyErr_SetString(PyExc_TypeError, "_validation_cache_check_once: expected a Tensor");
    return nullptr;
  }
  const char* what = known_tag(tag);
  if (!what) {
    PyErr_Format(PyExc_ValueError, "_validation_cache_check_once: unknown tag '%s'", tag);
    return nullptr;
  }
  try {
    const at::Tensor& t = THPVariable_Unpack(tensor_obj);
    lowbit::ValidationCache& cache = lowbit::validation_cache();
    const auto key = cache.key(t, what);
    if (key && cache.contains(*key)) Py_RETURN_TRUE;
    PyObject* r = PyObject_CallObject(validate, nullptr);
    if (!r) return nullptr;
    Py_DECREF(r);
    if (key) cache.record(t, *key);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"_validation_cache_check_once", validation_cache_check_once, METH_VARARGS, nullptr},
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
