"""Data parallel: two CPU processes (torchrun, gloo) holding M pairs each give the parameter
gradients of one process holding the 2M-pair global batch, for rpo (whose contrast matrix
spans the global batch) and dpo, for SD1.5, SD3 and FLUX.1."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from train_utils import one_thread, synthetic_pickapic, tiny_config

WORKER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from rpo_fast.train import TrainConfig
    from rpo_fast.train import loop

    jobs = json.loads(open(sys.argv[1]).read())
    for job in jobs:
        run = loop.prepare(TrainConfig(**job["config"]))
        batch = next(loop.step_batches(run, 0, 1))
        loss, metrics = loop.compute_loss(run, batch)
        loss.backward()  # DDP averages the gradients over the processes
        if run.rank == 0:
            grads = {n: p.grad.clone() for n, p in run.unet.named_parameters() if p.grad is not None}
            torch.save({"loss": loss.detach(), "grads": grads, "rows": batch.rows}, job["out"])
        # as rpo_fast.train.train does: no rank tears its DDP state down while another still
        # works (a rank that ran ahead once died in std::terminate at exit)
        run.barrier()
        del run
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rpo_fast.data import load_preference_dataset
    from rpo_fast.embedding import build_embedding_cache

    root = tmp_path_factory.mktemp("ddp")
    data = synthetic_pickapic(root / "data")

    def mean_color(prompts, images):
        return torch.tensor([[*np.asarray(im, np.float32).mean((0, 1)), len(p)] for p, im in zip(prompts, images)])

    mean_color.identity = "mean-color-test"
    emb = build_embedding_cache(load_preference_dataset(data), mean_color, root / "emb.safetensors", progress=False)
    (root / "worker.py").write_text(WORKER)
    return root, data, emb


def _jobs(root, model, data, emb, batch_pairs, tag):
    jobs = []
    for method in ("rpo", "dpo"):
        config = tiny_config(model, data, root / f"out-{tag}-{method}", root / f"latents-{tag}", method=method,
                             batch_pairs=batch_pairs, embeddings=str(emb) if method == "rpo" else None)
        jobs.append({"config": {k: v for k, v in vars(config).items()}, "out": str(root / f"{tag}-{method}.pt")})
    path = root / f"jobs-{tag}.json"
    path.write_text(json.dumps(jobs))
    return path


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_two_processes_give_the_gradients_of_one_global_batch(setup, family, request):
    root, data, emb = setup
    work = root / family
    work.mkdir()
    model = request.getfixturevalue(f"tiny_{family}_dir")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    single = _jobs(work, model, data, emb, batch_pairs=4, tag="one")
    two = _jobs(work, model, data, emb, batch_pairs=2, tag="two")
    done = subprocess.run([sys.executable, str(root / "worker.py"), str(single)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(root / "worker.py"), str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with one_thread():
        for method in ("rpo", "dpo"):
            a = torch.load(work / f"one-{method}.pt")
            b = torch.load(work / f"two-{method}.pt")
            assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
            if method == "rpo":  # the global loss, on every rank
                torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)
            # fp32 sums in another order (a batch of 4 vs 2 + 2) differ by ~1e-6 relative; a wrong
            # reduction (a missing world-size factor, a rank's rows lost) by ~1.
            for name, want in a["grads"].items():
                error = (b["grads"][name] - want).norm() / want.norm().clamp_min(1e-12)
                assert error < 1e-3, f"{method} {name}: relative error {error:.2e}"
            want = torch.cat([g.flatten() for g in a["grads"].values()])
            got = torch.cat([b["grads"][n].flatten() for n in a["grads"]])
            assert want.norm() > 0 and (got - want).norm() / want.norm() < 1e-5
