// The op schemas of rpo_fast._C and the Python module that loads them.
//
// rpo_fast/fake_kernels.py holds the contract of the ops (and registers their fake kernels);
// cpu/ops_cpu.cpp and cuda/ops_cuda.cu implement the stages per dispatch key, fused.cpp
// chains them into fused_loss, autograd.cpp gives the differentiable ones their backward.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"

namespace rpo_fast {
namespace {

// Which instruction set the CPU kernels use here (tests and benchmarks report it).
std::string cpu_isa() { return cpu::selected_kernels().name; }

}  // namespace
}  // namespace rpo_fast

TORCH_LIBRARY(rpo_fast, m) {
  m.def("sample_errors(Tensor model_pred, Tensor target, Tensor? ref_pred) -> (Tensor, Tensor)");
  m.def(
      "pair_loss(Tensor model_err, Tensor ref_err, Tensor? weights, int method, int loss_type, float beta, "
      "float weight_scale) -> (Tensor, Tensor, Tensor)");
  m.def("error_grad(Tensor coef, Tensor model_pred, Tensor target) -> Tensor");
  m.def("similarity_weights(Tensor emb_w, Tensor emb_l, float tau) -> Tensor");
  m.def(
      "fused_loss(Tensor model_pred, Tensor target, Tensor? ref_pred, Tensor? ref_err, Tensor? emb_w, "
      "Tensor? emb_l, Tensor? weights, int method, int loss_type, float beta, float tau, float weight_scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("cpu_isa() -> str", &rpo_fast::cpu_isa);
}

// An importable, empty Python module: importing it runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
