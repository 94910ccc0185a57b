"""``--fsdp``: the denoiser (UNet or transformer) sharded over the processes with PyTorch's FSDP2 (``fully_shard``).

Each resnet and transformer layer is one FSDP unit, each down, mid and up block one around
them (its samplers), and the UNet the root: a rank holds 1/W of
every parameter, gradient and optimizer moment, and all-gathers one unit's weights while
it runs (in ``--mixed-precision``'s dtype through FSDP's policy; gradients reduce in fp32).
A frozen-copy reference is sharded the same way. The loss, and RPO's contrast over the
global batch, are those of DDP: FSDP averages the gradients over the ranks as DDP does.

Checkpoints are ``torch.distributed.checkpoint`` (DCP) saves in its safetensors storage
(``HuggingFaceStorageWriter``, one file per rank): each rank writes and reads only its shards,
so no rank ever holds the whole optimizer state, and the layout is read back from the
safetensors headers (JSON), not from the pickled ``.metadata`` of DCP's default storage, so
resuming never unpickles (train/checkpoint.py). The final export gathers the full weights on
rank 0 once.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch


def shard_unet(unet: torch.nn.Module, param_dtype: Optional[torch.dtype], family) -> torch.nn.Module:
    """Shards ``unet`` (the denoiser) in place over the family's units (``Family.shard_units``:
    a UNet's resnet and transformer layers, then its blocks; a transformer's blocks), then the
    root; its class becomes FSDP's subclass of it. Returns it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in family.shard_units(unet):
        fully_shard(unit, mp_policy=policy)
    fully_shard(unet, mp_policy=policy)
    return unet


def state_dicts(unet: torch.nn.Module, optimizer) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The trained parameters and the optimizer state, keyed by parameter name (DCP's flattened
    optimizer form: ``state.<name>.<entry>``, ``param_groups.<name>.<option>``), sharded
    tensors as DTensors: what a sharded checkpoint saves, and, from a fresh run (whose
    optimizer state DCP creates with a zero-learning-rate step), the layout it loads into."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(unet, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.items() if k in trained}, optim


def load_state_dicts(unet: torch.nn.Module, optimizer, model: Dict[str, Any], optim: Dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(unet, optimizer, model_state_dict=model, optim_state_dict=optim,
                   options=StateDictOptions(flatten_optimizer_state_dict=True, strict=False))  # LoRA: base not saved


def full_model_state(unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every rank calls it; rank 0 gets the full state dict on the CPU, the others an empty one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
