"""``rpo-fast train``: a YAML config (``--config``) plus command-line overrides.

Every TrainConfig field is an option, spelled ``--field-name`` or ``--field_name``; a few also
answer to their name in the diffusers DPO / LoRA example scripts (``--train_batch_size``,
``--max_train_steps``, ``--pretrained_model_name_or_path``, ...). Options given on the command
line win over the YAML file; ``none`` unsets an optional value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any, Dict

from ..cli import INTERRUPTED, interrupted, quiet_library_progress, rerun_command
from .config import TrainConfig, config_fields, load_yaml_config


def _parser_for(type_hint: Any):
    """(argparse type function, is_bool, is_list) for a field's annotation."""
    origin, args = typing.get_origin(type_hint), typing.get_args(type_hint)
    optional = origin is typing.Union and type(None) in args
    if optional:
        type_hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(type_hint), typing.get_args(type_hint)
    if type_hint is bool:
        return None, True, False
    if origin in (list, typing.List):
        return args[0], False, True
    base = type_hint

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse, False, False


# Flags of the diffusers DPO examples (train_diffusion_dpo.py and train_diffusion_dpo_sdxl.py
# in diffusers' examples/research_projects/diffusion_dpo, as of diffusers 0.36) that have no
# meaning here: refused, with the rpo-fast way to get what they do.
REFUSED_FLAGS = {
    "--push_to_hub": "not supported: upload --output-dir yourself (e.g. `hf upload`)",
    "--hub_token": "not supported: rpo-fast does not upload",
    "--hub_model_id": "not supported: rpo-fast does not upload",
    "--run_validation": "no images are generated during training: run `rpo-fast eval` on the output",
    "--validation_steps": "no images are generated during training: run `rpo-fast eval` on a checkpoint",
    "--logging_dir": "TensorBoard logs always go to <output_dir>/tensorboard",
    "--tracker_name": "not supported: metrics go to <output_dir>/metrics.jsonl and TensorBoard",
    "--scale_lr": "not supported: give the scaled value as --learning-rate",
    "--lr_num_cycles": "not supported: the schedules use diffusers' defaults",
    "--lr_power": "not supported: the schedules use diffusers' defaults",
    "--enable_xformers_memory_efficient_attention": "not needed: the UNet uses PyTorch's scaled_dot_product_attention",
    "--prior_generation_precision": "not used by DPO training",
    "--local_rank": "launch with `torchrun --nproc_per_node N -m rpo_fast.cli train ...` (it sets LOCAL_RANK)",
    "--is_turbo": "SDXL-Turbo's timestep schedule is not supported",
}
RANK_FLAG = "--rank"  # diffusers' LoRA rank: the DPO examples are LoRA-only, so it implies --lora


def _refuse(namespace: argparse.Namespace, why: str) -> None:
    """Records a refused flag; :func:`config_from_args` reports all of them in one line."""
    setattr(namespace, "_refused", [*getattr(namespace, "_refused", []), why])


class _Refused(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest="_refused", nargs="?", default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        _refuse(namespace, f"{option_string} ({REFUSED_FLAGS[option_string]})")


class _Convert(argparse.Action):
    """A flag whose value is converted to the field's meaning (a value without one is refused)."""

    def __init__(self, option_strings, dest, convert=None, **kwargs):
        self.convert = convert
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, self.convert(values))
        except ValueError as e:
            _refuse(namespace, str(e))


class _Rank(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, "lora_rank", values)
        setattr(namespace, "_rank_implies_lora", True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fine-tune Stable Diffusion 1.5 / XL with Diffusion-RPO, Diffusion-DPO or SFT, full or LoRA, on one "
        "process or under `torchrun --nproc_per_node N`. Options come from --config (YAML, same names) and the "
        "command line, which wins. The diffusers DPO examples' flags keep their meaning there (--beta_dpo is "
        "converted, --rank implies --lora); those without one here are refused, naming what to use."
    )
    parser.add_argument("--config", default=None, metavar="YAML", help="YAML file of options (keys as below)")
    hints = typing.get_type_hints(TrainConfig)
    for f in config_fields():
        parse, is_bool, is_list = _parser_for(hints[f.name])
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name and not is_bool:  # --no-x_y would look odd: bools keep the dashed form
            names.append(f"--{f.name}")
        names += [a for a in f.metadata.get("aliases", ()) if a not in names]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text = f.metadata["help"]
        if not f.metadata.get("required"):
            text += f" (default: {'unset' if default is None else default})"
        kwargs: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if is_bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = parse
            if is_list:
                kwargs["nargs"] = "+"
            if f.metadata.get("choices"):
                kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        parser.add_argument(*names, **kwargs)
        if is_bool and "_" in f.name:  # the diffusers spelling of a switch: --gradient_checkpointing
            parser.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        for flag, value in f.metadata.get("flag_aliases", {}).items():
            parser.add_argument(flag, dest=f.name, action="store_const", const=value, default=argparse.SUPPRESS,
                                help=f"= --{f.name.replace('_', '-')} {value} (diffusers' name)")
        for flag, (convert, alias_help) in f.metadata.get("convert_aliases", {}).items():
            parser.add_argument(flag, dest=f.name, action=_Convert, convert=convert, default=argparse.SUPPRESS,
                                metavar=flag.lstrip("-").upper(), help=alias_help)
        if f.name == "lora_rank":
            parser.add_argument(RANK_FLAG, dest="lora_rank", action=_Rank, type=int, default=argparse.SUPPRESS,
                                help="the LoRA rank, and --lora with it, as in the diffusers DPO examples (LoRA-only)")
    for flag in REFUSED_FLAGS:
        parser.add_argument(flag, action=_Refused, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed arguments; ValueError (one line) for refused flags."""
    values = vars(args)
    if values.get("_refused"):
        raise ValueError("not supported here: " + "; ".join(values["_refused"]))  # every one at once
    overrides = {k: v for k, v in values.items() if k not in ("config", "command") and not k.startswith("_")}
    if values.get("_rank_implies_lora"):
        if overrides.get("lora") is False:
            raise ValueError(f"{RANK_FLAG}: the LoRA rank of the diffusers examples, which implies --lora; got --no-lora "
                             "too (for a full fine-tune drop --rank)")
        overrides["lora"] = True
    return load_yaml_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from .loop import TrainingInterrupted, train

    try:
        config = config_from_args(args)
    except (ValueError, OSError) as e:
        print(f"rpo-fast train: error: {e}", file=sys.stderr)
        return 2
    if not config.progress:  # from the command line or the YAML file
        quiet_library_progress()
    try:
        result = train(config)
    except TrainingInterrupted as e:
        if int(os.environ.get("RANK", "0")) != 0:
            return INTERRUPTED
        again = rerun_command(args, add=["--resume", "latest"] + (["--no-overwrite-output-dir"] if
                                                                   config.overwrite_output_dir else []),
                              drop=["--resume", "--resume_from_checkpoint"],
                              drop_switches=["--overwrite-output-dir", "--overwrite_output_dir"])
        return interrupted("train", e.reached, e.kept, again)
    except ValueError as e:  # bad data, bad model folder, incompatible checkpoint: the message says which
        print(f"rpo-fast train: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "training stopped" not in str(e):
            raise
        print(f"rpo-fast train: {e}", file=sys.stderr)
        return 1
    metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.final_metrics.items())
    print(f"rpo-fast train: {result.steps} steps done; outputs in {result.output_dir}")
    if metrics:
        print(f"  last step: {metrics}")
    for path in result.saved:
        print(f"  saved {path}")
    return 0
