"""The optimizer named by ``--optimizer``: torch's AdamW (its fused kernel, on CPU as on CUDA:
one op for all parameters, where the default path loops over them in Python: 11.1 -> 1.8 ms a
step for the 208 tensors of the tiny test UNet on 2 cores), bitsandbytes'
AdamW8bit (``--use_8bit_adam`` of the diffusers examples) with the same hyper-parameters, or
transformers' Adafactor as the official Diffusion-DPO trainer builds it for SDXL (a fixed
learning rate, no parameter scaling, update clipping at 1; factored second moments, no first
moment: a fraction of AdamW's state).

Under ``--fsdp`` the parameters are DTensors sharded on dim 0. AdamW's state is shaped like
them and works as is; transformers' Adafactor builds its factored statistics as plain tensors
of the global shape and then fails mixing them with the sharded gradient, so :class:`Adafactor`
creates them as DTensors laid out as DTensor's own reductions of the gradient are (the row
statistic sharded like the parameter, the column one of a 2-D weight replicated). Its every op
then runs on the global tensor's meaning: the same factored statistics, RMS and update
clipping as one process holding the whole parameter, so ``--fsdp`` changes nothing but the
order of fp32 sums.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from .config import TrainConfig


def _adafactor_class():
    from transformers.optimization import Adafactor as _Adafactor

    class Adafactor(_Adafactor):
        """transformers' Adafactor whose state of a DTensor parameter is made of DTensors."""

        def initial_state(self, p: torch.Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
            """For a DTensor ``p``: the state transformers' Adafactor creates at a parameter's
            first step, with each tensor sharded as DTensor propagates the parameter's placements
            through the reductions the step applies (``mean(-1)`` for the row, ``mean(-2)`` for the column
            statistic)."""
            factored, use_first_moment = self._get_options(group, p.shape)
            state: Dict[str, Any] = {"step": 0, "RMS": 0}
            if use_first_moment:
                state["exp_avg"] = torch.zeros_like(p)
            if not factored:
                state["exp_avg_sq"] = torch.zeros_like(p)
                return state
            for name, dim in (("exp_avg_sq_row", -1), ("exp_avg_sq_col", -2)):
                stat = torch.zeros_like(p).mean(dim=dim)  # a local shard's worth of zeros, then the reduction
                if any(placement.is_partial() for placement in stat.placements):  # reduced over the sharded dim
                    from torch.distributed.tensor import Replicate

                    stat = stat.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in stat.placements])
                state[name] = stat
            return state

        @torch.no_grad()
        def step(self, closure=None):
            from torch.distributed.tensor import DTensor

            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and isinstance(p, DTensor) and len(self.state[p]) == 0:
                        self.state[p].update(self.initial_state(p, group))
            return super().step(closure)

    return Adafactor


def make_optimizer(config: TrainConfig, params: List[torch.nn.Parameter], device: torch.device):
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer: adamw8bit (--use_8bit_adam) needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    if config.optimizer == "adafactor":
        return _adafactor_class()(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay,
                                  clip_threshold=1.0, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, fused=device.type in ("cpu", "cuda"), **kwargs)
