"""Names and codes shared by the API, the reference and every kernel backend: defined here
once for Python (kernels/ imports them), and once for C++ in csrc/rpo_math.h (methods, loss
types, metrics) and csrc/op_inputs.h (kernel dtypes), with the same numbers.

The integer codes are the ones the custom ops take (``method``, ``loss_type``) and the order
of the metrics vector they return.
"""

import torch

# method code: sft = 0, dpo = 1, rpo = 2
METHODS = ("sft", "dpo", "rpo")
# loss_type code: sigmoid = 0, hinge = 1, ipo = 2
LOSS_TYPES = ("sigmoid", "hinge", "ipo")
# Order of the metrics vector returned by every backend's pair stage.
METRIC_NAMES = ("implicit_acc", "reward_margin", "model_mse", "ref_mse", "weight_diag")
BACKENDS = ("torch", "cpu", "cuda", "triton")
# How RPO's computed weights (the uniform 1/M, or the row softmax of the similarities) are
# scaled: "mean" (the default) by M, so that they average 1 and a pair's own logit has DPO's
# strength at the same beta; "row" leaves each row summing to 1, the LLM RPO trainer's loss.
# Explicit weights are used as given.
WEIGHT_NORMS = ("mean", "row")
# The fused kernels take these input dtypes, each input its own; float64 (gradcheck) stays on
# the reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Short dtype names of the command lines and configs.
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SFT, DPO, RPO = (METHODS.index(m) for m in ("sft", "dpo", "rpo"))  # method codes
SIGMOID, HINGE, IPO = (LOSS_TYPES.index(t) for t in ("sigmoid", "hinge", "ipo"))  # loss_type codes


def method_code(method: str) -> int:
    return METHODS.index(method)


def loss_type_code(loss_type: str) -> int:
    return LOSS_TYPES.index(loss_type)
