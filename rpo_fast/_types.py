"""Names shared by the API, the reference and every kernel backend.

The integer codes are the ones the custom ops take (``method``, ``loss_type``) and the order
of the metrics vector they return; csrc/rpo_math.h and kernels/ use the same numbers.
"""

# method code: sft = 0, dpo = 1, rpo = 2
METHODS = ("sft", "dpo", "rpo")
# loss_type code: sigmoid = 0, hinge = 1, ipo = 2
LOSS_TYPES = ("sigmoid", "hinge", "ipo")
# Order of the metrics vector returned by every backend's pair stage.
METRIC_NAMES = ("implicit_acc", "reward_margin", "model_mse", "ref_mse", "weight_diag")
BACKENDS = ("torch", "cpu", "cuda", "triton")


def method_code(method: str) -> int:
    return METHODS.index(method)


def loss_type_code(loss_type: str) -> int:
    return LOSS_TYPES.index(loss_type)
