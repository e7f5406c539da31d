"""What an accelerate config will run, checked without a GPU (`sdkit train --dry-run`).

The config goes through accelerate's own launcher code (`accelerate launch` turns it into
environment variables) and then into the plugin accelerate builds from them in every rank
(DeepSpeedPlugin, FullyShardedDataParallelPlugin), so a config this accepts is one accelerate
accepts as written. Then the plugin is checked against the recipe: accelerate reads the
accumulation from a DeepSpeed config, the recipe owns it, so they must agree.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from unittest import mock

from sdkit.errors import UserError, first_line


@dataclass
class Engine:
    name: str  # "one process", "DDP", "DeepSpeed ZeRO-2", "FSDP FULL_SHARD", ...
    machines: int = 1
    processes: int = 1  # in all, over every machine
    notes: list[str] = field(default_factory=list)

    @property
    def per_machine(self) -> int:
        return self.processes // self.machines


def counts(config: dict) -> tuple[int, int]:
    """(machines, processes in all): accelerate's `num_processes` already counts every machine."""
    try:
        machines = max(1, int(config.get("num_machines", 1) or 1))
        processes = max(1, int(config.get("num_processes", 1) or 1))
    except (TypeError, ValueError):
        raise UserError("--accelerate-config: num_machines and num_processes must be whole numbers") from None
    if processes % machines:
        raise UserError(f"--accelerate-config: num_processes ({processes}) counts the processes of all machines and "
                        f"must be a multiple of num_machines ({machines})")
    return machines, processes


def check_engine(config_path: Optional[Path], config: dict, recipe) -> Engine:
    """Parse the config as `accelerate launch` would, build its engine plugin, check it against the recipe."""
    machines, processes = counts(config)
    kind = str(config.get("distributed_type", "NO")).upper()
    if config_path is None or (processes == 1 and kind == "NO"):
        return Engine("one process", machines, processes)
    args, env = _launch_env(config_path)
    if kind == "DEEPSPEED":
        engine = _deepspeed(env, recipe)
    elif kind == "FSDP":
        engine = _fsdp(env, config)
    elif config.get("use_cpu") or args.cpu:
        engine = Engine("multi-CPU DDP (gloo)")
    else:
        engine = Engine("DDP")
    engine.machines, engine.processes = machines, processes
    if recipe.method.train_text_encoder:  # sdkit.training.prepared
        engine.notes.append("the text encoders train in one prepared module with the denoiser "
                            "(one model for the engine: their gradients sync with its)")
    if machines > 1:
        engine.notes.append("every machine must see the same output_dir (a shared file system): "
                            "the run checks it before training")
    return engine


def _launch_env(config_path: Path):
    """The environment `accelerate launch --config_file F` gives each rank."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config_path), "-m", "sdkit", "train", "RECIPE"])
    quiet = logging.getLogger("accelerate")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # accelerate's launcher checks (private, but the only way to see a config as the launcher does)
        args, defaults, _ = _validate_launch_command(args)
        if args.use_deepspeed:
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config.keys())
            _, env = prepare_deepspeed_cmd_env(args)
        elif args.use_fsdp or args.multi_gpu:
            env = prepare_multi_gpu_env(args)
        else:
            env = {}
    except (ValueError, KeyError, TypeError, ConnectionError) as e:
        raise UserError(f"--accelerate-config: {config_path}: {first_line(e)}") from None
    finally:
        quiet.setLevel(level)
    return args, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@contextlib.contextmanager
def _as_on_a_gpu(env: dict):
    """The rank's environment, with accelerate told a CUDA device exists: the plugins refuse
    some settings on a CPU that a GPU node accepts (FSDP's sync_module_states)."""
    import torch

    with mock.patch.dict(os.environ, env), \
            mock.patch("accelerate.utils.dataclasses.get_torch_accelerator_backend", return_value=("cuda", torch.cuda)):
        yield


def _deepspeed(env: dict, recipe) -> Engine:
    from accelerate.utils import DeepSpeedPlugin

    try:
        with _as_on_a_gpu(env):
            plugin = DeepSpeedPlugin()
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UserError(f"--accelerate-config: deepspeed: {first_line(e)}") from None
    t, config = recipe.train, plugin.deepspeed_config
    problems = fill_deepspeed(config, recipe)
    if problems:
        raise UserError(problems[0])
    engine = Engine(f"DeepSpeed ZeRO-{plugin.zero_stage}")
    engine.notes.append(f"micro-batch {config['train_micro_batch_size_per_gpu']} per process, "
                        f"accumulation {config['gradient_accumulation_steps']}, "
                        f"offload optimizer: {plugin.offload_optimizer_device}, params: {plugin.offload_param_device}")
    if t.mixed_precision != "no":
        engine.notes.append(f"mixed precision {t.mixed_precision} from the recipe")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        engine.notes.append("deepspeed is not installed here: pip install 'sdkit-recipes[deepspeed]' on the GPU machines")
    return engine


def fill_deepspeed(config: dict, recipe) -> list[str]:
    """Make a DeepSpeed config match the recipe: the recipe's micro-batch, accumulation and
    clipping where the config says `auto` (sdkit does not hand its data loader to accelerate:
    its sampler already shards by rank); a problem line where the config says otherwise."""
    t, problems = recipe.train, []
    wanted = {"train_micro_batch_size_per_gpu": (t.batch_size, "train.batch_size"),
              "gradient_accumulation_steps": (t.gradient_accumulation, "train.gradient_accumulation")}
    for key, (value, recipe_key) in wanted.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif int(config[key]) != value:
            problems.append(f"{recipe_key}: the DeepSpeed config sets {key}: {config[key]}, the recipe {value}; "
                            f"make them equal (or leave {key} out of the config)")
    if config.get("gradient_clipping", "auto") == "auto":
        if recipe.optim.max_grad_norm:
            config["gradient_clipping"] = recipe.optim.max_grad_norm
        else:
            config.pop("gradient_clipping", None)
    return problems


def _fsdp(env: dict, config: dict) -> Engine:
    from accelerate.utils import FullyShardedDataParallelPlugin

    try:
        with _as_on_a_gpu(env):
            plugin = FullyShardedDataParallelPlugin()
    except KeyError as e:
        raise UserError(f"--accelerate-config: fsdp_config: accelerate does not know the value {e}") from None
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"--accelerate-config: fsdp_config: {first_line(e)}") from None
    strategy = getattr(plugin.sharding_strategy, "name", None) or f"reshard_after_forward={plugin.reshard_after_forward}"
    engine = Engine(f"FSDP{plugin.fsdp_version} {strategy}")
    policy = getattr(plugin.auto_wrap_policy, "__name__", None) or type(plugin.auto_wrap_policy).__name__
    engine.notes.append(f"auto wrap: {policy}; checkpoints: {getattr(plugin.state_dict_type, 'name', plugin.state_dict_type)}; "
                        "the result is gathered to full weights (get_state_dict) on every rank")
    return engine


def describe(engine: Engine) -> list[str]:
    where = (f"{engine.machines} machines x {engine.per_machine} process{'es' if engine.per_machine > 1 else ''}"
             if engine.machines > 1 else f"{engine.processes} process{'es' if engine.processes > 1 else ''}")
    return [f"engine: {engine.name} on {where}", *(f"  {note}" for note in engine.notes)]
