"""The reference baseline of `sdkit bench --baseline`: a plain training step written the way
diffusers' train_text_to_image.py (and its LoRA twin) writes it, on the recipe's model folder and
the same samples. It is the other side of "is sdkit slower than the reference script?", so it is
kept apart from sdkit's own step on purpose and copies none of sdkit's rules; SD 1.x/2.x only,
since that is what the reference script trains.
"""

from __future__ import annotations

import time

from sdkit.errors import UserError

PLAIN_LABEL = "plain diffusers loop"


def check_plain_loop_supported(recipe) -> None:
    from sdkit.families import family_class, resolve_family_name

    name = resolve_family_name(recipe.model)
    family = family_class(name)
    # What the reference script trains: one CLIP text encoder, a UNet, DDPM noise.
    if family.objective != "ddpm" or family.all_text_encoder_attrs != ("text_encoder",) or family.denoiser_attr != "unet":
        raise UserError(f"bench --baseline: the plain diffusers loop covers SD 1.x/2.x models, not {name}")


class PlainLoopRunner:
    """UNet + VAE + CLIP text encoder + DDPMScheduler + AdamW, no caching: the step as
    diffusers' train_text_to_image.py (and its LoRA twin) writes it, over the recipe's model
    folder and the same samples. SD 1.x/2.x only: that is what the reference script trains."""

    def __init__(self, recipe, label: str = PLAIN_LABEL):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        check_plain_loop_supported(recipe)
        self.label = label
        self.cache_build_s = 0.0
        start = time.perf_counter()
        r = recipe
        self.recipe = r
        from sdkit.training.build import run_precision

        # The precision the trainer runs with (fp16 trains in fp32 without CUDA), so both loops compare alike.
        precision, _ = run_precision(r.train.mixed_precision, torch.cuda.is_available())
        self.acc = acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
        set_seed(r.train.seed)
        path, revision = r.model.pretrained, r.model.revision
        self.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision)
        if r.model.vae:
            self.vae = AutoencoderKL.from_pretrained(r.model.vae)
        else:
            self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self.weight_dtype = weight_dtype
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        if r.method.type == "lora":  # the reference scripts are one per method
            _add_lora(unet, r, acc.device, weight_dtype)
        if r.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.vae.to(acc.device, dtype=weight_dtype)
        self.text_encoder.to(acc.device, dtype=weight_dtype)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        o = r.optim
        optimizer = torch.optim.AdamW(
            self.params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps
        )
        loader = self._loader()
        lr_scheduler = get_scheduler(
            o.lr_scheduler, optimizer=optimizer, num_warmup_steps=o.warmup_steps,
            num_training_steps=r.train.max_steps,
        )
        self.unet, self.optimizer, self.loader, self.lr_scheduler = acc.prepare(unet, optimizer, loader, lr_scheduler)
        self.unet.train()
        self.accum = r.train.gradient_accumulation
        self.samples_per_step = r.train.batch_size * self.accum
        self.batches = self._batches()
        self.setup_s = time.perf_counter() - start

    def _loader(self):
        import torch

        from sdkit.training.data import load_records  # the same samples
        from sdkit.training.samples import TrainDataset

        r = self.recipe
        records = load_records(r.data, log=lambda _msg: None, progress=False)
        dataset = TrainDataset(records, r.data, seed=r.train.seed)
        tokenizer = self.tokenizer

        def collate(items):  # the reference script tokenizes in its data pipeline
            return {
                "pixel_values": torch.stack([it["pixel_values"] for it in items]),
                "input_ids": tokenizer(
                    [it["caption"] for it in items], max_length=tokenizer.model_max_length,
                    padding="max_length", truncation=True, return_tensors="pt",
                ).input_ids,
            }

        return torch.utils.data.DataLoader(
            dataset, shuffle=True, collate_fn=collate, batch_size=r.train.batch_size,
            num_workers=r.data.num_workers,
        )

    def _batches(self):
        while True:
            yield from self.loader

    def step(self, timer) -> float:
        import torch
        import torch.nn.functional as F

        acc = self.acc
        for _ in range(self.accum):
            with timer.phase("data"):
                batch = next(self.batches)
            with timer.phase("forward"):
                with timer.phase("encoders"), torch.no_grad():
                    latents = self.vae.encode(batch["pixel_values"].to(self.weight_dtype)).latent_dist.sample()
                    latents = latents * self.vae.config.scaling_factor
                    encoder_hidden_states = self.text_encoder(batch["input_ids"], return_dict=False)[0]
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                steps = self.noise_scheduler.config.num_train_timesteps
                timesteps = torch.randint(0, steps, (bsz,), device=latents.device).long()
                noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
                if self.noise_scheduler.config.prediction_type == "v_prediction":
                    target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            with timer.phase("backward"):
                acc.backward(loss / self.accum)
        with timer.phase("optimizer"):
            if self.recipe.optim.max_grad_norm:
                acc.clip_grad_norm_(self.params, self.recipe.optim.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float().item()

    def close(self) -> None:
        self.acc.free_memory()
        self.unet = self.vae = self.text_encoder = self.optimizer = self.batches = None


def _add_lora(unet, r, device, weight_dtype) -> None:
    """As train_text_to_image_lora.py: a frozen base in the weight dtype, fp32 adapters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    unet.add_adapter(LoraConfig(
        r=r.method.rank, lora_alpha=r.lora_alpha, lora_dropout=r.method.dropout,
        init_lora_weights="gaussian",
        target_modules=r.method.target_modules or ["to_k", "to_q", "to_v", "to_out.0"],  # the script's default
    ))
    for p in unet.parameters():  # as diffusers' cast_training_params: adapters in fp32
        if p.requires_grad:
            p.data = p.data.float()
