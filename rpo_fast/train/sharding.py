"""``--fsdp``: the UNet sharded over the processes with PyTorch's FSDP2 (``fully_shard``).

Each resnet and transformer layer is one FSDP unit, each down, mid and up block one around
them (its samplers), and the UNet the root: a rank holds 1/W of
every parameter, gradient and optimizer moment, and all-gathers one unit's weights while
it runs (in ``--mixed-precision``'s dtype through FSDP's policy; gradients reduce in fp32).
A frozen-copy reference is sharded the same way. The loss, and RPO's contrast over the
global batch, are those of DDP: FSDP averages the gradients over the ranks as DDP does.

Checkpoints are per rank (``model-rank<r>.safetensors``, ``optimizer-rank<r>.pt``): each rank
writes and reads only its own shards, so no rank ever holds the whole optimizer state. Not
``torch.distributed.checkpoint``, whose metadata file is a pickle that loading unpickles,
where every file of these checkpoints loads with ``weights_only=True``; resuming needs the
same number of processes (checked with the other settings). The final export gathers the
full weights on rank 0 once.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch


def _blocks(unet: torch.nn.Module) -> List[torch.nn.Module]:
    mid = [unet.mid_block] if getattr(unet, "mid_block", None) is not None else []
    return [*unet.down_blocks, *mid, *unet.up_blocks]


def shard_unet(unet: torch.nn.Module, param_dtype: Optional[torch.dtype]) -> torch.nn.Module:
    """Shards ``unet`` in place (its class becomes FSDP's subclass of it) and returns it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    # A unit per resnet and transformer layer (they do not nest), then one per down, mid and up
    # block for what is left (samplers, projections), then the root: SDXL's first up block alone
    # is 1.2 B parameters, which as one unit would be all-gathered whole (docs/memory.md).
    for layer in [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]:
        fully_shard(layer, mp_policy=policy)
    for block in _blocks(unet):
        fully_shard(block, mp_policy=policy)
    fully_shard(unet, mp_policy=policy)
    return unet


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def local_model_state(unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's shard of every trained parameter."""
    return {n: _local(p.detach()).contiguous() for n, p in unet.named_parameters() if p.requires_grad}


def load_local_model_state(unet: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    trained = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if trained.keys() != state.keys():
        missing, extra = sorted(trained.keys() - state.keys()), sorted(state.keys() - trained.keys())
        raise ValueError(f"resume: the checkpoint's shards do not match the model (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in trained.items():
            _local(p).copy_(state[name])


def local_optimizer_state(optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with each sharded tensor replaced by this rank's shard."""
    state = optimizer.state_dict()
    return {**state, "state": {i: {k: _local(v) for k, v in s.items()} for i, s in state["state"].items()}}


def load_local_optimizer_state(optimizer, state: Dict[str, Any]) -> None:
    """The inverse: shards become sharded tensors again, laid out as their parameters, or, for
    an optimizer whose state is shaped otherwise (Adafactor's factored statistics: train/optim.py),
    as the optimizer's ``initial_state`` of the parameter lays that entry out."""
    from torch.distributed.tensor import DTensor

    groups = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    restored = {}
    for i, s in state["state"].items():
        p, group = groups[int(i)]
        template = optimizer.initial_state(p, group) if hasattr(optimizer, "initial_state") else {}
        entries = {}
        for k, v in s.items():
            like = template.get(k, p)
            if isinstance(like, DTensor) and torch.is_tensor(v) and v.dim() > 0:
                v = DTensor.from_local(v, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                       stride=like.stride())
            entries[k] = v
        restored[i] = entries
    optimizer.load_state_dict({**state, "state": restored})


def full_model_state(unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every rank calls it; rank 0 gets the full state dict on the CPU, the others an empty one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
