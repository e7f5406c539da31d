"""Builders: each turns the recipe into one part of a run and returns it.

The trainer calls them in order; `sdkit bench` gets its parts from the trainer, and `sdkit plan`
calls `prepare_modules` and `build_step` itself on a family built from configs on fake tensors,
so the rules they hold (what trains and in which dtype, the optimizer, the EMA, the objective,
the step) are written once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from sdkit.errors import UserError
from sdkit.training.distributed import full_parameters
from sdkit.training.optim import EMA, make_lr_schedule, make_optimizer, param_groups, training_optimizer
from sdkit.training.step import TrainStep


def weight_dtype(precision: str):
    """dtype of the frozen weights (and of the inputs of a frozen base) under `precision`."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def trained_dtype(recipe):
    """dtype of the trained weights: fp32 masters, or bf16 (train.weights_dtype)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[recipe.train.weights_dtype]


def run_precision(requested: str, cuda: bool) -> tuple[str, str]:
    """(the mixed precision this run uses, a note saying why it differs from the recipe's, or '').

    fp16 needs a CUDA GPU: elsewhere accelerate turns autocast off, and fp16 frozen weights then
    meet fp32 trainable ones in the same matmul (validation crashed on it). Such a run trains in
    fp32 instead, said once in the log: slower, the same result files.
    """
    if requested == "fp16" and not cuda:
        return "no", ("train.mixed_precision=fp16 needs a CUDA GPU and this machine has none: "
                      "this run trains in fp32 instead (slower; the same result files)")
    return requested, ""


def load_family(recipe, family_name: str, dtype):
    from sdkit.families import family_class

    return family_class(family_name).load(recipe.model, dtype=dtype)


def prepare_modules(family, adapter, recipe) -> list:
    """Attach the adapter and apply the memory options; returns the trainable modules, denoiser first."""
    modules = adapter.attach(family, dtype=trained_dtype(recipe))
    t = recipe.train
    if t.gradient_checkpointing:
        for module in modules:
            if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
                module.enable_gradient_checkpointing()
            else:  # transformers' text encoders
                module.gradient_checkpointing_enable()
    if t.channels_last:
        import torch

        family.denoiser.to(memory_format=torch.channels_last)
    return modules


def total_steps(recipe, batches_per_epoch: int) -> int:
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    return max(1, math.ceil(batches_per_epoch / t.gradient_accumulation) * t.epochs)


def build_step(recipe, family, adapter, modules: list, accelerator, *, dtype, steps: int,
               optimizer_factory: Callable = make_optimizer, compile: Optional[bool] = None) -> TrainStep:
    """Optimizer, schedule, objective, EMA and noise generator around the prepared modules.
    `optimizer_factory(params, optim, lr)` makes the recipe's optimizer (plan stands in its own);
    `compile` defaults to what the recipe says for the accelerator's device."""
    import torch

    from sdkit.training.objectives import make_objective
    from sdkit.training.prepared import one_module, parts, parts_of

    if recipe.optim.fused_backward and accelerator.num_processes > 1:
        # DDP averages gradients after backward; a fused update would use this rank's alone.
        raise UserError("optim.fused_backward: runs on one process only (gradients are averaged across "
                        f"processes after backward, the updates happen during it); this run has {accelerator.num_processes}")
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    lr = recipe.learning_rate(accelerator.num_processes)
    optimizer = training_optimizer(param_groups(modules, recipe.optim, lr), recipe.optim, lr,
                                   base=optimizer_factory, seed=recipe.train.seed)
    schedule = make_lr_schedule(optimizer, recipe.optim, steps)
    compile = recipe.compiles(accelerator.device.type) if compile is None else compile
    guard = None
    if compile:
        from sdkit.training.compiled import compile_module

        guard = compile_module(modules[0], recipe.output_dir)
    # ONE prepared module (sdkit.training.prepared): DDP syncs the text encoders' gradients with
    # the denoiser's, DeepSpeed gets the one model it accepts.
    model = one_module(family, modules, recipe.data.resolution, adapter.compute_dtype(dtype))
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    ema = None
    if recipe.ema_applies:
        with full_parameters(accelerator, model) as module:  # ZeRO-3/FSDP: not this rank's slice
            ema = EMA(parts_of(module)[0], recipe.train.ema_decay, device="cpu" if recipe.train.ema_on_cpu else None)
    # All randomness of a step (latent sampling, noise, timesteps) comes from this stream,
    # one per rank, saved in every checkpoint: resumed runs draw exactly the same numbers.
    rng = torch.Generator().manual_seed(recipe.train.seed * 1000 + accelerator.process_index)
    return TrainStep(
        family=family, model=model, modules=parts(accelerator, model), params=params,
        objective=make_objective(family.objective, family.scheduler_config, recipe.train),
        optimizer=optimizer, lr_scheduler=schedule, accelerator=accelerator, noise_rng=rng,
        compute_dtype=adapter.compute_dtype(dtype), resolution=recipe.data.resolution,
        accumulation=recipe.train.gradient_accumulation, max_grad_norm=recipe.global_clip_norm,
        ema=ema, trains_text=recipe.method.trains_text_encoders, compile_guard=guard,
        prior_loss_weight=recipe.train.prior_loss_weight if recipe.prior_preservation else None,
        full_parameters=partial(full_parameters, accelerator),
    )


# ----------------------------------------------------------------- data


@dataclass
class Data:
    loader: Any
    sampler: Any
    dataset: Any
    cached: bool
    cache_build_s: float = 0.0


def build_data(recipe, family, family_name: str, dtype, accelerator, *, log: Callable, progress: Callable) -> Data:
    """Records, transforms, the latent cache when it applies, this rank's batch sampler and
    loader; the main process writes buckets.json into the run folder.
    `progress()` returns a rich progress bar (a context manager) for the cache build."""
    from torch.utils.data import DataLoader

    from sdkit.training.samples import collate

    acc = accelerator
    dataset, sampler = plan_data(recipe, family_name, log=log, rank=acc.process_index, world_size=acc.num_processes,
                                 progress=acc.is_main_process)
    if acc.is_main_process and recipe.data.buckets:
        from sdkit.training.buckets import write_buckets_json

        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
        write_buckets_json(Path(recipe.output_dir) / "buckets.json", [r.name for r in dataset.records], dataset.placements())
        log(bucket_table(dataset, sampler))
    collate_fn, cached, build_s = collate, False, 0.0
    if recipe.data.cache:
        reason = recipe.cache_blocker()
        if reason:
            log(f"latent cache off: {reason}")
        else:
            started = time.perf_counter()
            dataset, collate_fn = _cached(recipe, family, family_name, dtype, dataset, acc, log, progress)
            cached, build_s = True, time.perf_counter() - started
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                        num_workers=recipe.data.num_workers, pin_memory=acc.device.type == "cuda",
                        persistent_workers=False)
    return Data(loader, sampler, dataset, cached, build_s)


