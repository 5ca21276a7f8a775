"""What the training loop needs from a base pipeline, per architecture: latents, text conditioning, prediction, and
how a batch is noised (the objective).

SD1/SD2 condition on one CLIP's hidden states (`clip_skip` 2 = the penultimate layer, as kohya); SDXL concatenates
both CLIPs' penultimate hidden states and adds the pooled embedding and size/crop ids. Their noise schedule comes
from the pipeline's own scheduler config (epsilon or v-prediction).

SD3 and FLUX train with flow matching (objective.py) and condition through the pipeline's own `encode_prompt`: SD3
on its two CLIPs' penultimate states next to T5's, plus both pooled embeddings; FLUX on T5's states plus CLIP's
pooled embedding. Their latents are `(latent - shift_factor) * scaling_factor`; FLUX's transformer sees them packed
into 2x2 patches with FluxPipeline's image ids, and `predict` unpacks its output, so the loss, masks and noise all
live in the VAE's (B, C, H, W) layout for every architecture.
"""

from __future__ import annotations

import torch

from ..models import architecture
from ..state import components
from . import objective
from .config import ConfigError

FLOW = ("sd3", "flux")  # the architectures trained with flow matching
# T5 tokens of the prompt, as the diffusers trainers use them (train_dreambooth_lora_sd3: 77, _flux: 512); capped
# at the tokenizer's own limit
T5_TOKENS = {"sd3": 77, "flux": 512}
FLUX_GUIDANCE = 3.5  # distilled guidance of guidance-embedding FLUX models (FLUX.1-dev) while training, as in
# diffusers' and kohya's FLUX trainers
# --compile: the repeated blocks compiled in place (diffusers' regional compilation, compile_repeated_blocks): a
# UNet's transformer blocks and resnets, SD3's joint blocks, FLUX's double and single blocks. Identical blocks share
# one graph, so the first step stays short. COMPILE_OPTIONS go to torch.compile (tests use backend "aot_eager").
# --offload-blocks streams the largest of the same blocks (offload_blocks.py).
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "JointTransformerBlock", "FluxTransformerBlock",
                   "FluxSingleTransformerBlock")  # fmt: skip
COMPILE_OPTIONS: dict = {}


