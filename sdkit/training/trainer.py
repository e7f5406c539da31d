"""THE training loop: every family, full fine-tune and LoRA, one process or many.

A run folder holds recipe.yaml, checkpoints/ (accelerate state + sdkit state, rotated,
renamed into place only when complete), samples/, logs/ (TensorBoard), cache/ and, at the
end, the result: a diffusers pipeline (full) or pytorch_lora_weights.safetensors (LoRA),
plus README.md, a model card.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from sdkit.errors import UserError
from sdkit.recipe import Recipe

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "sdkit_state.json"  # written last: its presence marks a complete checkpoint


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # this rank's micro-batches consumed in the current epoch


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------- checkpoints

def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = CHECKPOINT_RE.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def find_resume_checkpoint(recipe: Recipe) -> Optional[Path]:
    ref = recipe.train.resume
    if not ref:
        return None
    if ref == "auto":
        found = list_checkpoints(Path(recipe.output_dir))
        return found[-1] if found else None
    path = Path(ref)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume: '{ref}' is not a complete sdkit checkpoint (no {STATE_FILE})")
    return path


# ----------------------------------------------------------------- set-up helpers

def make_optimizer(params, optim):
    kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - a dependency, but give a clear message
            raise UserError(f"optim.name: adamw8bit needs bitsandbytes ({e})") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    # Fused AdamW (one kernel for all parameters) runs on CUDA and, since torch 2.4, on the CPU,
    # where it is ~4x faster than the per-parameter loop. The parameters are still on the CPU
    # here (accelerate moves them in prepare), so decide by the device training will use.
    fused = not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available() and not torch.cuda.is_available())
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


class EMA:
    """Exponential moving average of the trainable weights (fp32), for full fine-tunes."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        # Warm-up so early averages are not dominated by the random start (as diffusers' EMAModel).
        decay = min(self.decay, (1 + step) / (10 + step))
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))