def plan_data(recipe, family_name: str, *, log: Callable = print, rank: int = 0, world_size: int = 1,
              progress: bool = True):
    """The run's TrainDataset (records placed in their buckets) and this rank's batch sampler;
    what `train --dry-run` and `sdkit data check` report, without loading a model."""
    from sdkit.families import family_class
    from sdkit.training.batches import BucketBatchSampler
    from sdkit.training.buckets import run_buckets
    from sdkit.training.class_images import with_class_records
    from sdkit.training.data import load_records
    from sdkit.training.samples import TrainDataset

    from sdkit.training.adapters import make_adapter

    records = load_records(recipe.data, log=log, progress=progress)
    problem = make_adapter(recipe.method).caption_problem([r.caption for r in records])
    if problem:
        raise UserError(problem)
    buckets = run_buckets(recipe.data, recipe.bucket_step(family_class(family_name).bucket_step))
    records, class_sets = with_class_records(recipe, records, buckets, log=log)
    dataset = TrainDataset(records, recipe.data, seed=recipe.train.seed, buckets=buckets)
    dataset.class_sets = class_sets
    sampler = BucketBatchSampler(dataset.bucket_ids(), recipe.train.batch_size, seed=recipe.train.seed,
                                 rank=rank, world_size=world_size, repeats=[r.repeats for r in records],
                                 prior=[r.prior for r in records])
    return dataset, sampler


