"""Tiny offline pipelines for SD1.x, SD2.x (v-prediction, linear projection), SDXL, SD3 and FLUX, built from
configs with random weights (nothing is downloaded), plus helpers the tests share."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = ["a", "photo", "of", "dog", "cat", "sks", "the", "in", "on", "style", "painting", "person", "red", "circle"]
ARCHS = ["sd1", "sd2", "sdxl", "sd3", "flux"]


def _bytes_to_unicode() -> dict[int, str]:
    from lora_kit.single_file.tokenizers import bytes_to_unicode

    return bytes_to_unicode()


def write_byte_level_clip_tokenizer(folder: str, words=WORDS) -> None:
    """A tiny byte-level CLIP BPE (512 byte tokens, whole-word merges for `words`, 2 specials)."""
    os.makedirs(folder, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base]
    merges: list[str] = []
    for w in words:
        cur = w[0]
        for i, ch in enumerate(w[1:], 1):
            right = ch + ("</w>" if i == len(w) - 1 else "")
            if f"{cur} {right}" not in merges:
                merges.append(f"{cur} {right}")
            cur = cur + right
            if cur not in vocab:
                vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def clip_tokenizer(folder: str, pad_token: str | None = None):
    from transformers import CLIPTokenizer

    write_byte_level_clip_tokenizer(folder)
    kw = {"model_max_length": 77}
    if pad_token:
        kw["pad_token"] = pad_token
    return CLIPTokenizer.from_pretrained(folder, **kw)


def clip_config(tok, hidden: int = 32, proj: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    kw = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=act, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    if proj:
        kw["projection_dim"] = proj
    return CLIPTextConfig(**kw)


def t5_tokenizer():
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars] + [("▁" + w, -1.0) for w in WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def t5_encoder(tok):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            decoder_start_token_id=0,
        )
    )  # fmt: skip


VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32, block_out_channels=(32, 64),
    layers_per_block=1, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)  # fmt: skip
UNET_SD1 = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
UNET_SD2 = dict(UNET_SD1, use_linear_projection=True, attention_head_dim=(2, 4))
UNET_SDXL = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=1,
)  # fmt: skip


def build_pipeline(arch: str, folder: str):
    """A tiny random pipeline of the given architecture; tokenizers are written under `folder`."""
    import diffusers as d
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = clip_tokenizer(os.path.join(folder, "tok1"))
    ddim = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    if arch in ("sd1", "sd2"):
        sd2 = arch == "sd2"
        te = CLIPTextModel(clip_config(tok, act="gelu" if sd2 else "quick_gelu"))
        unet = d.UNet2DConditionModel(**(UNET_SD2 if sd2 else UNET_SD1))
        sched = d.DDIMScheduler(**ddim, prediction_type="v_prediction" if sd2 else "epsilon")
        return d.StableDiffusionPipeline(
            vae=d.AutoencoderKL(**VAE), text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    if arch == "sdxl":
        tok2 = clip_tokenizer(os.path.join(folder, "tok2"), pad_token="!")
        return d.StableDiffusionXLPipeline(
            vae=d.AutoencoderKL(**VAE), text_encoder=CLIPTextModel(clip_config(tok)),
            text_encoder_2=CLIPTextModelWithProjection(clip_config(tok2, proj=32)), tokenizer=tok, tokenizer_2=tok2,
            unet=d.UNet2DConditionModel(**UNET_SDXL),
            scheduler=d.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                               beta_schedule="scaled_linear", timestep_spacing="leading"),
        )  # fmt: skip
    small_vae = dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    tok_t5 = t5_tokenizer()
    if arch == "flux":
        transformer = d.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        )  # fmt: skip
        return d.FluxPipeline(
            scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=d.AutoencoderKL(**small_vae, latent_channels=1),
            text_encoder=CLIPTextModel(clip_config(tok, proj=32)), tokenizer=tok, text_encoder_2=t5_encoder(tok_t5),
            tokenizer_2=tok_t5, transformer=transformer,
        )  # fmt: skip
    if arch == "sd3":
        tok2 = clip_tokenizer(os.path.join(folder, "tok2"), pad_token="!")
        transformer = d.SD3Transformer2DModel(
            sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        )  # fmt: skip
        return d.StableDiffusion3Pipeline(
            scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=d.AutoencoderKL(**small_vae, latent_channels=4),
            text_encoder=CLIPTextModelWithProjection(clip_config(tok, proj=32)),
            text_encoder_2=CLIPTextModelWithProjection(clip_config(tok2, proj=32)), text_encoder_3=t5_encoder(tok_t5),
            tokenizer=tok, tokenizer_2=tok2, tokenizer_3=tok_t5, transformer=transformer,
        )  # fmt: skip
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def make_pipe(tiny_folder):
    """A fresh tiny pipeline per call (the tests mutate them), deterministic for a given arch."""

    def make(arch: str):
        pipe = build_pipeline(arch, os.path.join(tiny_folder, arch))
        pipe.set_progress_bar_config(disable=True)
        for component in pipe.components.values():
            if hasattr(component, "eval"):
                component.eval()  # models built from a config start in training mode (T5 dropout)
        return pipe

    return make


def randomize_adapters(target, seed: int = 0, std: float = 0.2) -> None:
    """Random non-zero up and down for every adapter, so an adapter actually changes the output."""
    import torch

    from lora_kit.inject import extract_lora_ups_down
    from lora_kit.state import components

    g = torch.Generator().manual_seed(seed)
    for module in components(target).values():
        for up, down in extract_lora_ups_down(module):
            with torch.no_grad():
                up.copy_(torch.randn(up.shape, generator=g) * std)
                down.copy_(torch.randn(down.shape, generator=g) * std)


@pytest.fixture
def two_loras(make_pipe, tmp_path):
    """Two SD1 LoRA files on other modules and ranks: a = UNet LoCon (rank 4, alpha 2) + text-encoder attention;
    b = the UNet's `kohya` preset only (rank 3, alpha 1). Random non-zero factors."""
    import lora_kit
    from lora_kit.inject import inject_lora

    def save(path, preset, rank, alpha, seed, te):
        pipe = make_pipe("sd1")
        inject_lora(pipe.unet, preset, rank=rank, alpha=alpha, conv_rank=2, conv_alpha=1.0)
        if te:
            inject_lora(pipe.text_encoder, "clip-attn", rank=2, alpha=3.0)
        randomize_adapters(pipe, seed=seed)
        return lora_kit.save(pipe, path)

    a = save(tmp_path / "a.safetensors", "locon", 4, 2.0, seed=1, te=True)
    b = save(tmp_path / "b.safetensors", "kohya", 3, 1.0, seed=2, te=False)
    return a, b