def _fresh_accelerator_state() -> None:
    """accelerate keeps one global state per process; a second run in the same process
    (bench --compare, tests, notebooks) may want another precision. Never reset inside a
    distributed launch, where the state holds the process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


# ----------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, recipe: Recipe, *, console=None):
        self.recipe = recipe
        self.run_dir = Path(recipe.output_dir)
        from rich.console import Console

        self.console = console or Console(stderr=True)

    # -- public entry
    def fit(self) -> Path:
        self._setup()
        try:
            self._loop()
            return self._finish()
        finally:
            self.accelerator.end_training()

    # -- set-up
    def _setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        r = self.recipe
        cuda = torch.cuda.is_available()
        if cuda and r.train.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        _fresh_accelerator_state()
        self.accelerator = acc = Accelerator(
            cpu=not cuda,
            mixed_precision=r.train.mixed_precision,
            log_with="tensorboard" if r.logging.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        self.is_main = acc.is_main_process
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(r.to_yaml())
        _seed_everything(r.train.seed)

        from sdkit.training.adapters import make_adapter
        from sdkit.families import family_class, resolve_family_name
        from sdkit.training.objectives import make_objective

        self.family_name = resolve_family_name(r.model)
        self.weight_dtype = DTYPES[r.train.mixed_precision]
        self._log(f"loading {self.family_name} model [bold]{r.model.pretrained}[/]")
        family = family_class(self.family_name).load(r.model, dtype=self.weight_dtype)
        for module in [family.denoiser, *family.frozen_modules()]:
            module.requires_grad_(False)
        if r.method.type == "full":
            family.denoiser.to(torch.float32)  # trainable weights stay fp32 under mixed precision
            if r.method.train_text_encoder:
                for enc in family.text_encoders:
                    enc.to(torch.float32)
        self.family = family
        self.adapter = make_adapter(r.method)
        modules = self.adapter.attach(family)
        if r.train.gradient_checkpointing:
            family.denoiser.enable_gradient_checkpointing()
            if r.method.train_text_encoder:
                for enc in modules[1:]:
                    enc.gradient_checkpointing_enable()
        if r.train.channels_last:
            family.denoiser.to(memory_format=torch.channels_last)
        for module in family.frozen_modules():
            module.to(acc.device)
        self.objective = make_objective(family.objective, family.scheduler_config, r.train)

        self._setup_data()
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        lr = r.optim.lr
        if r.optim.scale_lr:
            lr *= r.train.batch_size * r.train.gradient_accumulation * acc.num_processes
            r.optim.lr = lr
        optimizer = make_optimizer(params, r.optim)
        from diffusers.optimization import get_scheduler

        self.total_steps = self._total_steps()
        lr_scheduler = get_scheduler(
            r.optim.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=r.optim.warmup_steps,
            num_training_steps=self.total_steps,
        )
        if r.train.compile:
            modules[0] = torch.compile(modules[0])
        if self.adapter.checkpoints_adapters_only:
            acc.register_save_state_pre_hook(self._save_adapters_hook)
            acc.register_load_state_pre_hook(self._load_adapters_hook)
        prepared = acc.prepare(*modules, optimizer, lr_scheduler)
        self.modules = list(prepared[: len(modules)])
        self.optimizer, self.lr_scheduler = prepared[len(modules) :]
        self.params = params
        self.ema = EMA(acc.unwrap_model(self.modules[0]), r.train.ema_decay) if (r.train.ema and r.method.type == "full") else None
        # All randomness of a step (latent sampling, noise, timesteps) comes from this stream,
        # one per rank, saved in every checkpoint: resumed runs draw exactly the same numbers.
        self.noise_rng = torch.Generator().manual_seed(r.train.seed * 1000 + acc.process_index)
        self.state = Progress()
        self.loss_history: list[float] = []  # this rank's loss per optimizer step
        ckpt = find_resume_checkpoint(r)
        if ckpt is not None:
            self._load_checkpoint(ckpt)
        elif r.train.resume == "auto":
            self._log("train.resume=auto: no complete checkpoint yet, starting fresh")
        if r.logging.tensorboard:
            acc.init_trackers("sdkit", config=_flat(r.model_dump(mode="json")))

    def _setup_data(self) -> None:
        from torch.utils.data import DataLoader

        from sdkit.training.data import EpochSampler, TrainDataset, collate, load_records

        r, acc = self.recipe, self.accelerator
        records = load_records(r.data, log=self._log, progress=acc.is_main_process)
        dataset = TrainDataset(records, r.data, seed=r.train.seed)
        collate_fn = collate
        self.cached = False
        if r.data.cache:
            reason = self._cache_blocker(dataset)
            if reason:
                self._log(f"latent cache off: {reason}")
            else:
                dataset, collate_fn = self._build_cache(dataset)
                self.cached = True
        self.sampler = EpochSampler(
            len(dataset), r.train.batch_size, seed=r.train.seed, rank=acc.process_index, world_size=acc.num_processes
        )
        workers = r.data.num_workers
        self.loader = DataLoader(
            dataset,
            batch_size=r.train.batch_size,
            sampler=self.sampler,
            collate_fn=collate_fn,
            num_workers=workers,
            pin_memory=acc.device.type == "cuda",
            persistent_workers=False,
        )
        self.dataset = dataset

    def _cache_blocker(self, dataset) -> Optional[str]:
        if self.recipe.method.train_text_encoder:
            return "the text encoder is trained"
        if not dataset.is_cacheable():
            return "random crops change the pixels every epoch (data.center_crop=false)"
        return None

    def _build_cache(self, dataset):
        from sdkit.training.cache import CachedDataset, LatentCache, cache_key, collate_cached

        acc = self.accelerator
        key = cache_key(self.recipe, self.family_name, self.weight_dtype)
        cache = LatentCache(self.run_dir / "cache" / key)
        todo = len(cache.missing(dataset, acc.process_index, acc.num_processes))
        if todo:
            with self._progress_bar() as bar:
                task = bar.add_task("caching latents + text", total=todo, loss="", lr="")
                cache.build(
                    self.family, dataset, rank=acc.process_index, world_size=acc.num_processes,
                    on_progress=lambda done, total: bar.update(task, completed=done),
                )
        acc.wait_for_everyone()
        self._log(f"latent cache: {cache.root} ({todo} encoded on this process, the rest reused)")
        # Encoders are idle while training from the cache: keep them off the accelerator.
        for module in self.family.frozen_modules():
            module.to("cpu")
        return CachedDataset(dataset, cache), collate_cached

    def _total_steps(self) -> int:
        t = self.recipe.train
        if t.max_steps:
            return t.max_steps
        per_epoch = math.ceil(self.sampler.batches_per_epoch() / t.gradient_accumulation)
        return max(1, per_epoch * t.epochs)

    # -- one step
    def compute_loss(self, batch: dict) -> torch.Tensor:
        family, device = self.family, self.accelerator.device
        if "moments" in batch:
            moments = batch["moments"].to(device)
            text = {k: v.to(device) for k, v in batch["text"].items()}
        else:
            with torch.no_grad():
                moments = family.encode_images(batch["pixel_values"].to(device))
            grad = torch.enable_grad() if self.recipe.method.train_text_encoder else torch.no_grad()
            with grad:
                text = family.encode_text(batch["caption"])
        latents = family.sample_latents(moments, self.noise_rng).to(device)
        noisy = self.objective.noise(latents, self.noise_rng)
        denoiser = self.modules[0]
        dtype = torch.float32 if self.recipe.method.type == "full" else self.weight_dtype
        cond = family.conditioning(
            {k: v.to(dtype) for k, v in text.items()}, batch, self.recipe.data.resolution
        )
        pred = family.predict(denoiser, noisy.noisy.to(dtype), noisy.timesteps, cond)
        return self.objective.loss(pred, noisy)

    # -- the loop
    def _loop(self) -> None:
        r, acc, st = self.recipe, self.accelerator, self.state
        accum = r.train.gradient_accumulation
        for m in self.modules:
            m.train()
        window_loss, micro = 0.0, 0
        t_start, step_start = time.perf_counter(), st.step
        with self._progress_bar() as bar:
            task = bar.add_task("training", total=self.total_steps, completed=st.step, loss="", lr="")
            while st.step < self.total_steps:
                self.sampler.set_epoch(st.epoch, start_batch=st.batch_in_epoch)
                for batch in self.loader:
                    micro += 1
                    st.batch_in_epoch += 1
                    sync = micro == accum
                    with self._no_sync(not sync):
                        loss = self.compute_loss(batch)
                        acc.backward(loss / accum)
                    window_loss += loss.detach().float().item() / accum
                    if not sync:
                        continue
                    self.optimizer_step()
                    lr = self.lr_scheduler.get_last_lr()[0]
                    self.last_loss = window_loss
                    self.loss_history.append(window_loss)
                    bar.update(task, completed=st.step, loss=f"{window_loss:.4f}", lr=f"{lr:.2e}")
                    if st.step % r.logging.every == 0 or st.step == self.total_steps:
                        mean = acc.reduce(torch.tensor(window_loss, device=acc.device), reduction="mean").item()
                        rate = (st.step - step_start) / max(time.perf_counter() - t_start, 1e-9)
                        acc.log({"train/loss": mean, "train/lr": lr, "train/steps_per_s": rate}, step=st.step)
                    window_loss, micro = 0.0, 0
                    if st.step % r.train.checkpoint_every == 0 and st.step < self.total_steps:
                        self.save_checkpoint()
                    if r.validation.prompts and st.step % r.validation.every == 0 and st.step < self.total_steps:
                        self.validate()
                    if st.step >= self.total_steps:
                        break
                else:
                    st.epoch += 1
                    st.batch_in_epoch = 0

    def optimizer_step(self) -> None:
        """Everything after the last micro-batch's backward: clip, step, schedule, clear the
        gradients, count the step, update the EMA (`sdkit bench` times it on its own)."""
        r, acc = self.recipe, self.accelerator
        if r.optim.max_grad_norm:
            acc.clip_grad_norm_(self.params, r.optim.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        if self.ema:
            self.ema.update(acc.unwrap_model(self.modules[0]), self.state.step)

    def _no_sync(self, skip_sync: bool):
        """Gradient accumulation: no all-reduce on micro-batches that do not step."""
        stack = contextlib.ExitStack()
        if skip_sync and self.accelerator.num_processes > 1:
            for m in self.modules:
                stack.enter_context(self.accelerator.no_sync(m))
        return stack

    # -- checkpoints
    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        acc, st = self.accelerator, self.state
        root = self.run_dir / "checkpoints"
        final = root / f"checkpoint-{st.step:07d}"
        tmp = root / f".tmp-checkpoint-{st.step:07d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        rng = self.noise_rng.get_state()
        save_file({"noise_rng": rng}, str(tmp / f"sdkit_rng_{acc.process_index}.safetensors"))
        if self.is_main and self.ema:
            save_file({k: v.contiguous() for k, v in self.ema.shadow.items()}, str(tmp / "ema.safetensors"))
        acc.wait_for_everyone()
        if self.is_main:
            state = {**asdict(st), "processes": acc.num_processes, "family": self.family_name}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: resume never sees a half-written checkpoint
            for old in list_checkpoints(self.run_dir)[: -self.recipe.train.checkpoints_keep]:
                shutil.rmtree(old, ignore_errors=True)
            self._log(f"checkpoint {final}")
        acc.wait_for_everyone()
        return final

    def _save_adapters_hook(self, models, weights, output_dir) -> None:
        """accelerate save_state hook: write adapter weights instead of whole models."""
        from safetensors.torch import save_file

        if not weights:  # DeepSpeed/FSDP save their own way
            return
        for i, model in enumerate(models):
            state = self.adapter.trainable_state(self.accelerator.unwrap_model(model))
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, f"{output_dir}/adapters_{i}.safetensors")
        weights.clear()

    def _load_adapters_hook(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            state = load_file(f"{input_dir}/adapters_{i}.safetensors")
            self.adapter.load_trainable_state(self.accelerator.unwrap_model(model), state)
        models.clear()

    def _load_checkpoint(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        acc = self.accelerator
        saved = json.loads((ckpt / STATE_FILE).read_text())
        if saved.get("processes", acc.num_processes) != acc.num_processes:
            raise UserError(
                f"train.resume: {ckpt} was written by {saved['processes']} processes, this run has "
                f"{acc.num_processes}; resume with the same accelerate config"
            )
        acc.load_state(str(ckpt))
        self.noise_rng.set_state(load_file(str(ckpt / f"sdkit_rng_{acc.process_index}.safetensors"))["noise_rng"])
        if self.ema and (ckpt / "ema.safetensors").is_file():
            self.ema.shadow = load_file(str(ckpt / "ema.safetensors"))
        self.state = Progress(step=saved["step"], epoch=saved["epoch"], batch_in_epoch=saved["batch_in_epoch"])
        self._log(f"resumed from {ckpt} at step {self.state.step}")

    # -- validation images
    def validate(self) -> list[Path]:
        acc = self.accelerator
        paths: list[Path] = []
        if self.is_main:
            from sdkit.inference.sampling import make_images

            v = self.recipe.validation
            denoiser = acc.unwrap_model(self.modules[0])
            moved = [m for m in self.family.frozen_modules() if m.device != acc.device]
            for m in moved:
                m.to(acc.device)
            was_training = denoiser.training
            denoiser.eval()
            pipe = self.family.pipeline(**{self.family.denoiser_attr: denoiser})
            out = self.run_dir / "samples" / f"step-{self.state.step:07d}"
            out.mkdir(parents=True, exist_ok=True)
            res = self.recipe.data.resolution
            refiner = self._refiner()
            if refiner is not None:
                refiner.to(acc.device)
            with torch.no_grad(), acc.autocast():
                for i, prompt in enumerate(v.prompts):
                    images = make_images(
                        pipe, prompt, negative_prompt=v.negative_prompt, steps=v.steps, guidance=v.guidance,
                        seed=v.seed, num_images=v.num_images, width=res, height=res, refiner=refiner,
                    )
                    for k, image in enumerate(images):
                        path = out / f"{i:02d}-{k}.png"
                        image.save(path)
                        paths.append(path)
            for m in moved:
                m.to("cpu")
            if refiner is not None:
                refiner.to("cpu")
            denoiser.train(was_training)
            self._log(f"samples {out}")
        acc.wait_for_everyone()
        return paths

    def _refiner(self):
        """The SDXL refiner for validation images (model.refiner), loaded on first use."""
        ref = self.recipe.model.refiner
        if not ref:
            return None
        if getattr(self, "_refiner_pipe", None) is None:
            from diffusers import DiffusionPipeline

            from sdkit.inference.sampling import dtype_kwarg

            # Kept on the CPU between validations: it must not cost training memory.
            self._refiner_pipe = DiffusionPipeline.from_pretrained(ref, **dtype_kwarg(self.weight_dtype))
        return self._refiner_pipe

    # -- the end
    def _finish(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.recipe.validation.prompts:
            self.validate()
        if self.is_main:
            modules = [acc.unwrap_model(m) for m in self.modules]
            modules = [getattr(m, "_orig_mod", m) for m in modules]  # undo torch.compile
            if self.ema:
                self.ema.copy_to(modules[0])
            written = self.adapter.save(self.family, modules, self.run_dir)
            from sdkit.training.model_card import write_model_card

            write_model_card(self.recipe, self.run_dir, family=self.family_name, steps=self.state.step,
                             final_loss=getattr(self, "last_loss", None))
            for path in written:
                self._log(f"wrote {path}")
        acc.wait_for_everyone()
        return self.run_dir

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The denoiser's trainable weights (full: all; LoRA: the adapters), on CPU."""
        module = self.accelerator.unwrap_model(self.modules[0])
        return {k: v.detach().cpu().clone() for k, v in self.adapter.trainable_state(module).items()}

    # -- output
    def _log(self, msg: str) -> None:
        if getattr(self, "accelerator", None) is None or self.accelerator.is_main_process:
            self.console.print(msg)

    def _progress_bar(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _SpeedColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}"),
            console=self.console,
            disable=not self.accelerator.is_main_process,
        )


def _rate_column_class():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} it/s" if task.speed else "-- it/s")

    return SpeedColumn


def _SpeedColumn():
    return _rate_column_class()()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out


def train(recipe: Recipe) -> Path:
    return Trainer(recipe).fit()