def bucket_report(recipe, family_name: str, processes: int = 1) -> str:
    """The dry run's bucket table (bucket, images, batches per epoch on each process)."""
    dataset, sampler = plan_data(recipe, family_name, world_size=processes, progress=False)
    return bucket_table(dataset, sampler)


def bucket_table(dataset, sampler) -> str:
    """The bucket table of a run's data: instance images and batches of each bucket, and with
    prior preservation its class images (those still to be generated included) and a summary."""
    from collections import Counter

    from sdkit.training.buckets import table
    from sdkit.training.class_images import report

    prior = [r.prior for r in dataset.records]
    placements = dataset.placements()
    instance = [p for p, is_class in zip(placements, prior) if not is_class]
    if not dataset.class_sets:
        return table(instance, bucket_batches(dataset, sampler))
    classes = Counter(p.bucket for p, is_class in zip(placements, prior) if is_class)
    classes.update(size for s in dataset.class_sets for _, size in s.todo)
    batches = bucket_batches(dataset, sampler)
    paired = sum(n * sampler.global_batch for size, n in batches.items() if classes.get(size))
    return "\n".join([*report(dataset.class_sets), table(instance, batches, classes),
                      f"samples per epoch: {sampler.samples_per_epoch()} instance + {paired} class "
                      f"(each instance sample paired with a class image of its bucket)"])


def bucket_batches(dataset, sampler) -> dict:
    """Micro-batches per epoch of each bucket size, on each rank."""
    return {dataset.buckets[b]: n for b, n in sampler.batches_in_bucket().items()}


def _cached(recipe, family, family_name, dtype, dataset, acc, log, progress):
    from sdkit.training.cache import CachedDataset, LatentCache, cache_key, collate_cached

    cache = LatentCache(Path(recipe.output_dir) / "cache" / cache_key(recipe, family_name, dtype))
    todo = len(cache.missing(dataset, acc.process_index, acc.num_processes))
    if todo:
        with progress() as bar:
            task = bar.add_task("caching latents + text", total=todo, loss="", lr="")
            cache.build(family, dataset, rank=acc.process_index, world_size=acc.num_processes,
                        on_progress=lambda done, total: bar.update(task, completed=done))
    acc.wait_for_everyone()
    pruned = cache.prune(dataset) if acc.is_main_process else 0
    log(f"latent cache: {cache.root} ({todo} encoded on this process, the rest reused"
        + (f", {pruned} stale entries removed)" if pruned else ")"))
    # Encoders are idle while training from the cache: keep them off the accelerator.
    for module in family.frozen_modules():
        module.to("cpu")
    return CachedDataset(dataset, cache), collate_cached


def move_frozen(family, device) -> None:
    for module in family.frozen_modules():
        module.to(device)


def refiner_loader(ref: Optional[str], dtype) -> Callable:
    """Loads the SDXL refiner for validation images on first use (kept on the CPU between uses)."""
    state: dict = {}

    def get():
        if not ref:
            return None
        if "pipe" not in state:
            from diffusers import DiffusionPipeline

            from sdkit.inference.sampling import dtype_kwarg

            state["pipe"] = DiffusionPipeline.from_pretrained(ref, **dtype_kwarg(dtype))
        return state["pipe"]

    return get
