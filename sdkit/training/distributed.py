"""What a run needs to follow accelerate's contract on every engine (one process, DDP,
DeepSpeed ZeRO, FSDP), one machine or several.

- accumulation: accelerate's own (`accelerator.accumulate()`), with the recipe's window;
- DeepSpeed: the micro-batch, accumulation and clipping from the recipe (sdkit's sampler shards
  by rank itself, so its loader is not handed to accelerate);
- several machines: every rank sees the run folder rank 0 made (a shared output_dir);
- weights that may be sharded (ZeRO-3, FSDP): gathered through `accelerator.get_state_dict`,
  which every rank must call, and the EMA updated from full parameters.
"""

from __future__ import annotations

import contextlib
import copy
import secrets
from pathlib import Path

from sdkit.errors import UserError

SHARED_CHECK_FILE = ".sdkit-shared-output-dir"


def accelerator_kwargs(recipe) -> dict:
    """Accelerator arguments the trainer's step relies on."""
    from accelerate.utils import GradientAccumulationPlugin

    return {
        # The step's micro-batches may span two epochs: never force a sync at a loader's end.
        "gradient_accumulation_plugin": GradientAccumulationPlugin(
            num_steps=recipe.train.gradient_accumulation, sync_with_dataloader=False),
        # One schedule step per optimizer step; accelerate would otherwise step a prepared
        # schedule once per process, for schedules sized in per-process batches.
        "step_scheduler_with_optimizer": False,
    }


def configure(accelerator, recipe) -> None:
    """Check the launched engine against the recipe; fill DeepSpeed's 'auto' values from it."""
    from accelerate.utils import DistributedType

    from sdkit.training.engines import fill_deepspeed

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        problems = fill_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, recipe)
        if problems:
            raise UserError(problems[0])
    if accelerator.gradient_accumulation_steps != recipe.train.gradient_accumulation:
        # accelerate takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS (a DeepSpeed config's) over ours
        raise UserError(f"train.gradient_accumulation: the accelerate config asks for "
                        f"{accelerator.gradient_accumulation_steps}, the recipe {recipe.train.gradient_accumulation}; "
                        "make them equal")


def check_shared_output_dir(accelerator, run_dir: Path) -> None:
    """Every rank must see what rank 0 writes in the run folder: the latent cache, checkpoints
    and the result are written once and read by all. One line when a rank does not."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    marker = Path(run_dir) / SHARED_CHECK_FILE
    token = [None]
    if accelerator.is_main_process:
        token = [secrets.token_hex(8)]
        marker.write_text(token[0])
    accelerator.wait_for_everyone()
    token = broadcast_object_list(token)
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    missing = [rank for rank, ok in enumerate(gather_object([seen])) if not ok]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    if missing:
        raise UserError(f"output_dir: rank {missing[0]} does not see the folder '{run_dir}' that rank 0 made; "
                        "training on several machines needs output_dir on a file system all of them share")


def shards_weights(accelerator) -> bool:
    """ZeRO-3 and FSDP keep a slice of every weight on each rank."""
    from accelerate.utils import DistributedType

    kind = getattr(accelerator, "distributed_type", None)  # plan's stand-in has none
    if kind == DistributedType.FSDP:
        return True
    if kind == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


@contextlib.contextmanager
def full_parameters(accelerator, prepared):
    """The unwrapped module with its full parameters inside the block (read-only), on every
    rank: ZeRO-3 gathers them (as diffusers' EMAModel does), FSDP summons them."""
    module = accelerator.unwrap_model(prepared)
    if not shards_weights(accelerator):
        yield module
        return
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(prepared, FullyShardedDataParallel):  # FSDP1
            with FullyShardedDataParallel.summon_full_params(prepared, writeback=False):
                yield module
        else:  # FSDP2: fully_shard made the module's own parameters DTensors
            module.unshard()
            try:
                yield module
            finally:
                module.reshard()


def forward_module(accelerator, prepared):
    """The denoiser to run forward outside the step (validation images): FSDP1 gathers weights
    only inside its wrapper's forward (a prepared denoiser alone: the wrapper is the denoiser);
    other engines run the unwrapped module. A container's (sdkit.training.prepared) denoiser is
    its first part."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from sdkit.training.prepared import parts

    if isinstance(prepared, FullyShardedDataParallel) and len(parts(accelerator, prepared)) == 1:
        return prepared
    return parts(accelerator, prepared)[0]


def gathered_modules(accelerator, prepared, ema=None) -> list:
    """The trained modules (denoiser first) of the `prepared` module, with full weights on the
    main process (None elsewhere), the EMA applied to the denoiser. Every rank must call this:
    gathering is collective."""
    from sdkit.training.prepared import parts, split_state

    trained = parts(accelerator, prepared)
    states = split_state(accelerator.get_state_dict(prepared), len(trained))
    if not accelerator.is_main_process:
        return [None] * len(trained)
    modules = []
    for i, (module, state) in enumerate(zip(trained, states)):
        module = getattr(module, "_orig_mod", module)  # undo torch.compile
        if shards_weights(accelerator):
            module = _with_full_weights(module, state)
        if i == 0 and ema is not None:
            ema.copy_to(module)
        modules.append(module)
    return modules


def _with_full_weights(module, state: dict):
    """A copy of a sharded module holding the gathered weights as plain tensors (load_state_dict
    would refuse: a sharded parameter's shape is its slice's)."""
    import torch

    full = copy.deepcopy(module)
    for name, tensor in state.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = full.get_submodule(owner_name) if owner_name else full
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            owner._parameters[leaf] = torch.nn.Parameter(tensor.detach().clone(), requires_grad=old.requires_grad)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = tensor.detach().clone()
    return full
