"""Global-batch contrast across data-parallel ranks (docs/loss.md, "Global batch").

Each rank gathers every rank's per-sample errors and embeddings, so the M x M contrast
matrix spans the global batch. Only the local rows keep their autograd history: every rank
computes the same global loss, so the sum over ranks of the local gradients is the global
gradient. Data-parallel training then *averages* over ranks, hence the loss returned for
backward carries a gradient scaled by the world size while its value stays the global loss.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def world_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _all_gather(x: torch.Tensor, group) -> list:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[dist.get_rank(group)] = x  # the local slice keeps its gradient
    return parts


def gather_pair_rows(x: torch.Tensor, group) -> torch.Tensor:
    """``(2M, ...)`` winners-then-losers on each rank -> ``(2 M W, ...)`` in the same layout:
    every rank's winners (rank order), then every rank's losers. M must match across ranks."""
    num_pairs = x.shape[0] // 2
    parts = _all_gather(x, group)
    return torch.cat([p[:num_pairs] for p in parts] + [p[num_pairs:] for p in parts])


def gather_rows(x: Optional[torch.Tensor], group) -> Optional[torch.Tensor]:
    """``(M, ...)`` per rank -> ``(M W, ...)`` in rank order (no gradient needed)."""
    if x is None:
        return None
    return torch.cat(_all_gather(x.detach(), group))


def scale_gradient_for_averaging(loss: torch.Tensor, world: int) -> torch.Tensor:
    """Same value, gradient times ``world``, undoing the data-parallel mean over ranks."""
    if world == 1:
        return loss
    return loss + (world - 1) * (loss - loss.detach())


def gather_errors(
    model_err: torch.Tensor,
    ref_err: Optional[torch.Tensor],
    emb_w: Optional[torch.Tensor],
    emb_l: Optional[torch.Tensor],
    group,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    ref = gather_pair_rows(ref_err.detach(), group) if ref_err is not None else None
    return gather_pair_rows(model_err, group), ref, gather_rows(emb_w, group), gather_rows(emb_l, group)
