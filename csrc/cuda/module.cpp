// Python module init for dsattn._C_cuda. Op schemas are declared once in csrc/registration.cpp (dsattn._C,
// loaded first); the .cu files here only add TORCH_LIBRARY_IMPL(dsattn_C, CUDA, m) kernels.
#include <Python.h>

static PyModuleDef dsattn_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", "dsattn compiled CUDA ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&dsattn_cuda_module); }
