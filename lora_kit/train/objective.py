"""The training objective as pure functions: noising, prediction targets, Min-SNR weights, masks, prior loss.

Diffusion (SD1/SD2/SDXL): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; the target is eps ("epsilon") or
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v_prediction"). Flow matching (SD3/FLUX): x_t = (1 - s) x_0 + s eps
with the target eps - x_0 (the velocity), sigma s drawn logit-normal and shifted as the model's scheduler shifts it;
the model sees the timestep s * num_train_timesteps. Min-SNR weights belong to diffusion only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    abar = alphas_cumprod[timesteps]
    return _expand(abar.sqrt(), x0) * x0 + _expand((1 - abar).sqrt(), x0) * noise


def target(x0, noise, timesteps, alphas_cumprod, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        abar = alphas_cumprod[timesteps]
        return _expand(abar.sqrt(), x0) * noise - _expand((1 - abar).sqrt(), x0) * x0
    raise ValueError(f"prediction type {prediction_type!r} is not supported for training")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    abar = alphas_cumprod[timesteps].double()
    return (abar / (1 - abar)).float()


def min_snr_weight(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(snr, gamma) / snr for epsilon prediction,
    min(snr, gamma) / (snr + 1) for v-prediction."""
    clipped = torch.minimum(snr_values, torch.full_like(snr_values, gamma))
    return clipped / (snr_values + 1 if prediction_type == "v_prediction" else snr_values)


def flow_sigmas(n: int, generator: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    """n flow-matching sigmas: logit-normal(0, 1), i.e. sigmoid of a standard normal (SD3 paper section 3.1,
    "rf/lognorm(0.00, 1.00)"; diffusers' SD3 trainer default, kohya's FLUX "sigmoid" sampling), then the scheduler's
    static shift s' = shift * s / (1 + (shift - 1) * s) (SD3: 3.0; 1.0 leaves s unchanged). Continuous, not
    snapped to the scheduler's 1000 discrete sigmas. Drawn from `generator` only, so a sample's sigma is a function
    of its seed keys (exact resume, disjoint processes)."""
    s = torch.sigmoid(torch.randn(n, generator=generator))
    if shift != 1.0:
        s = shift * s / (1 + (shift - 1) * s)
    return s


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = _expand(sigmas, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target: the velocity d x_t / d s = noise - x0."""
    return noise - x0


def mask_weights(masks: list[torch.Tensor | None], shape: tuple[int, ...], floor: float) -> torch.Tensor | None:
    """Per-latent-pixel loss weights floor + (1 - floor) * mask, the mask downsampled by area averaging;
    None when no sample has a mask."""
    if all(m is None for m in masks):
        return None
    b, _, h, w = shape
    out = torch.ones(b, 1, h, w)
    for i, m in enumerate(masks):
        if m is not None:
            small = F.adaptive_avg_pool2d(m[None, None].float(), (h, w))[0]
            out[i] = floor + (1 - floor) * small
    return out


def per_sample_mse(pred: torch.Tensor, tgt: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (fp32), optionally weighted per pixel (weights normalised to their mean)."""
    err = (pred.float() - tgt.float()).square()
    if weights is not None:
        w = weights.to(err.device).expand_as(err)
        return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    return err.flatten(1).mean(1)


def combine(per_sample: torch.Tensor, is_prior: torch.Tensor, prior_weight: float) -> torch.Tensor:
    """DreamBooth prior preservation: mean instance loss + prior_weight * mean class loss."""
    instance = per_sample[~is_prior]
    loss = instance.mean() if instance.numel() else per_sample.new_zeros(())
    if is_prior.any():
        loss = loss + prior_weight * per_sample[is_prior].mean()
    return loss
