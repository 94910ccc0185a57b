"""The global-batch contrast across two gloo processes equals one process on the global batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rpo_fast

WORLD = 2
PAIRS_PER_RANK = 3


def global_batch(dtype=torch.float64):
    """float64 runs the torch backend; float32 the cpu backend, whose ranks chain the stage
    ops around the gather while one process on the global batch runs fused_loss."""
    gen = torch.Generator().manual_seed(1)
    m = WORLD * PAIRS_PER_RANK
    target = torch.randn(2 * m, 2, 3, 3, generator=gen, dtype=torch.float64)
    ref = target + torch.randn(2 * m, 2, 3, 3, generator=gen, dtype=torch.float64)
    pred = ref + 0.1 * torch.randn(2 * m, 2, 3, 3, generator=gen, dtype=torch.float64)
    emb = torch.randn(2 * m, 5, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (pred, target, ref, emb[:m], emb[m:]))


def local_rows(rank):
    """Rows of the global (winners, then losers) batch that rank holds, in its local layout."""
    m, total = PAIRS_PER_RANK, WORLD * PAIRS_PER_RANK
    winners = list(range(rank * m, (rank + 1) * m))
    return winners + [total + i for i in winners]


def _worker(rank, init_file, out_dir, kwargs):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        pred, target, ref, emb_w, emb_l = global_batch(kwargs["dtype"])
        rows = local_rows(rank)
        m = PAIRS_PER_RANK
        local_pred = pred[rows].clone().requires_grad_(True)
        extra = {}
        if kwargs.get("embeddings"):
            extra = dict(emb_w=emb_w[rank * m:(rank + 1) * m], emb_l=emb_l[rank * m:(rank + 1) * m])
        loss, metrics = rpo_fast.diffusion_rpo_loss(
            local_pred, target[rows], ref[rows], beta=20.0, process_group=dist.group.WORLD, return_metrics=True, **extra
        )
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local_pred.grad, "metrics": metrics}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("embeddings", [False, True])
def test_two_processes_match_one_global_batch(tmp_path, embeddings, dtype):
    kwargs = {"embeddings": embeddings, "dtype": dtype}
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), kwargs), nprocs=WORLD, join=True)
    pred, target, ref, emb_w, emb_l = global_batch(dtype)
    pred.requires_grad_(True)
    extra = dict(emb_w=emb_w, emb_l=emb_l) if embeddings else {}
    loss, metrics = rpo_fast.diffusion_rpo_loss(pred, target, ref, beta=20.0, return_metrics=True, **extra)
    loss.backward()
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(out["loss"], loss.detach())
        for name, value in metrics.items():
            torch.testing.assert_close(out["metrics"][name], value)
        # Each rank's gradient is scaled by the world size, so that data-parallel averaging
        # of parameter gradients gives the gradient of the global loss.
        torch.testing.assert_close(out["grad"], WORLD * pred.grad[local_rows(rank)])
