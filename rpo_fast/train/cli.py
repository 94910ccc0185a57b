"""``rpo-fast train``: a YAML config (``--config``) plus command-line overrides.

Every TrainConfig field is an option, spelled ``--field-name`` or ``--field_name``; a few also
answer to their name in the diffusers DPO / LoRA example scripts (``--train_batch_size``,
``--max_train_steps``, ``--pretrained_model_name_or_path``, ...). Options given on the command
line win over the YAML file; ``none`` unsets an optional value.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Dict

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fine-tune Stable Diffusion 1.5 / XL with Diffusion-RPO, Diffusion-DPO or SFT, full or LoRA, on one "
        "process or under `torchrun --nproc_per_node N`. Options come from --config (YAML, same names) and the "
        "command line, which wins."
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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command")}
    return load_yaml_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from .loop import train

    try:
        config = config_from_args(args)
    except (ValueError, OSError) as e:
        print(f"rpo-fast train: error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(config)
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
