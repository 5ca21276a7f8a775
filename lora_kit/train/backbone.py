"""What the training loop needs from a base pipeline, per architecture: latents, text conditioning, prediction.

SD1/SD2 condition on one CLIP's hidden states (`clip_skip` 2 = the penultimate layer, as kohya); SDXL concatenates
both CLIPs' penultimate hidden states and adds the pooled embedding and size/crop ids. The noise schedule comes
from the pipeline's own scheduler config (epsilon or v-prediction).
"""

from __future__ import annotations

import torch

from ..errors import LoraKitError
from ..models import architecture
from ..state import components


class Backbone:
    def __init__(self, pipe, clip_skip: int = 1):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.arch = architecture(components(pipe))
        if self.arch not in ("sd1", "sd2", "sdxl"):
            raise LoraKitError(f"training {self.arch} is not supported yet (SD1.x, SD2.x and SDXL train)")
        self.main = pipe.unet
        self.clip_skip = clip_skip
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas_cumprod = self.noise.alphas_cumprod.float()
        self.num_timesteps = self.noise.config.num_train_timesteps
        self.prediction_type = self.noise.config.prediction_type
        self.encoders = [(pipe.tokenizer, pipe.text_encoder)]
        if self.arch == "sdxl":
            self.encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))

    @property
    def size_step(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
        return self.pipe.vae_scale_factor * 2 ** (len(self.main.config.block_out_channels) - 1)

    @torch.no_grad()
    def latent_dist(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the scaled VAE latent distribution; training samples from it every step."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        sf = vae.config.scaling_factor
        return (dist.mean.float() * sf).cpu(), (dist.std.float() * sf).cpu()

    def _tokens(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids  # fmt: skip

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors for a batch of captions (with gradients when a text encoder trains)."""
        if self.arch != "sdxl":
            tokenizer, te = self.encoders[0]
            ids = self._tokens(tokenizer, captions).to(te.device)
            if self.clip_skip == 1:
                return {"encoder_hidden_states": te(ids).last_hidden_state}
            hidden = te(ids, output_hidden_states=True).hidden_states[-self.clip_skip]
            norm = getattr(te, "text_model", te).final_layer_norm
            return {"encoder_hidden_states": norm(hidden)}
        states, pooled = [], None
        for tokenizer, te in self.encoders:
            out = te(self._tokens(tokenizer, captions).to(te.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, size: tuple[int, int]):
        kwargs = {}
        if self.arch == "sdxl":  # size conditioning: original = target = the bucket, no crop
            w, h = size
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=noisy.dtype).repeat(noisy.shape[0], 1)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": ids}
        return self.main(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False,
                         **kwargs)[0]  # fmt: skip
