"""FSDP2 (--fsdp) on two CPU processes (torchrun, gloo): the sharded step gives the parameter
gradients of one process holding the global batch, and a rank killed with SIGKILL, resumed
with --resume latest from the sharded checkpoint (torch.distributed.checkpoint), ends with the uninterrupted run's weights;
Adafactor's factored statistics of sharded parameters train as one process does, and resume."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rpo_fast.train.checkpoint import list_checkpoints
from rpo_fast.train import train
from train_utils import one_thread, synthetic_pickapic, tiny_config, unet_weights

WORKER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from rpo_fast.train import TrainConfig
    from rpo_fast.train import loop

    for job in json.loads(open(sys.argv[1]).read()):
        run = loop.prepare(TrainConfig(**job["config"]))
        batch = next(loop.step_batches(run, 0, 1))
        loss, metrics = loop.compute_loss(run, batch)
        loss.backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in run.unet.named_parameters() if p.grad is not None}  # full_tensor: a collective
        if run.rank == 0:
            torch.save({"loss": loss.detach(), "grads": grads}, job["out"])
        run.barrier()
        del run
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
""")
ENV = {**{k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_pickapic(tmp_path_factory.mktemp("fsdp") / "data")


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_sharded_step_gives_the_gradients_of_one_global_batch(family, request, data, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}_dir")  # SD3 and Flux: sharded per transformer block
    (tmp_path / "worker.py").write_text(WORKER)
    for tag, pairs, fsdp in (("one", 4, False), ("two", 2, True)):
        jobs = [{"config": vars(tiny_config(model, data, tmp_path / f"out-{tag}-{m}", tmp_path / "latents",
                                            method=m, batch_pairs=pairs, fsdp=fsdp)),
                 "out": str(tmp_path / f"{tag}-{m}.pt")} for m in ("rpo", "dpo")]
        (tmp_path / f"{tag}.json").write_text(json.dumps(jobs))
        launcher = TORCHRUN if fsdp else [sys.executable]
        done = subprocess.run([*launcher, str(tmp_path / "worker.py"), str(tmp_path / f"{tag}.json")], env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    with one_thread():
        for method in ("rpo", "dpo"):
            a, b = torch.load(tmp_path / f"one-{method}.pt"), torch.load(tmp_path / f"two-{method}.pt")
            assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
            if method == "rpo":  # the global loss, on every rank
                torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)
            want = torch.cat([g.flatten() for g in a["grads"].values()])
            got = torch.cat([b["grads"][n].flatten() for n in a["grads"]])
            # fp32 sums in another order differ by ~1e-6 relative; a missing 1/W or a lost rank by ~1
            assert want.norm() > 0 and (got - want).norm() / want.norm() < 1e-5, method


def _cli(config, *extra):
    args = []
    for name in ("pretrained_model", "data", "output_dir", "latent_cache", "resolution", "batch_pairs", "max_steps",
                 "learning_rate", "checkpoint_every", "log_every", "method", "gradient_accumulation_steps"):
        args += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    return [*TORCHRUN, "-m", "rpo_fast.cli", "train", *args, "--fsdp", "--no-compile", "--no-progress", *extra]


def _workers(agent: int):
    """The torchrun agent's children: its worker processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == agent:
            found.append(int(stat.parent.name))
    return found


def test_sigkill_of_a_rank_then_resume_gives_the_uninterrupted_weights(tiny_sd15_dir, data, tmp_path):
    settings = dict(method="rpo", batch_pairs=2, gradient_accumulation_steps=2, max_steps=4, checkpoint_every=2,
                    learning_rate=1e-3)
    straight = tiny_config(tiny_sd15_dir, data, tmp_path / "straight", tmp_path / "latents", **settings)
    done = subprocess.run(_cli(straight), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tiny_config(tiny_sd15_dir, data, tmp_path / "killed", tmp_path / "latents", **settings)
    agent = subprocess.Popen(_cli(killed, "--resume", "latest"), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    out, deadline = Path(killed.output_dir), time.time() + 240
    while time.time() < deadline and agent.poll() is None and not (out / "checkpoint-2").exists():
        time.sleep(0.01)
    workers = _workers(agent.pid)
    assert agent.poll() is None and len(workers) == 2, "the run ended before a rank could be killed"
    os.kill(max(workers), signal.SIGKILL)  # one rank dies without warning; torchrun stops the other
    agent.wait(timeout=120)
    assert agent.returncode != 0 and not (out / "unet").exists()
    assert sorted(list_checkpoints(out)) == [2]
    # a torch.distributed.checkpoint save in its safetensors storage: a file per rank, the layout
    # in the files' JSON headers; no pickled .metadata (resuming must never unpickle)
    checkpoint = out / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "shards").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert sorted(p.name for p in checkpoint.glob("*-rank*")) == ["rng-rank0.pt", "rng-rank1.pt"]
    assert not list(checkpoint.rglob("*.metadata")) and not (checkpoint / "model.safetensors").exists()

    resumed = subprocess.run(_cli(killed, "--resume", "latest"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = unet_weights(Path(straight.output_dir) / "unet"), unet_weights(out / "unet")
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        assert torch.equal(want[name], got[name]), name


TRAINER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from rpo_fast.train import TrainConfig, train

    dist.init_process_group("gloo")  # here, not in train(): each run leaves the group to the next
    for config in json.loads(open(sys.argv[1]).read()):
        train(TrainConfig(**config))
    dist.destroy_process_group()
""")


def test_adafactor_under_fsdp_trains_as_one_process_and_resumes(tiny_sd15_dir, data, tmp_path):
    # transformers' Adafactor keeps a row and a column statistic per weight (means of the squared
    # gradient over its last two dims) and clips by the update's RMS; rpo_fast's subclass makes
    # them DTensors for sharded parameters (train/optim.py), so every mean and norm is the global
    # one: the same optimizer as one process holding the whole parameters and the global batch,
    # to fp32 sum order (statistics of each rank's shard alone would differ in the column means,
    # the row normalisation and the clipping, far above this tolerance).
    settings = dict(method="rpo", optimizer="adafactor", checkpoint_every=2, learning_rate=1e-4)
    with one_thread():
        one = train(tiny_config(tiny_sd15_dir, data, tmp_path / "one", tmp_path / "latents", batch_pairs=4,
                                max_steps=3, **settings))
    runs = [tiny_config(tiny_sd15_dir, data, tmp_path / name, tmp_path / "latents", batch_pairs=2, fsdp=True,
                        max_steps=steps, resume=resume, **settings)
            for name, steps, resume in (("two", 3, None), ("split", 2, None), ("split", 3, "latest"))]
    (tmp_path / "runs.json").write_text(json.dumps([vars(c) for c in runs]))
    (tmp_path / "trainer.py").write_text(TRAINER)
    done = subprocess.run([*TORCHRUN, str(tmp_path / "trainer.py"), str(tmp_path / "runs.json")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two, split = Path(runs[0].output_dir), Path(runs[1].output_dir)
    losses = [json.loads(line)["loss"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    base, want, got = (unet_weights(path) for path in (Path(tiny_sd15_dir) / "unet", one.output_dir / "unet", two / "unet"))
    assert want.keys() == got.keys() and len(want) > 10
    step_one = torch.cat([(want[n] - base[n]).flatten() for n in want])
    step_two = torch.cat([(got[n] - base[n]).flatten() for n in want])
    assert step_one.norm() > 0 and (step_two - step_one).norm() / step_one.norm() < 1e-4
    # resumed from step 2's sharded checkpoint (the factored statistics come back with their own
    # shapes and layouts, not the parameter's): step 3 as the uninterrupted run took it
    resumed = unet_weights(split / "unet")
    assert all(torch.equal(got[n], resumed[n]) for n in got)


def test_fsdp_without_torchrun_is_a_one_line_error(tiny_sd15_dir, data, tmp_path):
    config = tiny_config(tiny_sd15_dir, data, tmp_path / "out", tmp_path / "latents", fsdp=True)
    args = _cli(config)[len(TORCHRUN):]
    done = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "fsdp: shards the UNet over the processes of a torchrun launch" in done.stderr
    assert "Traceback" not in done.stderr
