"""Training objectives: what noise is added and what the denoiser must predict.

`DDPMObjective` (SD 1.x/2.x, SDXL): epsilon or v-prediction, min-SNR weighting, noise offset.
`FlowMatchingObjective` (SD3): rectified flow with SD3's timestep sampling and loss weighting.
Both draw every random number from the generator they are given, so a resumed run
continues the exact same stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NoisyBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor  # per-sample loss weights


def _randn(shape, generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


class _WeightedMSE:
    """The loss both objectives share: the per-sample weighted MSE between prediction and target.

    With DreamBooth prior preservation a micro-batch holds instance and class samples (`prior`
    marks the class ones); the loss is the instance loss plus `prior_weight` x the prior loss,
    each the weighted mean over its own samples, as diffusers' train_dreambooth_lora*.py
    computes it (there the instance half comes first; here any order works). The per-sample
    weights (min-SNR, SD3's weighting) apply to both, as in diffusers' SD3 script."""

    def loss(self, pred: torch.Tensor, batch: NoisyBatch, prior=None, prior_weight: float = 1.0) -> torch.Tensor:
        return combine(self.loss_terms(pred, batch, prior), prior_weight)

    def loss_terms(self, pred: torch.Tensor, batch: NoisyBatch, prior=None) -> dict[str, torch.Tensor]:
        """{"instance": ..., "prior": ...} (prior only when `prior` is given; 0 for a batch without class samples)."""
        per_sample = F.mse_loss(pred.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
        weighted = per_sample * batch.weights
        if prior is None:
            return {"instance": weighted.mean()}
        prior = prior.to(weighted.device, torch.bool)
        return {"instance": _masked_mean(weighted, ~prior), "prior": _masked_mean(weighted, prior)}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # a sum over no samples is 0 (a bucket without class images): no NaN in the loss
    return (values * mask).sum() / mask.sum().clamp(min=1)


def combine(terms: dict[str, torch.Tensor], prior_weight: float) -> torch.Tensor:
    """The training loss from its terms: instance + prior_weight x prior."""
    if "prior" not in terms:
        return terms["instance"]
    return terms["instance"] + prior_weight * terms["prior"]


class DDPMObjective(_WeightedMSE):
    def __init__(self, scheduler_config: dict, train_cfg):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        configured = self.scheduler.config.prediction_type
        self.prediction_type = configured if train_cfg.prediction_type == "auto" else train_cfg.prediction_type
        self.snr_gamma = train_cfg.snr_gamma
        self.noise_offset = train_cfg.noise_offset
        alphas = self.scheduler.alphas_cumprod.float()
        self._snr = alphas / (1.0 - alphas)

    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        b = latents.shape[0]
        noise = _randn(latents.shape, generator, latents)
        if self.noise_offset:
            # One offset per image and channel teaches the model to move mean brightness.
            noise = noise + self.noise_offset * _randn((b, latents.shape[1], 1, 1), generator, latents)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=generator).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        return NoisyBatch(noisy, t, target, self._weights(t).to(latents.device))

    def _weights(self, t: torch.Tensor) -> torch.Tensor:
        if not self.snr_gamma:
            return torch.ones(t.shape[0])
        # Min-SNR-gamma (Hang et al. 2023): cap the weight of easy, low-noise steps.
        snr = self._snr[t.cpu()]
        clipped = torch.clamp(snr, max=self.snr_gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1.0)
        return clipped / snr



class FlowMatchingObjective(_WeightedMSE):
    """x_t = (1 - s) x_0 + s * noise; the model predicts noise - x_0 (SD3)."""

    def __init__(self, scheduler_config: dict, train_cfg):
        self.num_train_timesteps = scheduler_config.get("num_train_timesteps", 1000)
        self.shift = scheduler_config.get("shift", 1.0)
        self.sampling = train_cfg.timestep_sampling
        self.logit_mean = train_cfg.logit_mean
        self.logit_std = train_cfg.logit_std
        self.mode_scale = train_cfg.mode_scale
        self.weighting = train_cfg.loss_weighting

    def _draw_u(self, b: int, generator) -> torch.Tensor:
        if self.sampling == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(b, generator=generator))
        u = torch.rand(b, generator=generator)
        if self.sampling == "mode":
            return 1.0 - u - self.mode_scale * (torch.cos(torch.pi * u / 2) ** 2 - 1.0 + u)
        return u

    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        b = latents.shape[0]
        noise = _randn(latents.shape, generator, latents)
        u = self._draw_u(b, generator).clamp(0.0, 1.0)
        # The scheduler's shift moves sigmas toward noise, as the SD3 sampler does at inference.
        sigma = self.shift * u / (1.0 + (self.shift - 1.0) * u)
        timesteps = (sigma * self.num_train_timesteps).to(latents.device)
        s = sigma.view(b, 1, 1, 1).to(latents.device, latents.dtype)
        noisy = (1.0 - s) * latents + s * noise
        return NoisyBatch(noisy, timesteps, noise - latents, self._weights(sigma).to(latents.device))

    def _weights(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.weighting == "sigma_sqrt":
            return (sigma**-2.0).clamp(max=1e4)
        if self.weighting == "cosmap":
            bot = 1 - 2 * sigma + 2 * sigma**2
            return 2 / (torch.pi * bot)
        return torch.ones_like(sigma)



def make_objective(kind: str, scheduler_config: dict, train_cfg):
    return {"ddpm": DDPMObjective, "flow": FlowMatchingObjective}[kind](scheduler_config, train_cfg)
