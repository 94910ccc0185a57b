"""TrainConfig: every option of a training run, with its help text, checked on creation.

The command line (``rpo-fast train``) is generated from these fields, so ``--help``
documents every option and a YAML config uses the same names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .._types import BACKENDS, LOSS_TYPES, METHODS, WEIGHT_NORMS
from ..validation import LossSettings

MODEL_TYPES = ("auto", "sd15", "sdxl", "sd3", "flux")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")
PRECISIONS = ("no", "bf16", "fp16")
REF_DTYPES = ("fp32", "bf16", "fp16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
# The attention projections, as in the diffusers LoRA and Diffusion-DPO LoRA examples.
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def _opt(default: Any, help: str, **extra: Any):
    """A dataclass field carrying its command-line help text.

    ``aliases``: other spellings of the option (the diffusers example names); ``flag_aliases``:
    ``{flag: value}``, flags without a value that set the field to ``value`` (``--no_hflip``,
    ``--use_8bit_adam``); ``convert_aliases``: ``{flag: (function, help)}``, flags whose value
    is converted to this field's meaning (``--beta_dpo``); ``on_resume``: what a resumed run
    does when the option differs from the checkpoint's (:data:`ON_RESUME`; default ``refuse``)."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **extra}, **kwargs)


# What ``--resume`` does with an option that differs from the checkpoint's recorded config:
ON_RESUME = {
    "refuse": "refused, with the difference listed: the resumed run would be another run",
    "apply": "applied from the first step after the checkpoint, printed with its old and new value and recorded",
    "free": "taken as given: it does not change what is trained",
}


def _beta_from_beta_dpo(value: str) -> float:
    """diffusers' DPO examples scale the logit by -0.5 * beta_dpo; here by beta (docs/loss.md)."""
    try:
        return float(value) / 2
    except ValueError:
        raise ValueError(f"--beta_dpo: expected a number, got {value!r}") from None


def _tensorboard_from_report_to(value: str) -> bool:
    if value in ("tensorboard", "none"):
        return value == "tensorboard"
    raise ValueError(f"--report_to: rpo-fast logs to metrics.jsonl and TensorBoard only; expected tensorboard or "
                     f"none, got {value!r}")


