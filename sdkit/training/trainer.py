"""THE training loop: every family, full fine-tune and LoRA, one process or many.

`setup()` asks the builders (sdkit.training.build) for the parts of the run; `loop()` calls the
one `TrainStep` (sdkit.training.step) until the run is done, with logging, checkpoints and
validation images around it; `finish()` writes the result. `fit()` does all three.

A run folder (sdkit.training.run_folder: marked, checked, locked) holds recipe.yaml, train.log,
checkpoints/ (see sdkit.training.checkpoints), samples/, logs/ (TensorBoard), cache/ and, at the
end, the result: a diffusers pipeline (full) or pytorch_lora_weights.safetensors (LoRA), plus
README.md, a model card.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

from sdkit.errors import UserError
from sdkit.recipe import Recipe
from sdkit.training import build, distributed, trackers
from sdkit.training.checkpoints import (  # noqa: F401  (find_resume_checkpoint: public here too)
    Checkpointer, Progress, check_shape, find_resume_checkpoint, read_state, run_shape,
)
from sdkit.training.console import flat, progress_bar
from sdkit.training.optim_packages import averaged_weights, train_mode
from sdkit.training.run_folder import MARKER, acquire_run_lock, check_output_dir, mark_run_folder, release_run_lock

LOG_FILE = "train.log"  # the run's text log: what the console showed, and tracebacks of failed validations


def fresh_accelerator_state() -> None:
    """accelerate keeps one global state per process; a second run in the same process
    (bench --compare, tests, notebooks) may want another precision. Never reset inside a
    distributed launch, where the state holds the process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