def fixed_noise_loss(cfg, pipe, points) -> float:
    """The training loss summed over the training images at fixed noise levels, independent of the training RNG:
    points are (noise key, timestep or sigma) pairs."""
    import torch

    from lora_kit.train import loop
    from lora_kit.train.backbone import Backbone
    from lora_kit.train.data import Plan, scan

    backbone = Backbone(pipe)
    examples, _ = scan(cfg.data)
    plan = Plan(examples, 1, cfg.resolution, backbone.size_step, 0)
    batcher = loop.Batcher(cfg, backbone, examples, plan, cache_text=False)
    total = 0.0
    with torch.no_grad():
        for i in range(len(examples)):
            for key, level in points:
                b = batcher.batch([i], [0], (12345, key))
                b["timesteps"] = torch.tensor([level])
                total += loop.per_sample_loss(cfg, backbone, batcher, b).item()
    return total


def main_model(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def forward_main(model, seed: int = 1):
    """The UNet's noise prediction / the transformer's output on fixed random inputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    with torch.no_grad():
        if "FluxTransformer" in type(model).__name__:
            seq = 16
            return model(
                hidden_states=torch.randn(1, seq, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), img_ids=torch.randn(seq, 3, generator=g),
                txt_ids=torch.zeros(7, 3), return_dict=False,
            )[0]  # fmt: skip
        if "SD3Transformer" in type(model).__name__:
            return model(
                hidden_states=torch.randn(1, cfg.in_channels, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([10]), return_dict=False,
            )[0]  # fmt: skip
        kwargs = {}
        if cfg.addition_embed_type == "text_time":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * 8, generator=g),
                "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]),
            }
        return model(
            torch.randn(1, cfg.in_channels, 16, 16, generator=g), 10,
            encoder_hidden_states=torch.randn(1, 7, cfg.cross_attention_dim, generator=g), return_dict=False, **kwargs,
        )[0]  # fmt: skip


def forward_text(encoder):
    import torch

    ids = torch.tensor([[1, 5, 9, 20, 40, 60, 2]]) % encoder.config.vocab_size
    with torch.no_grad():
        return encoder(ids).last_hidden_state


def pipeline_outputs(pipe) -> dict:
    """{component: output} for the main model and every text encoder of a pipeline."""
    out = {"main": forward_main(main_model(pipe))}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            out[name] = forward_text(getattr(pipe, name))
    return out


ROUNDING_FACTOR = 8  # x2: both sides are rounded; x4: the largest of thousands of errors (sqrt(2 ln 3000) = 4)


def assert_close_scaled(actual, expected, *, reduction, dtype=None, scale=None, factor=ROUNDING_FACTOR, msg=None):
    """Assert that two float computations of the same quantity agree to within their rounding error:

        atol = factor * eps(dtype) * sqrt(reduction) * scale,   rtol = 0.

    A sum of K products rounded at every step is off by at most about K*eps times the sum of the magnitudes of its
    terms, and by about sqrt(K)*eps times the result when the rounding errors are independent (Higham, "Accuracy and
    Stability of Numerical Algorithms", 3.1 and 3.5); blocked and SIMD sums, whose order depends on the CPU (AVX2 or
    AVX-512, oneDNN or MKL), land well inside that. Measured on this suite (fp32 against float64), the error is 0.03
    to 0.5 of eps*sqrt(K)*scale, so `factor` leaves at least a 16-fold margin.

    reduction: K, how many products are summed into one value along the longest chain of reductions, the chain's
        lengths added (errors of successive stages add in quadrature): a matmul's inner size, a conv's C_in*kh*kw, a
        LoRA delta's rank; an SVD of an m x n matrix: max(m, n) (its reflections are dot products of that length,
        and then scale is the spectral norm). An nn.Module stands for its whole forward: the fan-ins of all its
        Linear and Conv layers added up (pass the base model or lora_kit's: PEFT's lora_A/lora_B count again). A
        tuple adds its items: `(text_encoder,) + (unet,) * steps` for a denoising loop.
    dtype: the precision the computation ran in (default: the coarser of the two tensors'); for bf16/fp16 kernels
        that accumulate in fp32 this model does not hold, and those tests keep a stated precision bound of their own.
    scale: the magnitude the rounding is relative to; default max|expected|. Pass the operands' magnitude where the
        result cancels (a difference, a squared residual), or 1 for values that are relative already.
    """
    import math

    import torch

    def fan_in(item) -> int:
        if isinstance(item, torch.nn.Module):
            layers = [m for m in item.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d)]
            return sum(m.weight[0].numel() for m in layers)  # a row of the weight: one output's products
        if isinstance(item, tuple | list):
            return sum(fan_in(i) for i in item)
        return int(item)

    if dtype is None:
        dtype = max((actual.dtype, expected.dtype), key=lambda d: torch.finfo(d).eps)
    scale = expected.abs().max().item() if scale is None else float(scale)
    atol = factor * torch.finfo(dtype).eps * math.sqrt(max(fan_in(reduction), 1)) * scale
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=msg)


def assert_outputs_close(a: dict, b: dict, pipe=None, exact: bool = False) -> None:
    """Two pipeline_outputs dicts: equal to the bit (exact), or to the rounding of each component's forward in `pipe`
    (the reference pipeline, for the size of its models)."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            model = main_model(pipe) if k == "main" else getattr(pipe, k)
            assert_close_scaled(a[k], b[k], reduction=model, msg=lambda m, k=k: f"{k}: {m}")


class Stopped(Exception):
    """Raised by stop_after's callback: a training run cut short, as a crash or a kill would."""


def stop_after(n: int | None = None):
    """A lora-train callback that stops the run once step `n` is done (after its checkpoint), or at the first step."""

    def callback(step, loss, context):
        if n is None or step == n:
            raise Stopped

    return callback
