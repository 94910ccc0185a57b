"""The training loop, top to bottom: set-up in :func:`prepare`, one optimizer step in
:func:`train_step`, the run in :func:`train`.

Runs on one process, or data-parallel under ``torchrun --nproc_per_node N`` (DDP; NCCL on
GPUs, gloo on CPUs). With ``rpo`` the contrast matrix spans the global batch: the loss
gathers every rank's per-sample errors and embeddings and scales its gradient so that, after
DDP's averaging, parameter gradients equal those of one process holding the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import sft_loss
from ..functional import loss_with_settings
from .._types import DTYPE_NAMES
from ..atomic import write_atomic
from ..data import SampledPreferenceDataset, load_preference_dataset
from . import checkpoint as ckpt
from .batches import MicroBatches, PairBatch, PairSchedule, PromptTable, micro_batch_loader
from .config import TrainConfig, config_to_dict, resume_differences
from .forward import predict, unet_inputs
from .latent_cache import LatentSpec, build_latent_cache, default_cache_root
from .metrics_log import MetricsLog
from .models import (Models, add_lora, family_for, load_models, load_trainable_state_dict, lora_targets,
                     module_identity, native_resolution, save_trained, trainable_state_dict)
from .optim import make_optimizer
from .preflight import check_paths_and_packages, check_output_dir, clear_run
from . import sharding
from .phases import PhaseClock
from .process import Process, weight_dtype
from .ref_model import Reference, frozen_copy, precompute_reference_errors
from .text_cache import build_text_cache

# What a checkpoint records beyond its config: a resumed run must have the same (checked
# together with the config's own options, config.ON_RESUME).
def _compat(world: int, fingerprint: str) -> Dict[str, Any]:
    return {"world_size": world, "dataset_fingerprint": fingerprint}


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) during :func:`train`: ``reached`` says where the run was, ``kept`` what
    it left on disk; half-written files are removed before this is raised."""

    def __init__(self, reached: str, kept: str):
        super().__init__(f"interrupted {reached}; {kept}")
        self.reached, self.kept = reached, kept


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, read and checked before anything loads."""

    path: Path
    step: int
    trainer_state: Dict[str, Any]
    changes: List[Dict[str, Any]]  # every option changed on a resume so far, with the step it applies from

    def change(self, option: str, old: Any, new: Any) -> None:
        self.changes.append({"option": option, "old": old, "new": new, "from_step": self.step + 1})

    def check_max_steps(self, config: TrainConfig) -> None:
        if config.max_steps <= self.step:
            raise ValueError(f"max_steps: {config.max_steps} is not above step {self.step} of {self.path}, so there "
                             f"is nothing to train; pass --max-steps above {self.step} to train further")

    def resolve_max_steps(self, config: TrainConfig) -> None:
        """``max_steps`` as --num-train-epochs resolved it: checked, and recorded when it changed."""
        self.check_max_steps(config)
        old = self.trainer_state.get("config", {}).get("max_steps")
        if old is not None and old != config.max_steps:
            self.change("max_steps", old, config.max_steps)


@dataclass
class TrainResult:
    output_dir: Path
    final_metrics: Dict[str, Any]
    steps: int
    skipped_pairs: int = 0  # rows with an unreadable image (or no embedding), left out of training
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient
    saved: List[Path] = field(default_factory=list)  # diffusers-format outputs
    checkpoints: List[Path] = field(default_factory=list)


@dataclass
class Run:
    """Everything :func:`prepare` sets up."""

    config: TrainConfig
    output_dir: Path
    process: Process  # device, rank, world size, group, barrier, progress (process.py)
    models: Models
    unet: torch.nn.Module  # the trained UNet itself (not wrapped): for saving and adapters
    forward_model: Callable  # what the step calls: the UNet, maybe DDP-wrapped and compiled
    ddp: Optional[torch.nn.parallel.DistributedDataParallel]
    reference: Optional[Reference]
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    grad_scaler: Optional[torch.amp.GradScaler]
    schedule: PairSchedule
    cache: Any
    prompts: PromptTable
    emb_w: Optional[torch.Tensor]
    emb_l: Optional[torch.Tensor]
    skipped_pairs: int
    dataset_fingerprint: str
    step: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    unsettled: List[Any] = field(default_factory=list)  # (step, [loss finite, gradient finite]) not read yet
    resumed_from: Optional[ResumePoint] = None
    skipped: List[Dict[str, Any]] = field(default_factory=list)  # {"row", "where", "why"} of each skipped row
    dropped_ties: int = 0
    model_type: str = "sd15"
    native_resolution: Optional[int] = None  # the size the model generates at (None: its configs do not say)
    config_changes: List[Dict[str, Any]] = field(default_factory=list)  # options changed on resume (ResumePoint)
    loss_backend: str = "auto"  # what the loss calls get: --backend, or on CUDA auto's measured choice
    phases: PhaseClock = field(default_factory=PhaseClock)  # where the time goes, marked here (phases.py)

    def autocast(self):
        return self.process.autocast(self.config.mixed_precision)

    def close(self) -> None:
        self.process.close()

    def barrier(self) -> None:
        self.process.barrier()

    # the process's fields, read by name everywhere in the step
    device = property(lambda self: self.process.device)
    rank = property(lambda self: self.process.rank)
    world = property(lambda self: self.process.world)
    group = property(lambda self: self.process.group)

    @property
    def micro_batches_per_step(self) -> int:
        return self.config.gradient_accumulation_steps

    @property
    def global_pairs_per_step(self) -> int:
        return self.config.batch_pairs * self.world * self.config.gradient_accumulation_steps


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingData:
    """The rows a run trains on, as prepare's data phase leaves them: the latent cache, the
    prompts, the RPO embeddings (rows without one left out), the rows kept, and the schedule
    of which rows each rank reads at each micro-batch (batches.py)."""

    dataset: Any
    cache: Any
    cache_root: Path
    prompts: PromptTable
    emb_w: Optional[torch.Tensor]
    emb_l: Optional[torch.Tensor]
    readable: np.ndarray
    schedule: PairSchedule


def prepare(config: TrainConfig, on_phase: Callable[[str], None] = lambda phase: None) -> Run:
    """Builds the run in named phases, in order: the process, the data (rows, latents,
    embeddings, schedule), the models on the device (prompts, reference, adapters), the
    optimizer, the resume, the loss backend, then data parallelism and compilation.
    ``on_phase`` is told what it starts doing (e.g. "encoding the latents"), for a report of an
    interrupt."""
    check_paths_and_packages(config)  # every path and optional package, before anything loads
    family = family_for(config)
    native = native_resolution(config, family)
    if config.resolution is None:  # the model's own size (SD1.5 512, SDXL 1024), as the diffusers examples
        config = dataclasses.replace(config, resolution=native or family.default_resolution)
    process = Process.start(config)
    if config.fsdp and process.world < 2:
        raise ValueError("fsdp: shards the UNet over the processes of a torchrun launch; run with "
                         "torchrun --nproc-per-node N (N >= 2), or drop --fsdp")
    _seed_everything(config.seed + process.rank)
    output_dir = Path(config.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    on_phase("reading the data")
    dataset, full_dataset = _read_data(config)
    resume = _resume_point(config, output_dir, process.world, dataset.fingerprint)  # before the caches fill
    on_phase("loading the models")
    models = load_models(config, family)
    data = _training_data(config, dataset, full_dataset, models, process, on_phase)
    if config.max_steps is None:  # --num-train-epochs
        steps = math.ceil(config.num_train_epochs * data.schedule.micro_batches_per_epoch
                          / config.gradient_accumulation_steps)
        config = dataclasses.replace(config, max_steps=steps)
        if resume is not None:
            resume.resolve_max_steps(config)

    _prompts_on_device(config, models, data, process, on_phase)
    unet = models.unet.to(process.device)
    on_phase("computing the reference errors" if config.precompute_ref else "setting up the reference")
    phases = PhaseClock()
    with phases("reference set-up"):
        reference = _reference(config, unet, models, data.cache, data.prompts, data.schedule, dataset.fingerprint,
                               process)
    _make_trainable(config, models, reference, process)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params, process.device)
    from diffusers.optimization import get_scheduler

    run = Run(
        config=config, output_dir=output_dir, process=process, models=models,
        unet=unet, forward_model=unet, ddp=None, reference=reference, params=params, optimizer=optimizer,
        lr_scheduler=get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                   num_training_steps=config.max_steps),
        grad_scaler=torch.amp.GradScaler(process.device.type) if config.mixed_precision == "fp16" else None,
        schedule=data.schedule, cache=data.cache, prompts=data.prompts, emb_w=data.emb_w, emb_l=data.emb_l,
        skipped_pairs=int(len(dataset) - data.readable.sum()),
        dataset_fingerprint=dataset.fingerprint, dropped_ties=dataset.dropped_ties,
        skipped=_skipped_rows(dataset, data.cache.valid, data.readable, config.embeddings) if process.main else [],
        model_type=family.name, native_resolution=native, phases=phases,
    )

    # Resume: weights, optimizer, LR schedule, RNG states, data position, counters.
    on_phase("loading the checkpoint")
    if resume is not None:
        _restore(run, resume)
    on_phase("choosing the loss backend")
    run.loss_backend = _choose_loss_backend(run)
    _wrap_for_parallel(run)
    return run


def _read_data(config: TrainConfig):
    """(the rows trained on, all the rows): ``--max-train-samples`` draws a subset."""
    dataset = full_dataset = load_preference_dataset(config.data, split=config.split, drop_ties=config.drop_ties,
                                                     max_rows=config.max_rows, cache_dir=config.cache_dir)
    if config.max_train_samples is not None and config.max_train_samples < len(dataset):
        dataset = SampledPreferenceDataset(dataset, config.max_train_samples, config.seed)
    if len(dataset) == 0:
        raise ValueError(f"data: {config.data!r} (split {config.split!r}) has no usable rows")
    return dataset, full_dataset


def _training_data(config: TrainConfig, dataset, full_dataset, models: Models, process: Process,
                   on_phase: Callable[[str], None]) -> TrainingData:
    """Each image VAE-encoded once into the latent cache (or read from it), the prompts, the
    embeddings (rows without one are left out like unreadable ones), and the schedule."""
    on_phase("encoding the latents (finished shards of the latent cache are kept)")
    cache_root = Path(config.latent_cache).expanduser() if config.latent_cache else default_cache_root()
    models.vae.to(process.device)  # fp32: the SDXL VAE overflows in fp16, and encoding happens once
    spec = LatentSpec(config.resolution, config.hflip, config.seed if config.random_crop else None)
    cache = build_latent_cache(dataset, models.vae, cache_root, spec, vae_identity=module_identity(models.vae),
                               process=process, batch_size=config.vae_encode_batch_size,
                               num_workers=config.dataloader_num_workers)
    models.vae = None  # not needed any more: free its memory
    prompts = PromptTable([dataset.prompt(i) for i in range(len(dataset))], config.seed, config.proportion_empty_prompts)
    emb_w = emb_l = None
    readable = cache.valid.copy()
    if config.embeddings:
        from ..embedding import load_embedding_cache

        emb_w, emb_l = load_embedding_cache(config.embeddings, full_dataset)  # built for every row
        if dataset is not full_dataset:
            emb_w, emb_l = emb_w[dataset.rows], emb_l[dataset.rows]
        readable &= (emb_w.abs().sum(1) > 0).numpy() & (emb_l.abs().sum(1) > 0).numpy()
        emb_w, emb_l = emb_w.to(process.device), emb_l.to(process.device)
    schedule = PairSchedule(np.flatnonzero(readable), config.batch_pairs, process.world, config.seed)
    return TrainingData(dataset, cache, cache_root, prompts, emb_w, emb_l, readable, schedule)


def _prompts_on_device(config: TrainConfig, models: Models, data: TrainingData, process: Process,
                       on_phase: Callable[[str], None]) -> None:
    """The text encoders on the device; with ``--text-cache`` each distinct prompt encoded once,
    and the encoders then leave the device."""
    device = process.device
    for encoder in models.text_encoders:
        encoder.to(device, dtype=weight_dtype(config.mixed_precision) if device.type == "cuda" else torch.float32)
    if config.text_cache:
        on_phase("encoding the prompts (finished shards of the text cache are kept)")
        models.text_cache = build_text_cache(models, data.prompts.prompts, data.cache_root, data.dataset.fingerprint,
                                             process=process)
        models.text_encoders = []


def _make_trainable(config: TrainConfig, models: Models, reference: Optional[Reference], process: Process) -> None:
    """LoRA adapters (or all weights) to train, gradient checkpointing, FSDP sharding: in place,
    after the reference was set up and before the optimizer sees the parameters."""
    unet, low_dtype = models.unet, weight_dtype(config.mixed_precision)
    if config.lora:
        if config.mixed_precision != "no" and process.device.type == "cuda":
            unet.to(low_dtype)  # frozen base weights in the low precision, adapters stay fp32
        # The adapters' initial weights are a function of the seed alone, the same on every
        # rank: filling the caches above draws from the global generators (DataLoader seeds).
        torch.manual_seed(config.seed)
        add_lora(unet, config, models.family)  # in place: a "lora" reference now sees the adapters, and disables them
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    if config.fsdp:  # before the optimizer is built: it must see the sharded parameters
        param_dtype = low_dtype if config.mixed_precision != "no" else None
        sharding.shard_unet(unet, param_dtype, models.family)
        if reference is not None and reference.kind == "copy":
            sharding.shard_unet(reference.model, param_dtype, models.family)


def _wrap_for_parallel(run: Run) -> None:
    """DDP (unless FSDP), then compilation: DDP first lets dynamo split graphs at its buckets."""
    config, device = run.config, run.device
    if run.world > 1 and not config.fsdp:
        run.ddp = torch.nn.parallel.DistributedDataParallel(  # gradients as views of the buckets: not held twice
            run.unet, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        run.forward_model = run.ddp
    if config.compile if config.compile is not None else device.type == "cuda":
        run.forward_model = torch.compile(run.forward_model, mode=config.compile_mode)
        if run.reference is not None and run.reference.model is not None:
            run.reference.forward = torch.compile(run.reference.model, mode=config.compile_mode)


def _choose_loss_backend(run: Run) -> str:
    """``--backend auto`` on a device whose kernels the CPU tests cannot vouch for (CUDA): every
    backend that runs there probed against the reference and timed at this run's shapes, once;
    the fastest correct one is used, rank 0's choice on every rank, and the measurement kept in
    ``loss_backend.json``. Otherwise the configured backend (auto's fixed order on the CPU)."""
    import json

    from .. import backend_check, verify

    config = run.config
    if config.backend != "auto" or run.device.type not in verify.DEVICE_TYPES:
        return config.backend
    record: List[Any] = [None]
    if run.rank == 0:
        shape = run.cache.latent_shape
        dtype = weight_dtype(config.mixed_precision)
        found = backend_check.measure(config.method, run.device, config.batch_pairs, shape, dtype,
                                      reference="ref_err" if run.reference is not None
                                      and run.reference.kind == "precomputed" else "ref_pred",
                                      weights="embeddings" if run.emb_w is not None else "uniform")
        record[0] = {"chosen": backend_check.fastest(found), "device": backend_check.device_name(run.device),
                     "method": config.method, "pairs": config.batch_pairs, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                     "measurements": backend_check.as_records(found)}
        write_atomic(run.output_dir / "loss_backend.json",
                     lambda tmp: tmp.write_text(json.dumps(record[0], indent=1) + "\n"))
        timings = ", ".join(f"{m.backend} {m.ms:.3g} ms{'' if m.correct else ' (WRONG)'}" for m in found)
        print(f"rpo-fast train: loss backend {record[0]['chosen']} (--backend auto, measured on {record[0]['device']}: "
              f"{timings}; in loss_backend.json)")
    if run.world > 1:
        dist.broadcast_object_list(record, src=0, group=run.group)
    return record[0]["chosen"]


def _reference(config: TrainConfig, unet, models, cache, prompts, schedule: PairSchedule, fingerprint: str,
               process: Process) -> Optional[Reference]:
    """The reference of dpo / rpo, chosen here only (none for sft): errors precomputed in one
    pass before training (``precompute_ref``), the trained UNet with its LoRA adapters disabled,
    or a frozen copy. Called before adapters are added and any checkpoint is loaded: the
    precomputed pass and the copy see the pretrained weights."""
    if not config.uses_reference:
        return None
    if config.precompute_ref:
        return Reference("precomputed", table=precompute_reference_errors(unet, models, cache, prompts, schedule,
                                                                          config, fingerprint, process))
    if config.lora:
        return Reference("lora", model=unet)
    ref_dtype = (DTYPE_NAMES[config.ref_dtype] if config.ref_dtype
                 else weight_dtype(config.mixed_precision) if process.device.type == "cuda" else None)
    return Reference("copy", model=frozen_copy(unet, ref_dtype))


def _skipped_rows(dataset, valid: np.ndarray, readable: np.ndarray, embeddings: Optional[str],
                  explained: int = 20) -> List[Dict[str, Any]]:
    """Each row left out, where it comes from and why (the first ``explained`` unreadable
    rows are decoded again to say which image failed)."""
    out = []
    for row in np.flatnonzero(~readable).tolist():
        if not valid[row]:
            why = (dataset.unreadable_reason(row) if len(out) < explained else None) or "an image cannot be read"
        else:
            why = f"no embedding in {embeddings} (an image could not be read when embedding)"
        out.append({"row": row, "where": dataset.location(row), "why": why})
    return out


def _resume_point(config: TrainConfig, output_dir: Path, world: int, fingerprint: str) -> Optional[ResumePoint]:
    """The checkpoint ``config.resume`` names, with every option compared with the config it
    recorded: a change of a ``refuse`` option is a ValueError listing them all; ``apply``
    options are returned as changes from the next step (config.ON_RESUME)."""
    path = ckpt.find_checkpoint(output_dir, config.resume)
    if path is None:
        return None
    state = ckpt.read_trainer_state(path)
    recorded = dict(state.get("config", {}))
    if recorded.get("method") == "rpo":  # written before weight_norm existed: rows summed to 1
        recorded.setdefault("weight_norm", "row")
    if config.max_steps is None:  # from --num-train-epochs: compared once resolved (resolve_max_steps)
        recorded.pop("max_steps", None)
    found = resume_differences(recorded, config)
    compat = _compat(world, fingerprint)
    found["refuse"].update({k: (state["compat"].get(k), v) for k, v in compat.items()
                            if k in state["compat"] and state["compat"][k] != v})
    if found["refuse"]:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in found["refuse"].items())
        raise ValueError(f"resume: {path} was written by a run with other settings ({detail}); these cannot change "
                         "on resume (docs/training.md lists what can)")
    point = ResumePoint(path, int(state["step"]), state, list(state.get("config_changes", [])))
    for option, (old, new) in found["apply"].items():
        point.change(option, old, new)
    if config.max_steps is not None:
        point.check_max_steps(config)
    return point