class Backbone:
    def __init__(self, pipe, clip_skip: int = 1):
        self.pipe = pipe
        self.arch = architecture(components(pipe))
        self.clip_skip = clip_skip
        if self.arch in FLOW:
            self._init_flow()
            return
        from diffusers import DDPMScheduler

        self.objective = "diffusion"
        self.main = pipe.unet
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas_cumprod = self.noise.alphas_cumprod.float()
        self.num_timesteps = self.noise.config.num_train_timesteps
        self.prediction_type = self.noise.config.prediction_type
        self.encoders = [(pipe.tokenizer, pipe.text_encoder)]
        if self.arch == "sdxl":
            self.encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
        self._check_clip_skip()

    def _check_clip_skip(self) -> None:
        """clip_skip against the text encoder it skips layers of, as soon as the model is known (before training:
        hidden_states[-clip_skip] would fail at the first step)."""
        if self.clip_skip == 1:
            return
        if self.arch == "sdxl":  # as sd-scripts: SDXL was trained on both CLIPs' penultimate layers, always
            why = "it does not apply to sdxl: it conditions on both CLIPs' penultimate layers, as SDXL was trained"
            raise ConfigError("clip_skip", self.clip_skip, why + " (leave {clip_skip} at 1)")
        layers = self.encoders[0][1].config.num_hidden_layers
        if self.clip_skip > layers:
            raise ConfigError("clip_skip", self.clip_skip, f"it must be at most {layers}, the layers of this model's "
                              "text encoder")  # fmt: skip

    def _init_flow(self) -> None:
        pipe = self.pipe
        if self.clip_skip != 1:
            raise ConfigError("clip_skip", self.clip_skip, f"it does not apply to {self.arch}: it conditions on the "
                              "CLIP layers its pipeline uses (leave {clip_skip} at 1)")  # fmt: skip
        self.objective = "flow"
        self.main = pipe.transformer
        config = pipe.scheduler.config
        self.num_timesteps = config.get("num_train_timesteps", 1000)
        # SD3's scheduler shifts sigma by a fixed factor (3.0); FLUX's shifts by resolution at inference only
        # (use_dynamic_shifting), so it trains on unshifted sigmas, as diffusers' FLUX trainer does
        self.shift = 1.0 if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))
        t5 = getattr(pipe, "tokenizer_3" if self.arch == "sd3" else "tokenizer_2", None)
        limit = getattr(t5, "model_max_length", None) or T5_TOKENS[self.arch]
        self.max_sequence_length = min(T5_TOKENS[self.arch], limit)
        self.prediction_type = "flow"

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        """Recompute activations in the backward pass instead of keeping them: the UNet's or transformer's blocks, and
        with `text_encoders` the layers of the CLIPs that train (as kohya and the diffusers scripts do). transformers
        checkpoints a layer only in training mode: the checkpointed layers alone are marked training (the rest of the
        frozen encoder keeps its mode, its dropout off). Non-reentrant, as diffusers' models checkpoint."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.main.enable_gradient_checkpointing()
        for name in ("text_encoder", "text_encoder_2") if text_encoders else ():
            te = getattr(self.pipe, name, None)
            if te is None:
                continue
            enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
            enable({"use_reentrant": False})  # (activation_: transformers 5.23's name; the other is deprecated there)
            for layer in te.modules():
                if isinstance(layer, GradientCheckpointingLayer):
                    layer.training = True

    def repeated_blocks(self) -> list[torch.nn.Module]:
        """The UNet's or transformer's repeated blocks (REPEATED_BLOCKS and the model's own `_repeated_blocks`), in
        module order: what --compile compiles and --offload-blocks streams."""
        names = set(REPEATED_BLOCKS) | set(getattr(self.main, "_repeated_blocks", None) or ())
        return [m for m in self.main.modules() if type(m).__name__ in names]

    def compile_blocks(self) -> list[torch.nn.Module]:
        """Compile the UNet's or transformer's repeated blocks in place (after the adapters are added: lora_kit's
        wrappers trace without a graph break); returns the blocks compiled. The model, its state dict and its
        checkpoints stay as they were: only each block's call goes through its compiled graph."""
        from collections import Counter

        import torch._dynamo

        blocks = self.repeated_blocks()
        # blocks of one class share one forward, and dynamo keeps at most recompile_limit (8) graphs of it, beyond
        # which it runs eager: a graph per parameter shape (SD1's resnets come in 12), each traced again for an input
        # that does not require grad, under no_grad (validation) and once a resolution turns dynamic (buckets)
        signatures = {(type(b).__name__, tuple(p.shape for p in b.parameters())) for b in blocks}
        limit = 4 * max(Counter(name for name, _ in signatures).values(), default=0)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        for block in blocks:
            block.compile(**COMPILE_OPTIONS)
        return blocks

    @property
    def size_step(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling, or times the
        transformer's patch size (x2 for FLUX's 2x2 packing)."""
        if self.arch == "sd3":
            return self.pipe.vae_scale_factor * self.main.config.patch_size
        if self.arch == "flux":
            return self.pipe.vae_scale_factor * 2 * self.main.config.patch_size
        return self.pipe.vae_scale_factor * 2 ** (len(self.main.config.block_out_channels) - 1)

    @torch.no_grad()
    def latent_dist(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the latent distribution as the model sees it, (latent - shift_factor) * scaling_factor;
        training samples from it every step."""
        vae = self.pipe.vae
        # a VAE that overflows in fp16 (SDXL's: config force_upcast) encodes in fp32, as diffusers' pipelines decode
        # with it and its SDXL trainer keeps it: in fp16 its latents are NaN and so is every loss
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        finally:
            if upcast:
                vae.to(torch.float16)
        sf, shift = vae.config.scaling_factor, vae.config.get("shift_factor")
        mean = dist.mean.float() if shift is None else dist.mean.float() - shift
        return (mean * sf).cpu(), (dist.std.float() * sf).cpu()

    def sample_time(self, generator: torch.Generator) -> int | float:
        """One sample's time, drawn from its own generator: a DDPM timestep index, or flow matching's sigma."""
        if self.objective == "flow":
            return float(objective.flow_sigmas(1, generator, self.shift)[0])
        return int(torch.randint(0, self.num_timesteps, (1,), generator=generator))

    def noising(self, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor):
        """(noisy latents, timesteps for the model, target) of a batch whose `times` came from `sample_time`.
        Flow matching gives the model sigma * num_train_timesteps, the timestep its pipeline's scheduler holds."""
        if self.objective == "flow":
            sigmas = times.float()
            return (
                objective.flow_noise(x0, noise, sigmas),
                sigmas * self.num_timesteps,
                objective.flow_target(x0, noise),
            )
        ac = self.alphas_cumprod
        noisy = objective.add_noise(x0, noise, times, ac)
        return noisy, times, objective.target(x0, noise, times, ac, self.prediction_type)

    def _tokens(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids  # fmt: skip

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors for a batch of captions (with gradients when a text encoder trains)."""
        if self.arch == "sd3":
            device = self.pipe._execution_device
            states, _, pooled, _ = self.pipe.encode_prompt(captions, captions, captions, device=device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)  # fmt: skip
            return {"encoder_hidden_states": states, "pooled_projections": pooled}
        if self.arch == "flux":
            device = self.pipe._execution_device
            states, pooled, _ = self.pipe.encode_prompt(captions, captions, device=device,
                                                        max_sequence_length=self.max_sequence_length)  # fmt: skip
            return {"encoder_hidden_states": states, "pooled_projections": pooled}
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

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict, size: tuple[int, int],
                time_ids: torch.Tensor | None = None):  # fmt: skip
        """The model's output for noisy latents (B, C, H, W), in that same layout. SDXL: `time_ids` (B, 6) are each
        sample's size conditioning (data.sdxl_time_ids: original size, crop top-left, target size); without them
        original = target = `size` (width, height), no crop."""
        if self.arch == "flux":
            return self._predict_flux(noisy, timesteps, cond)
        if self.arch == "sd3":
            return self.main(hidden_states=noisy, timestep=timesteps.to(noisy.device), return_dict=False,
                             encoder_hidden_states=cond["encoder_hidden_states"],
                             pooled_projections=cond["pooled_projections"])[0]  # fmt: skip
        kwargs = {}
        if self.arch == "sdxl":
            if time_ids is None:
                w, h = size
                time_ids = torch.tensor([[h, w, 0, 0, h, w]]).repeat(noisy.shape[0], 1)
            ids = time_ids.to(noisy.device, noisy.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": ids}
        return self.main(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False,
                         **kwargs)[0]  # fmt: skip

    def _predict_flux(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        states = cond["encoder_hidden_states"]
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if self.main.config.get("guidance_embeds"):
            guidance = torch.full((b,), FLUX_GUIDANCE, device=noisy.device, dtype=torch.float32)
        out = self.main(hidden_states=packed, timestep=timesteps.to(noisy.device) / 1000, guidance=guidance,
                        pooled_projections=cond["pooled_projections"], encoder_hidden_states=states, txt_ids=txt_ids,
                        img_ids=img_ids, return_dict=False)[0]  # fmt: skip
        vsf = self.pipe.vae_scale_factor  # _unpack_latents takes the image size in pixels
        return FluxPipeline._unpack_latents(out, h * vsf, w * vsf, vsf)