class Trainer:
    def __init__(self, recipe: Recipe, *, console=None):
        self.recipe = recipe
        self.run_dir = Path(recipe.output_dir)
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.accelerator = None
        self.loss_history: list[float] = []  # this rank's loss per optimizer step
        self.last_loss = None
        # the last logged means over all ranks: loss, and with class images loss_instance, loss_prior
        self.logged: dict[str, float] = {}

    def fit(self) -> Path:
        try:
            self.setup()
            self.loop()
            return self.finish()
        finally:
            self.close()

    def close(self) -> None:
        """End the trackers and unlock the run folder (also done at exit)."""
        if self.accelerator is not None:
            self.accelerator.end_training()
        release_run_lock(self.run_dir)

    # -- set-up
    def setup(self) -> None:
        """Build every part of the run and resume from a checkpoint when the recipe says so.
        Everything a person can get wrong is checked before the weights load."""
        import torch
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        from sdkit.families import family_class, resolve_family_name
        from sdkit.training.adapters import make_adapter

        r = self.recipe
        check_output_dir(r)  # before anything is written: never into the data, the model or your files
        cuda = torch.cuda.is_available()
        if cuda and r.train.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        fresh_accelerator_state()
        self.precision, precision_note = build.run_precision(r.train.mixed_precision, cuda)
        self.accelerator = acc = Accelerator(
            cpu=not cuda, mixed_precision=self.precision,
            log_with=trackers.tracker_names(r.logging) or None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            **distributed.accelerator_kwargs(r),
        )
        if acc.is_main_process:  # before reading checkpoints another run might be rotating
            acquire_run_lock(self.run_dir, warn=self.log)
        distributed.configure(acc, r)
        self.family_name = resolve_family_name(r.model)
        problems = family_class(self.family_name).check_recipe(r)
        if problems:
            raise UserError("\n".join(problems))
        self.adapter = make_adapter(r.method)
        self.shape = run_shape(r, self.family_name, self.adapter, family_class(self.family_name), acc.num_processes)
        resume = find_resume_checkpoint(r, warn=self.log)  # damaged newest: named, the previous one used
        if resume is not None:  # a changed rank or batch fails here, not as a tensor-shape traceback
            check_shape(resume, read_state(resume), self.shape)
        if acc.is_main_process:
            mark_run_folder(self.run_dir)
            (self.run_dir / "recipe.yaml").write_text(r.to_yaml())
        if precision_note:
            self.log(f"[yellow]{precision_note}[/]")
        distributed.check_shared_output_dir(acc, self.run_dir)
        set_seed(r.train.seed)
        self._build(resume)
        trackers.start(acc, r, self.run_dir, flat(r.model_dump(mode="json")))

    def _build(self, resume) -> None:
        r, acc = self.recipe, self.accelerator
        self.weight_dtype = dtype = build.weight_dtype(self.precision)
        self.log(f"loading {self.family_name} model [bold]{r.model.pretrained}[/]")
        self.family = build.load_family(r, self.family_name, dtype)
        if r.prior_preservation:  # with the base model's weights: before the adapter attaches
            from sdkit.training.class_images import prepare_class_images

            prepare_class_images(r, self.family, self.family_name, acc, log=self.log)
        modules = build.prepare_modules(self.family, self.adapter, r)
        build.move_frozen(self.family, acc.device)
        self.data = build.build_data(r, self.family, self.family_name, dtype, acc, log=self.log,
                                     progress=lambda: progress_bar(self.console, acc.is_main_process))
        self.total_steps = build.total_steps(r, self.data.sampler.batches_per_epoch())
        self.step = build.build_step(r, self.family, self.adapter, modules, acc, dtype=dtype, steps=self.total_steps)
        self.refiner = build.refiner_loader(r.model.refiner, dtype)
        self.checkpointer = Checkpointer(self.run_dir, acc, self.adapter, r.train.checkpoints_keep, self.log)
        self.state = Progress()
        if resume is not None:
            self.state = self.checkpointer.load(resume, self.shape, self.step)
        elif r.train.resume == "auto":
            self.log("train.resume=auto: no complete checkpoint yet, starting fresh")

    # -- the loop
    def batches(self) -> Iterator[dict]:
        """This rank's micro-batches across epochs, from where the run stands (resume mid-epoch)."""
        st = self.state
        while True:
            self.data.sampler.set_epoch(st.epoch, start_batch=st.batch_in_epoch)
            for batch in self.data.loader:
                st.batch_in_epoch += 1
                yield batch
            st.epoch += 1
            st.batch_in_epoch = 0

    def loop(self) -> None:
        r, st = self.recipe, self.state
        self.step.model.train()
        train_mode(self.step.optimizer)
        pending = []  # losses (device tensors) since the last log: read back only at the log interval
        started, first_step = time.perf_counter(), st.step
        batches = self.batches()
        with progress_bar(self.console, self.accelerator.is_main_process) as bar:
            task = bar.add_task("training", total=self.total_steps, completed=st.step, loss="", lr="")
            while st.step < self.total_steps:
                pending.append({"loss": self.step(batches, st.step + 1), **self.step.terms})
                st.step += 1
                if st.step % r.logging.every == 0 or st.step == self.total_steps:
                    self._log_window(pending, bar, task, (st.step - first_step) / max(time.perf_counter() - started, 1e-9))
                    pending = []
                else:
                    bar.update(task, completed=st.step)
                if st.step < self.total_steps:
                    if st.step % r.train.checkpoint_every == 0:
                        self.save_checkpoint()
                    if r.validation.prompts and st.step % r.validation.every == 0:
                        self.validate()

    def _log_window(self, pending: list, bar, task, rate: float) -> None:
        import torch

        acc = self.accelerator
        losses = torch.stack([p["loss"] for p in pending]).float()
        self.loss_history += losses.cpu().tolist()
        self.last_loss = self.loss_history[-1]
        lr = self.step.lr_scheduler.get_last_lr()[0]
        bar.update(task, completed=self.state.step, loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}")
        # the loss, and with class images its terms (train/loss_instance, train/loss_prior)
        keys = list(pending[0])
        means = torch.stack([torch.stack([p[k] for p in pending]).float().mean() for k in keys])
        means = acc.reduce(means.to(acc.device), reduction="mean").cpu().tolist()
        self.logged = {("loss" if k == "loss" else f"loss_{k}"): v for k, v in zip(keys, means)}
        scalars = {**{f"train/{k}": v for k, v in self.logged.items()}, "train/lr": lr, "train/steps_per_s": rate}
        if self.step.grad_norm is not None:  # the last step's, before clipping (none with a fused backward)
            scalars["train/grad_norm"] = float(self.step.grad_norm)
        acc.log(scalars, step=self.state.step)

    def save_checkpoint(self) -> Path:
        with averaged_weights(self.step.optimizer):  # both runs of a resume switch alike: exact
            return self.checkpointer.save(self.state, self.shape, self.step)

    # -- validation images
    def validate(self) -> list[Path]:
        """Sample the validation prompts. Every rank makes the images (a sharded denoiser's forward
        needs all of them; the seeds make them identical); the main process writes them. A failure
        is logged with its traceback in the run's log (train.log) and training goes on: images are
        a view of the run, never a reason to lose it."""
        acc = self.accelerator
        paths: list[Path] = []
        try:
            with averaged_weights(self.step.optimizer):
                paths = self._sample_images()
        except Exception as e:
            import traceback

            from sdkit.errors import first_line, shorten

            if acc.is_main_process:
                self._append_log(traceback.format_exc())
            self.log(f"[red]validation at step {self.state.step} failed[/] ({type(e).__name__}: "
                     f"{shorten(first_line(e))}); training goes on, traceback in {self.run_dir / LOG_FILE}")
        acc.wait_for_everyone()
        return paths if acc.is_main_process else []

    def _sample_images(self) -> list[Path]:
        import torch

        from sdkit.inference.sampling import make_images

        acc, v, family = self.accelerator, self.recipe.validation, self.family
        denoiser = distributed.forward_module(acc, self.step.model)
        moved = [m for m in family.frozen_modules() if m.device != acc.device]
        build.move_frozen(family, acc.device)
        was_training = denoiser.training
        denoiser.eval()
        refiner, paths, logged = None, [], []
        try:
            pipe = family.pipeline(**{family.denoiser_attr: denoiser})
            out = self.run_dir / "samples" / f"step-{self.state.step:07d}"
            if acc.is_main_process:
                out.mkdir(parents=True, exist_ok=True)
            res, refiner = self.recipe.data.resolution, self.refiner()
            if refiner is not None:
                refiner.to(acc.device)
            with torch.no_grad(), acc.autocast():
                for i, prompt in enumerate(v.prompts):
                    images = make_images(pipe, prompt, negative_prompt=v.negative_prompt, steps=v.steps,
                                         guidance=v.guidance, seed=v.seed, num_images=v.num_images, width=res,
                                         height=res, refiner=refiner)
                    for k, image in enumerate(images):
                        paths.append(out / f"{i:02d}-{k}.png")
                        logged.append((prompt, image))
                        if acc.is_main_process:
                            image.save(paths[-1])
        finally:  # also after a failure: training goes on as before
            for m in moved:  # the cache keeps idle encoders (and the refiner) off the accelerator
                m.to("cpu")
            if refiner is not None:
                refiner.to("cpu")
            denoiser.train(was_training)
        trackers.log_images(acc, self.recipe, self.state.step, logged)
        self.log(f"samples {out}")
        return paths

    # -- the end
    def finish(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        with averaged_weights(self.step.optimizer):  # schedule-free: its averaged weights are the result
            modules = distributed.gathered_modules(acc, self.step.model, self.step.ema)  # every rank gathers
            if acc.is_main_process:  # the result first: a failing final validation cannot lose it
                written = self.adapter.save(self.family, modules, self.run_dir)
        if acc.is_main_process:
            from sdkit.training.model_card import write_model_card

            write_model_card(self.recipe, self.run_dir, family=self.family_name, steps=self.state.step,
                             final_loss=self.last_loss, lr=self.recipe.learning_rate(acc.num_processes),
                             adapter=self.adapter, precision=self.precision)
            for path in written:
                self.log(f"wrote {path}")
        acc.wait_for_everyone()
        if self.recipe.validation.prompts:
            self.validate()
        return self.run_dir

    def trainable_state(self) -> dict:
        """The trained weights (full: all; LoRA: the adapters; textual inversion: the new rows), on
        CPU: the denoiser's as they are named, each text encoder's behind `module{I}.`."""
        out = {}
        for i, module in enumerate(self.step.modules):
            state = self.adapter.trainable_state(self.accelerator.unwrap_model(module))
            out.update({(f"module{i}." if i else "") + k: v.detach().cpu().clone() for k, v in state.items()})
        return out

    def log(self, msg: str) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            self.console.print(msg)
            from rich.text import Text

            self._append_log(Text.from_markup(msg).plain + "\n")

    def _append_log(self, text: str) -> None:
        """The run's own text log, RUN/train.log (once the run folder is sdkit's)."""
        if (self.run_dir / MARKER).is_file():
            with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}")


def train(recipe: Recipe) -> Path:
    return Trainer(recipe).fit()