def _restore(run: Run, point: ResumePoint) -> None:
    shards_like = sharding.state_dicts(run.unet, run.optimizer) if run.config.fsdp else None
    state = ckpt.load_checkpoint(point.path, run.rank, shards_like=shards_like)
    trainer = state["trainer_state"]
    if run.config.fsdp:
        sharding.load_state_dicts(run.unet, run.optimizer, state["model"], state["optimizer"])
    else:
        load_trainable_state_dict(run.unet, {k: v.to(run.device) for k, v in state["model"].items()}, run.config.lora)
        run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    _set_learning_rate(run)
    if run.grad_scaler is not None and state["grad_scaler"] is not None:
        run.grad_scaler.load_state_dict(state["grad_scaler"])
    ckpt.set_rng_state(state["rng"])
    run.step = int(trainer["step"])
    run.nonfinite_steps = int(trainer["nonfinite_steps"])
    run.nonfinite_in_a_row = int(trainer["nonfinite_in_a_row"])
    run.resumed_from = point
    run.config_changes = point.changes


def _set_learning_rate(run: Run) -> None:
    """The restored schedule at this run's learning rate and length: loading its state brought
    back the checkpoint's peak rate (``base_lrs``), and the optimizer's state its last rate;
    both are set from the config, as the schedule's own step computes them, so an unchanged
    resume is bit for bit and a changed ``learning_rate`` or ``max_steps`` applies from the
    next step."""
    scheduler = run.lr_scheduler
    scheduler.base_lrs = [run.config.learning_rate] * len(run.optimizer.param_groups)
    rates = [base * rate(scheduler.last_epoch) for rate, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(run.optimizer.param_groups, rates):
        group["initial_lr"], group["lr"] = run.config.learning_rate, lr
    scheduler._last_lr = rates


def _save_checkpoint(run: Run) -> Path:
    settle_nonfinite(run)  # the counters the checkpoint holds
    trainer_state = {
        "step": run.step,
        "micro_batches_done": run.step * run.micro_batches_per_step,  # the data position
        "epoch": run.schedule.epoch_of(max(0, run.step * run.micro_batches_per_step - 1)),
        "nonfinite_steps": run.nonfinite_steps,
        "nonfinite_in_a_row": run.nonfinite_in_a_row,
        "skipped_pairs": run.skipped_pairs,
        "compat": _compat(run.world, run.dataset_fingerprint),
        "config": config_to_dict(run.config),
        "config_changes": run.config_changes,
    }
    if run.config.fsdp:  # every rank its own shards
        model_state, optimizer_state = sharding.state_dicts(run.unet, run.optimizer)
    elif run.rank == 0:
        model_state, optimizer_state = trainable_state_dict(run.unet, run.config.lora), run.optimizer.state_dict()
    else:
        model_state, optimizer_state = {}, {}
    state = ckpt.TrainingState(model_state, optimizer_state, run.lr_scheduler, run.grad_scaler, trainer_state,
                               sharded=run.config.fsdp)
    return ckpt.save_checkpoint(run.output_dir, run.step, state, run.process, run.config.checkpoints_total_limit)


def compute_loss(run: Run, batch: PairBatch):
    """Forward one micro-batch; returns (loss, metrics dict of 0-dim tensors)."""
    config, device, phase = run.config, run.device, run.phases
    with phase("batch assembly"):
        inputs = unet_inputs(run.models, batch, device, config.resolution, winners_only=config.method == "sft")
    ref_kwargs: Dict[str, torch.Tensor] = {}
    if config.method != "sft":
        with phase("reference UNet forward"):
            if run.reference.kind == "precomputed":
                ref_kwargs["ref_err"] = run.reference.ref_err(batch.epoch, batch.rows, device)
            else:
                ref_kwargs["ref_pred"] = run.reference.ref_pred(inputs, run.autocast)
    with phase("policy UNet forward"), run.autocast():
        model_pred = predict(run.forward_model, inputs)
    with phase("loss forward"):
        return _loss(run, model_pred, inputs, ref_kwargs, batch)


def _loss(run: Run, model_pred: torch.Tensor, inputs, ref_kwargs: Dict[str, torch.Tensor], batch: PairBatch):
    """The configured objective on one micro-batch's predictions: (loss, metrics)."""
    config, device = run.config, run.device
    backend = run.loss_backend
    if config.method == "sft":
        # sft takes the (2M, ...) layout and averages its first half; only the winners went
        # through the UNet, so the second half is a detached copy that adds no gradient.
        pred = torch.cat([model_pred, model_pred.detach()])
        target = torch.cat([inputs.target, inputs.target])
        loss = loss_with_settings(config.loss_settings, pred, target, backend=backend)
        metrics = {}
    else:
        emb = {}
        if run.emb_w is not None:  # rpo only (TrainConfig refuses --embeddings for dpo)
            rows = batch.rows.to(device)
            emb = {"emb_w": run.emb_w[rows], "emb_l": run.emb_l[rows]}
        # TrainConfig validated beta, tau, loss_type and weight_norm: only the tensors are checked here
        loss, metrics = loss_with_settings(config.loss_settings, model_pred, inputs.target, **ref_kwargs, **emb,
                                           backend=backend, process_group=run.group, return_metrics=True)
    if config.sft_weight:  # dpo / rpo only (TrainConfig refuses it for sft)
        sft = sft_loss(model_pred, inputs.target, backend=backend)
        loss = loss + config.sft_weight * sft
        metrics = {**metrics, "sft_loss": sft.detach()}
    return loss, metrics


def train_step(run: Run, batches: Iterator[PairBatch], read: bool = True) -> Dict[str, Any]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches. A non-finite
    loss or gradient skips the update (counted); too many in a row stop the run.

    With torch's fused AdamW (the default) the skip is decided on the device, so a step need
    not wait for its numbers: ``read=False`` returns the metrics as 0-dim tensors and leaves
    the non-finite count for the next reading step (:func:`settle_nonfinite`); ``read=True``
    (the default) reads them, one host sync. The other optimizers and fp16's grad scaler need
    the host to decide, so their steps sync every time."""
    config = run.config
    accum = run.micro_batches_per_step
    run.optimizer.zero_grad(set_to_none=True)
    sums: Dict[str, torch.Tensor] = {}
    for micro in range(accum):
        batch = next(batches)
        last = micro == accum - 1
        sync = run.ddp.no_sync() if (run.ddp is not None and not last) else contextlib.nullcontext()
        if run.config.fsdp and accum > 1:
            run.unet.set_requires_gradient_sync(last)  # FSDP's no_sync: reduce-scatter on the last only
        with sync:
            loss, metrics = compute_loss(run, batch)
            scaled = loss / accum
            (run.grad_scaler.scale(scaled) if run.grad_scaler is not None else scaled).backward()
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / accum

    names = sorted(sums)
    values = torch.stack([sums[n] for n in names])
    if run.world > 1:  # dpo/sft losses are per rank: report the global mean (rpo's is global already)
        values = values.to(run.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=run.group)
        values = values / run.world

    if run.grad_scaler is not None:
        run.grad_scaler.unscale_(run.optimizer)
    with run.phases("gradient clipping"):
        if config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None], foreach=True)
    if hasattr(norm, "full_tensor"):  # sharded under FSDP
        norm = norm.full_tensor()
    # fp16: inf gradients are the grad scaler's business (it skips the step and lowers the scale).
    finite = torch.stack([values[names.index("loss")].isfinite(),
                          norm.isfinite() if run.grad_scaler is None else torch.ones_like(norm, dtype=torch.bool)])
    run.unsettled.append((run.step + 1, finite))
    with run.phases("optimizer"):
        _optimizer_step(run, finite)
    if run.grad_scaler is not None:
        run.grad_scaler.update()
    with warnings.catch_warnings():  # a skipped first step: the schedule still advances with the step count
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        run.lr_scheduler.step()
    run.step += 1
    metrics = {**dict(zip(names, values.unbind())), "grad_norm": norm}
    if read or not _skips_on_device(run):
        settle_nonfinite(run)
    if read:
        metrics = dict(zip(metrics, torch.stack(list(metrics.values())).cpu().tolist()))
    metrics["lr"] = run.lr_scheduler.get_last_lr()[0]
    metrics["nonfinite_steps"] = run.nonfinite_steps
    return metrics


def _optimizer_step(run: Run, finite: torch.Tensor) -> None:
    """The update, unless the loss or the gradient is not finite (then no update, state kept)."""
    if _skips_on_device(run):
        run.optimizer.found_inf = (~finite.all()).float()  # read by the fused kernel: no update, state kept
        run.optimizer.step()
    elif bool(finite.all()):  # the host decides: a sync
        if run.grad_scaler is not None:
            run.grad_scaler.step(run.optimizer)
        else:
            run.optimizer.step()
    else:
        run.optimizer.zero_grad(set_to_none=True)


def _skips_on_device(run: Run) -> bool:
    """torch's fused AdamW takes a ``found_inf`` flag (as GradScaler gives it) and then leaves
    weights and state untouched: the skip needs no host decision."""
    return run.grad_scaler is None and isinstance(run.optimizer, torch.optim.AdamW) and bool(run.optimizer.defaults["fused"])


def settle_nonfinite(run: Run) -> None:
    """Reads the finiteness of the steps not yet read (one host sync), counts the skipped ones,
    and stops the run when ``max_nonfinite_steps`` of them came in a row."""
    if not run.unsettled:
        return
    steps = [step for step, _ in run.unsettled]
    flags = torch.stack([flag for _, flag in run.unsettled]).tolist()
    run.unsettled.clear()
    for step, (loss_finite, grad_finite) in zip(steps, flags):
        if loss_finite and grad_finite:
            run.nonfinite_in_a_row = 0
            continue
        run.nonfinite_steps += 1
        run.nonfinite_in_a_row += 1
        if run.nonfinite_in_a_row >= run.config.max_nonfinite_steps:
            raise RuntimeError(
                f"training stopped at step {step}: {run.nonfinite_in_a_row} steps in a row had a non-finite "
                f"{'loss' if not loss_finite else 'gradient'} ({run.nonfinite_steps} in total). Try a lower "
                "learning_rate or beta, mixed_precision bf16 instead of fp16, or check the data; resume from the "
                "last checkpoint with --resume latest."
            )


def step_batches(run: Run, start_step: int, stop_step: int) -> Iterator[PairBatch]:
    """This rank's micro-batches for optimizer steps ``[start_step, stop_step)``, assembled
    ahead by DataLoader workers when ``dataloader_num_workers`` > 0."""
    accum = run.micro_batches_per_step
    dataset = MicroBatches(run.schedule, run.cache, run.prompts, run.rank, run.config.seed,
                           run.models.timestep_draw, start_step * accum, stop_step * accum)
    return iter(micro_batch_loader(dataset, run.config.dataloader_num_workers, pin_memory=run.device.type == "cuda"))


def train(config: TrainConfig) -> TrainResult:
    """Train as configured; returns where the outputs went and the last metrics. Ctrl-C
    raises :class:`TrainingInterrupted` saying where the run was and what it kept."""
    check_output_dir(config)  # a folder holding a run is resumed or started over, never overwritten
    output_dir = Path(config.output_dir).expanduser().resolve()
    if config.overwrite_output_dir and int(os.environ.get("RANK", "0")) == 0:
        cleared = clear_run(output_dir)
        if cleared:
            print(f"rpo-fast train: --overwrite-output-dir: deleted {', '.join(cleared)} in {output_dir}")
    phases = ["starting"]
    try:
        run = prepare(config, on_phase=phases.append)
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"while {phases[-1]}, before training started",
                                  "no checkpoint was written by this run") from None
    try:
        return _train(run)
    except KeyboardInterrupt:
        found = ckpt.list_checkpoints(run.output_dir)
        kept = (f"{found[max(found)].name} is kept (steps after {max(found)} will be trained again)" if found else
                "no checkpoint yet (one every --checkpoint-every steps, and at the end): a rerun starts at step 0")
        raise TrainingInterrupted(f"at step {run.step} of {run.config.max_steps}", kept) from None
    finally:
        run.close()


def _train(run: Run) -> TrainResult:
    from tqdm.auto import tqdm

    config = run.config  # with the values prepare resolved (resolution, max_steps from epochs)
    main = run.rank == 0
    if main:
        _write_config_record(run)
        _report_start(run)
    log = MetricsLog(run.output_dir, enabled=main, tensorboard=config.tensorboard,
                     resume_step=run.step if config.resume is not None else None)
    bar = tqdm(total=config.max_steps, initial=run.step, desc=f"{config.method}{' lora' if config.lora else ''}",
               unit="step", disable=not (config.progress and main), dynamic_ncols=True)
    batches = step_batches(run, run.step, config.max_steps)
    checkpoints: List[Path] = []
    metrics: Dict[str, Any] = {}
    window_pairs, window_start = 0, time.perf_counter()
    while run.step < config.max_steps:
        step = run.step + 1
        logs = step % config.log_every == 0 or step == config.max_steps
        saves = (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.max_steps
        metrics = train_step(run, batches, read=logs or saves)  # the other steps do not wait for the device
        window_pairs += run.global_pairs_per_step
        bar.update(1)
        if not (logs or saves):
            continue
        elapsed = time.perf_counter() - window_start
        metrics["pairs_per_s"] = window_pairs / elapsed if elapsed > 0 else float("nan")
        metrics["epoch"] = run.schedule.epoch_of(run.step * run.micro_batches_per_step - 1)
        bar.set_postfix(loss=f"{metrics['loss']:.4g}", acc=f"{metrics.get('implicit_acc', float('nan')):.2f}",
                        pairs_s=f"{metrics['pairs_per_s']:.1f}", refresh=False)
        if logs:
            log.log(run.step, {**metrics, "skipped_pairs": run.skipped_pairs})
            window_pairs, window_start = 0, time.perf_counter()
        if saves:
            checkpoints.append(_save_checkpoint(run))
    bar.close()
    log.close()
    saved: List[Path] = []
    if config.save_final:
        full = sharding.full_model_state(run.unet) if config.fsdp else None  # a collective: every rank
        if main:
            saved = save_trained(run.unet, run.models, config, run.output_dir, state=full)
    run.barrier()
    return TrainResult(run.output_dir, metrics, run.step, run.skipped_pairs, run.nonfinite_steps, saved, checkpoints)


def _write_config_record(run: Run) -> None:
    """``train_config.yaml``: the options the run trains with now (``--config`` reads it back),
    headed by the options changed on resume, each with the step it applies from."""
    import yaml

    lines = ["# rpo-fast train: the options of this run (rpo-fast train --config reads this file)"]
    if run.config_changes:
        lines.append("# changed on resume (the values below are the latest):")
        lines += [f"#   {c['option']}: {c['old']!r} until step {c['from_step'] - 1}, {c['new']!r} from step "
                  f"{c['from_step']}" for c in run.config_changes]
    record = yaml.safe_dump(config_to_dict(run.config), sort_keys=False)
    write_atomic(run.output_dir / "train_config.yaml", lambda tmp: tmp.write_text("\n".join(lines) + "\n" + record))


def _report_start(run: Run) -> None:
    """The run in a few lines: model, data used and left out, objective and its strength,
    resolution, caches, output; then each row left out (all in skipped_pairs.jsonl)."""
    import json

    config = run.config

    def say(text: str) -> None:
        print(f"rpo-fast train: {text}")

    targets = ", ".join(lora_targets(config, run.models.family))
    trained = f"LoRA rank {config.lora_rank} on {targets}" if config.lora else f"the whole {run.models.family.denoiser_label}"
    say(f"model {config.pretrained_model} ({run.model_type}), training {trained}")
    left = [f"{n} {why}" for n, why in ((run.dropped_ties, "tie(s) dropped (--no-drop-ties keeps them)"),
                                       (run.skipped_pairs, "unreadable or without an embedding")) if n]
    chosen = (f", the first {config.max_rows} rows (--max-rows)" if config.max_rows else "") + (
        f", {config.max_train_samples} drawn at random (--max-train-samples)" if config.max_train_samples else "")
    say(f"data {config.data}{chosen}: {len(run.schedule.rows)} pairs used" + (f"; {', '.join(left)}" if left else ""))
    say(f"objective {objective_summary(run)}")
    native = run.native_resolution
    if native is None or native == config.resolution:
        say(f"resolution {config.resolution} px" + (" (the model's native size)" if native else ""))
    else:
        say(f"warning: resolution {config.resolution} px, but the model generates at {native} px: it will be tuned at a "
            f"size it is not used at (--resolution {native} trains at its own size)")
    text = f", prompts {run.models.text_cache.folder.resolve()}" if run.models.text_cache is not None else ""
    say(f"caches: latents {run.cache.folder.resolve()}{text}")
    say(f"output {run.output_dir}")
    if run.resumed_from is not None:
        point = run.resumed_from
        say(f"resuming from {point.path} (step {run.step} of {config.max_steps})")
        for c in point.changes:
            if c["from_step"] == run.step + 1:
                say(f"  {c['option']}: {c['old']!r} -> {c['new']!r} from step {c['from_step']} (recorded in "
                    "train_config.yaml and the next checkpoints)")
    elif config.resume == "latest":
        say(f"--resume latest: no checkpoint in {run.output_dir} yet, starting at step 0")
    if run.skipped:
        path = run.output_dir / "skipped_pairs.jsonl"
        path.write_text("".join(json.dumps(s) + "\n" for s in run.skipped))
        shown = "; ".join(f"{s['where']}: {s['why']}" for s in run.skipped[:5])
        more = f"; and {len(run.skipped) - 5} more" if len(run.skipped) > 5 else ""
        say(f"skipping {len(run.skipped)} pair(s): {shown}{more} (all in {path})")


def objective_summary(run: Run, batches: int = 32) -> str:
    """The method and its effective per-pair strength: a pair's own logit is scaled by beta
    times its diagonal weight. With --weight-norm mean the weights average 1 (uniform: 1
    exactly, dpo's strength); with row each row sums to 1 (uniform: 1/M). Similarity weights
    are measured on the first ``batches`` micro-batches."""
    config = run.config
    if config.method == "sft":
        return "sft: the denoising error of the preferred images (no reference, no beta)"
    text = f"{config.method}, beta {config.beta:g}"
    if config.method == "rpo":
        m = run.schedule.global_pairs
        norm = f"--weight-norm {config.weight_norm}, M = {m} pairs a contrast"
        if run.emb_w is None:
            diagonal, how = 1.0 if config.weight_norm == "mean" else 1.0 / m, f"uniform weights (no --embeddings; {norm})"
        else:
            from ..weights import mean_diagonal_weight

            count = min(batches, run.schedule.micro_batches_per_epoch)
            rows = (torch.as_tensor(run.schedule.global_rows(u)[1], device=run.emb_w.device) for u in range(count))
            diagonal = mean_diagonal_weight(run.emb_w, run.emb_l, rows, config.tau, config.weight_norm)
            how = (f"similarity weights (tau {config.tau:g}; {norm}): mean diagonal weight {diagonal:.3g} over "
                   f"{count} batch(es)")
        effective = config.beta * diagonal
        text += (f" with {how}; each pair's own logit is scaled by beta x weight = {effective:.4g} (dpo at beta "
                 f"{effective:.4g} has that per-pair strength)")
    if config.sft_weight:
        text += f", plus {config.sft_weight:g} x the SFT loss of the preferred images"
    return text
