// Only built by setup.py: lets `import sparks_ext._C` load the library (and with it the op
// registrations) without binding any Python function; ops are reached via torch.ops.sparks.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