@dataclass
class TrainConfig:
    # -- what to train, on what, where to write -------------------------------------------
    pretrained_model: str = _opt(None, "hub id or local diffusers pipeline folder (required)", required=True,
                                 aliases=("--pretrained_model_name_or_path",))
    data: str = _opt(None, "preference data: a folder of Pick-a-Pic v2 parquet files, a folder with "
                     "pairs.jsonl, or a dataset name for the datasets library (required)", required=True,
                     aliases=("--dataset_name",), on_resume="free")
    output_dir: str = _opt(None, "where checkpoints, metrics and the trained weights go (required)",
                           required=True, aliases=("--output_dir",), on_resume="free")
    model_type: str = _opt("auto", "sd15 | sdxl | sd3 | flux | auto (read from model_index.json)", choices=MODEL_TYPES)
    revision: Optional[str] = _opt(None, "model revision on the hub")
    variant: Optional[str] = _opt(None, "weights variant of the pretrained model, e.g. fp16")
    pretrained_vae: Optional[str] = _opt(None, "a separate VAE (hub id or folder of an AutoencoderKL), e.g. "
                                         "madebyollin/sdxl-vae-fp16-fix (unset: the pipeline's vae/)",
                                         aliases=("--pretrained_vae_model_name_or_path",))
    cache_dir: Optional[str] = _opt(None, "where models and datasets downloaded from the hub are stored "
                                    "(unset: the hub's default cache)", on_resume="free")
    split: str = _opt("train", "dataset split", aliases=("--dataset_split_name",))
    drop_ties: bool = _opt(True, "drop Pick-a-Pic rows labelled as ties (label_0 = 0.5)")
    max_rows: Optional[int] = _opt(None, "use only the first N rows of the dataset (after dropping ties)")
    max_train_samples: Optional[int] = _opt(None, "train on N rows drawn at random (seeded by --seed) from the "
                                            "dataset, as the diffusers examples do (unset: every row)")
    hflip: bool = _opt(True, "flip each pair horizontally at random (both images together, drawn per seed, epoch "
                       "and row), as the diffusers examples do; the latent cache holds both flips",
                       flag_aliases={"--no_hflip": False})
    random_crop: bool = _opt(False, "crop at a random position (drawn per seed and row, so the latent cache keeps "
                             "one crop per image) instead of the centre")
    weighting_scheme: str = _opt("logit_normal", "sd3 / flux: the flow-matching timestep density, and for sigma_sqrt "
                                 "and cosmap a per-sample loss weight, as diffusers' SD3 and Flux scripts' "
                                 "--weighting_scheme (none: uniform)", choices=WEIGHTING_SCHEMES)
    logit_mean: float = _opt(0.0, "sd3 / flux, logit_normal: the mean of the normal before the sigmoid")
    logit_std: float = _opt(1.0, "sd3 / flux, logit_normal: its standard deviation")
    mode_scale: float = _opt(1.29, "sd3 / flux, mode: the scale of the mode density")
    guidance_scale: float = _opt(3.5, "flux: the guidance scale given to a guidance-distilled transformer "
                                 "(FLUX.1-dev) in training, as diffusers' Flux script")
    proportion_empty_prompts: float = _opt(0.0, "train this fraction of pairs on the empty prompt (drawn per seed, "
                                           "epoch and row), as diffusers' --proportion_empty_prompts")

    # -- objective --------------------------------------------------------------------------
    method: str = _opt("rpo", "rpo | dpo | sft", choices=METHODS)
    loss_type: str = _opt("sigmoid", "per-pair loss: sigmoid | hinge | ipo", choices=LOSS_TYPES)
    beta: float = _opt(2500.0, "beta of the pair logit (2500 here = 5000 in the original Diffusion-DPO code); rpo "
                       "with --weight-norm mean (the default) takes a dpo beta as it is",
                       convert_aliases={"--beta_dpo": (_beta_from_beta_dpo,
                                                       "diffusers' beta_dpo, converted: beta = beta_dpo / 2 (the "
                                                       "diffusers examples scale the logit by -0.5 * beta_dpo)")})
    tau: float = _opt(0.5, "RPO temperature of the similarity weights")
    weight_norm: str = _opt("mean", "rpo: mean (the default) scales the weights (the row softmax of the similarities, "
                            "or the uniform ones) to average 1, so that each pair's own logit has dpo's strength at "
                            "the same --beta; row keeps each row summing to 1, as the LLM RPO trainer does (a pair's "
                            "own logit then has about beta/M)", choices=WEIGHT_NORMS)
    sft_weight: float = _opt(0.0, "dpo / rpo: add this times the SFT loss of the preferred images (keeps the "
                             "model denoising them well once the preference loss saturates; 0: off)")
    embeddings: Optional[str] = _opt(None, "embedding cache (rpo-fast embed) for the RPO weights; "
                                     "unset: uniform weights 1/M")
    backend: str = _opt("auto", "loss backend: auto | torch | cpu | cuda | triton (auto on CUDA: the fastest "
                                "right one, measured at the first step, in loss_backend.json)",
                        choices=("auto", *BACKENDS), on_resume="apply")

    # -- model and reference ----------------------------------------------------------------
    lora: bool = _opt(False, "train LoRA adapters on the UNet instead of all its weights")
    lora_rank: int = _opt(8, "LoRA rank")
    lora_alpha: Optional[float] = _opt(None, "LoRA alpha (unset: equal to the rank)")
    lora_target_modules: List[str] = _opt(lambda: list(DEFAULT_LORA_TARGETS),
                                          "UNet modules that get LoRA adapters", nargs="+")
    precompute_ref: bool = _opt(False, "compute the reference errors in a separate no-grad pass before "
                                "training, so that no reference model is held or run while training")
    ref_dtype: Optional[str] = _opt(None, "dtype of the frozen reference copy in full fine-tuning: fp32 | bf16 "
                                    "| fp16 (unset: that of the frozen models)", choices=REF_DTYPES)

    # -- optimisation -------------------------------------------------------------------------
    learning_rate: float = _opt(1e-5, "peak learning rate", on_resume="apply")
    lr_scheduler: str = _opt("constant_with_warmup", "learning-rate schedule (diffusers.optimization)",
                             choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "linear warm-up steps of the learning rate")
    max_steps: Optional[int] = _opt(None, "optimizer steps to train (unset: from --num-train-epochs, else 1000)",
                                    aliases=("--max_train_steps",), on_resume="apply")
    num_train_epochs: Optional[int] = _opt(None, "passes over the data, when --max-steps is unset (the last "
                                           "incomplete batch of an epoch is dropped)", on_resume="apply")
    batch_pairs: int = _opt(4, "preference pairs per process per micro-batch", aliases=("--train_batch_size",))
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    optimizer: str = _opt("adamw", "adamw | adamw8bit (bitsandbytes' AdamW8bit; needs bitsandbytes installed) | "
                          "adafactor (transformers' Adafactor, as the official trainer uses for SDXL; "
                          "weight decay from --adam-weight-decay)",
                          choices=OPTIMIZERS, flag_aliases={"--use_8bit_adam": "adamw8bit"})
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: no clipping)", on_resume="apply")
    max_nonfinite_steps: int = _opt(10, "stop when this many steps in a row have a non-finite loss or gradient", on_resume="apply")

    # -- speed and memory ---------------------------------------------------------------------
    resolution: Optional[int] = _opt(None, "training resolution in pixels (images are resized, then cropped; unset: "
                                     "1024 for SDXL, 512 for SD1.5, as the diffusers examples)")
    mixed_precision: str = _opt("no", "autocast dtype: no | bf16 | fp16; frozen models are stored in it",
                                choices=PRECISIONS)
    compile: Optional[bool] = _opt(None, "torch.compile the UNet (unset: on for CUDA)", on_resume="apply")
    compile_mode: Optional[str] = _opt(None, "torch.compile mode, e.g. max-autotune", on_resume="apply")
    gradient_checkpointing: bool = _opt(False, "recompute UNet activations in the backward pass to save memory", on_resume="apply")
    fsdp: bool = _opt(False, "under torchrun: shard the UNet's weights, gradients and optimizer state (and a frozen "
                      "reference copy) over the processes with FSDP2 instead of replicating them with DDP")
    allow_tf32: bool = _opt(True, "allow TF32 matmuls on Ampere and newer GPUs", on_resume="apply")
    latent_cache: Optional[str] = _opt(None, "latent cache folder, shared across runs (unset: "
                                       "$RPO_FAST_CACHE/latents or ~/.cache/rpo_fast/latents)", on_resume="free")
    vae_encode_batch_size: int = _opt(8, "images per VAE call when filling the latent cache", on_resume="free")
    text_cache: bool = _opt(True, "encode each distinct prompt once before training, into the latent cache's "
                            "folder, and free the text encoders (--no-text-cache: encode every step)")
    dataloader_num_workers: int = _opt(0, "DataLoader worker processes (image decoding, batch assembly)", on_resume="free")

    # -- runs, checkpoints, logs --------------------------------------------------------------
    seed: int = _opt(0, "seed of everything: data order, noise, timesteps, LoRA init")
    checkpoint_every: int = _opt(500, "write a checkpoint every N steps (0: only at the end)",
                                 aliases=("--checkpointing_steps",), on_resume="free")
    checkpoints_total_limit: Optional[int] = _opt(3, "keep at most this many checkpoints (unset: all)", on_resume="free")
    resume: Optional[str] = _opt(None, "'latest' or a checkpoint folder to resume from (with 'latest', "
                                 "a run without checkpoints starts fresh)", aliases=("--resume_from_checkpoint",), on_resume="free")
    log_every: int = _opt(10, "append metrics to metrics.jsonl every N steps", on_resume="free")
    tensorboard: Optional[bool] = _opt(None, "also log to TensorBoard (unset: when tensorboard is installed)",
                                       convert_aliases={"--report_to": (_tensorboard_from_report_to,
                                                                        "tensorboard | none (diffusers' name)")}, on_resume="free")
    overwrite_output_dir: bool = _opt(False, "start over in an output_dir that holds a run: delete its checkpoints, "
                                      "metrics and trained weights first (without it, such a folder is refused "
                                      "unless --resume is given)", on_resume="free")
    progress: bool = _opt(True, "show a tqdm progress bar", on_resume="free")
    device: Optional[str] = _opt(None, "cpu, cuda, cuda:1, ... (unset: cuda:LOCAL_RANK when available, else cpu)", on_resume="apply")
    ddp_timeout_minutes: float = _opt(120.0, "timeout of collective operations, e.g. while rank 0 fills caches", on_resume="free")
    save_final: bool = _opt(True, "save the trained weights in diffusers format at the end", on_resume="free")

    def __post_init__(self) -> None:
        for name in ("pretrained_model", "data", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or not str(value):
                raise ValueError(f"{name}: required, expected a non-empty string, got {value!r}")
            setattr(self, name, str(value))
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name}: expected one of {list(choices)}, got {value!r}")
        if self.max_steps is None and self.num_train_epochs is None:
            self.max_steps = 1000
        for name in ("batch_pairs", "gradient_accumulation_steps", "lora_rank", "vae_encode_batch_size", "log_every",
                     "max_nonfinite_steps"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("max_steps", "num_train_epochs", "resolution", "max_train_samples"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        for name in ("lr_warmup_steps", "checkpoint_every", "dataloader_num_workers", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.checkpoints_total_limit is not None:
            _check_int("checkpoints_total_limit", self.checkpoints_total_limit, minimum=1)
        if self.max_rows is not None:
            _check_int("max_rows", self.max_rows, minimum=1)
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution: expected a multiple of 8 (the VAE downsamples by 8), got {self.resolution}")
        for name in ("beta", "tau", "learning_rate", "adam_epsilon", "ddp_timeout_minutes"):
            _check_float(name, getattr(self, name), positive=True)
        for name in ("adam_weight_decay", "max_grad_norm", "sft_weight", "proportion_empty_prompts"):
            _check_float(name, getattr(self, name), positive=False)
        if self.logit_std <= 0:
            raise ValueError(f"logit_std: expected a positive number, got {self.logit_std}")
        if self.proportion_empty_prompts > 1:
            raise ValueError(f"proportion_empty_prompts: expected a fraction in [0, 1], got {self.proportion_empty_prompts}")
        if self.lora_alpha is not None:
            _check_float("lora_alpha", self.lora_alpha, positive=True)
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if not self.lora_target_modules or not all(isinstance(m, str) and m for m in self.lora_target_modules):
            raise ValueError(f"lora_target_modules: expected a non-empty list of module names, "
                             f"got {self.lora_target_modules!r}")
        if self.embeddings is not None and self.method != "rpo":
            raise ValueError(f"embeddings: only used by method 'rpo', got method {self.method!r}")
        if self.sft_weight and self.method == "sft":
            raise ValueError("sft_weight: only used by methods 'dpo' and 'rpo' (method 'sft' is the SFT loss alone)")
        if self.precompute_ref and self.method == "sft":
            raise ValueError("precompute_ref: method 'sft' has no reference")

    @property
    def uses_reference(self) -> bool:
        return self.method != "sft"

    @property
    def loss_settings(self) -> LossSettings:
        """The loss's hyper-parameters, validated above (one line naming the option): the
        loss takes them as they are (rpo_fast.functional.loss_with_settings)."""
        return LossSettings(self.method, float(self.beta), float(self.tau), self.loss_type, self.weight_norm)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if (positive and value <= 0) or (not positive and value < 0):
        raise ValueError(f"{name}: expected a {'positive' if positive else 'non-negative'} number, got {value!r}")


def config_fields() -> List[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """TrainConfig from a mapping (a parsed YAML file); unknown keys are an error naming them."""
    if not isinstance(values, Mapping):
        raise ValueError(f"config: expected a mapping of option names to values, got {type(values).__name__}")
    known = {f.name for f in config_fields()}
    normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise ValueError(f"config: unknown option(s) {unknown}; see `rpo-fast train --help`")
    missing = [f.name for f in config_fields() if f.metadata.get("required") and normalised.get(f.name) is None]
    if missing:
        raise ValueError(f"config: missing required option(s) {missing}")
    return TrainConfig(**normalised)


def _yaml_loader():
    """PyYAML's safe loader reading numbers as YAML 1.2 does: ``3e-4`` is a float (YAML 1.1,
    PyYAML's default, reads a float without a dot as a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    float_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_12, list("-+0123456789."))
    return Loader


def load_yaml_config(path, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """A YAML file of options, then ``overrides`` (e.g. from the command line) on top."""
    import yaml

    values: Dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            loaded = yaml.load(f, Loader=_yaml_loader())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a YAML mapping of option names to values")
        values.update({str(k).replace("-", "_"): v for k, v in (loaded or {}).items()})
    values.update(overrides or {})
    return config_from_dict(values)


def config_to_dict(config: TrainConfig) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def resume_differences(recorded: Mapping[str, Any], config: TrainConfig) -> Dict[str, Dict[str, tuple]]:
    """The options of ``config`` that differ from a checkpoint's ``recorded`` config, by what
    a resume does with them (``refuse`` / ``apply``, :data:`ON_RESUME`): ``{name: (old, new)}``.
    Options the record lacks (written by an older rpo-fast) are not compared."""
    import json

    now = json.loads(json.dumps(config_to_dict(config)))  # the record's own form: lists, not tuples
    found: Dict[str, Dict[str, tuple]] = {"refuse": {}, "apply": {}}
    for f in config_fields():
        kind = f.metadata.get("on_resume", "refuse")
        if kind != "free" and f.name in recorded and recorded[f.name] != now[f.name]:
            found[kind][f.name] = (recorded[f.name], now[f.name])
    return found
