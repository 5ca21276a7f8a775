"""Single-file checkpoints: lora_kit writes tiny SD1/SD2/SDXL/SD3/FLUX pipelines as A1111/ComfyUI checkpoints that
diffusers' own `from_single_file` reads back to the same tensors, opens them again itself, and every command that
takes a model takes them (train, generate, extract, merge, inspect), with one-line refusals for wrong files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import clip_config, clip_tokenizer, t5_tokenizer

from lora_kit.errors import LoraKitError


def tiny(arch: str, folder: str):
    """A tiny pipeline whose two CLIPs differ in width (SDXL, SD3), as the real ones do: diffusers tells the
    encoders of a checkpoint apart by width, so two of one width would read the first one twice."""
    import diffusers as d
    from conftest import build_pipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    if arch in ("sd1", "sd2", "flux"):
        pipe = build_pipeline(arch, folder)
    elif arch == "sdxl":
        tok, tok2 = clip_tokenizer(os.path.join(folder, "t1")), clip_tokenizer(os.path.join(folder, "t2"), "!")
        unet = d.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=80, norm_num_groups=1,
        )  # fmt: skip
        pipe = d.StableDiffusionXLPipeline(
            vae=d.AutoencoderKL(**_vae()), text_encoder=CLIPTextModel(clip_config(tok)),
            text_encoder_2=CLIPTextModelWithProjection(clip_config(tok2, hidden=48, proj=32)), tokenizer=tok,
            tokenizer_2=tok2, unet=unet, scheduler=d.EulerDiscreteScheduler(steps_offset=1),
        )  # fmt: skip
    elif arch == "sd3":
        tok, tok2 = clip_tokenizer(os.path.join(folder, "t1")), clip_tokenizer(os.path.join(folder, "t2"), "!")
        tok3 = t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=96, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, decoder_start_token_id=0))  # fmt: skip
        transformer = d.SD3Transformer2DModel(
            sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=96, pooled_projection_dim=80, out_channels=4,
            qk_norm="rms_norm", dual_attention_layers=(0,),
        )  # fmt: skip
        pipe = d.StableDiffusion3Pipeline(
            scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=d.AutoencoderKL(**_vae()),
            text_encoder=CLIPTextModelWithProjection(clip_config(tok, proj=32)),
            text_encoder_2=CLIPTextModelWithProjection(clip_config(tok2, hidden=48, proj=48)), text_encoder_3=t5,
            tokenizer=tok, tokenizer_2=tok2, tokenizer_3=tok3, transformer=transformer,
        )  # fmt: skip
        with torch.no_grad():  # SD3 pools CLIP-L unprojected: checkpoints keep no projection (diffusers reads eye)
            pipe.text_encoder.text_projection.weight.copy_(torch.eye(32))
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae():
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=32, block_out_channels=(32, 64),
                layers_per_block=1, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2)  # fmt: skip


def tensors(pipe) -> dict[str, torch.Tensor]:
    """Every weight of every model component, by 'component.name' (position_ids buffers aside)."""
    return {f"{c}.{k}": v for c, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items() if not k.endswith("position_ids")}  # fmt: skip


def assert_same_weights(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k].to(ta[k].dtype)), k


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "sd3"])
def test_diffusers_reads_what_lora_kit_writes(arch, tmp_path):
    """The layout tables against diffusers' own reader: a tiny pipeline written as one checkpoint comes back from
    `from_single_file` (given the pipeline's configs) with every tensor equal; and lora_kit opens it too."""
    from lora_kit.models import open_pipeline
    from lora_kit.single_file.sniff import sniff
    from lora_kit.single_file.writer import write_single_file

    pipe = tiny(arch, str(tmp_path / "tok"))
    pipe.save_pretrained(tmp_path / "folder")
    path = write_single_file(pipe, tmp_path / "model.safetensors")
    found = sniff(path)
    held = {c for c, m in pipe.components.items() if c.startswith(("unet", "transformer", "vae", "text")) and m}
    assert found.arch == arch and set(found.parts) == held
    theirs = type(pipe).from_single_file(str(path), config=str(tmp_path / "folder"), local_files_only=True)
    assert_same_weights(pipe, theirs)
    ours = open_pipeline(str(path))
    assert type(ours) is type(pipe)
    assert_same_weights(pipe, ours)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(ours.scheduler.config) == public(pipe.scheduler.config)


@pytest.mark.slow
def test_diffusers_reads_a_flux_file_lora_kit_writes(tmp_path):
    """FLUX: diffusers' reader takes BFL single blocks as 3072 wide (FLUX.1's width), so this pipeline is of that
    width with one block of each kind; lora_kit's own reader (any width) is checked on the tiny one below."""
    import diffusers as d

    from lora_kit.models import open_pipeline
    from lora_kit.single_file.writer import write_single_file

    pipe = tiny("flux", str(tmp_path / "tok"))
    torch.manual_seed(0)
    pipe.transformer = d.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[16, 56, 56], guidance_embeds=True,
    ).to(torch.bfloat16).eval()  # fmt: skip
    pipe.register_modules(transformer=pipe.transformer)
    pipe.save_pretrained(tmp_path / "folder")
    path = write_single_file(pipe, tmp_path / "flux.safetensors")
    theirs = d.FluxPipeline.from_single_file(str(path), config=str(tmp_path / "folder"), local_files_only=True,
                                             torch_dtype=torch.bfloat16)  # fmt: skip
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, theirs.transformer.state_dict()[k]), k
    ours = open_pipeline(str(path), dtype=torch.bfloat16)
    assert_same_weights(pipe.to(torch.bfloat16), ours)


def test_flux_file_of_any_width_and_its_parts(tmp_path):
    """A tiny FLUX file opens through lora_kit's own tables; so does ComfyUI's split layout (a bare BFL transformer,
    ae, clip_l, t5xxl), and lora-merge writes such an input back as a bare transformer file."""
    from lora_kit import tools
    from lora_kit.models import open_pipeline
    from lora_kit.single_file.reader import PIPELINE_KEY
    from lora_kit.single_file.writer import _config_files, plan, stream, write_single_file

    pipe = tiny("flux", str(tmp_path / "tok"))
    whole = write_single_file(pipe, tmp_path / "flux.safetensors")
    assert_same_weights(pipe, open_pipeline(str(whole)))
    meta = {PIPELINE_KEY: json.dumps(_config_files(pipe))}
    names = {"transformer": "flux1-dev", "vae": "ae", "text_encoder": "clip_l", "text_encoder_2": "t5xxl_fp16"}
    for comp, name in names.items():
        rows = [(k, s, d, fn) for k, (s, d, fn) in plan(pipe, {comp: ""}, None).items()]
        stream(tmp_path / f"{name}.safetensors", rows, meta if comp == "transformer" else {})
    spec = ",".join(str(tmp_path / f"{n}.safetensors") for n in names.values())
    parts = open_pipeline(spec)
    assert_same_weights(pipe, parts)
    lora = _lora(pipe, tmp_path / "lora.safetensors", "dit", "transformer")
    out = tools.collapse_into_model(spec, lora, tmp_path / "merged.safetensors", single_file=True)
    from safetensors import safe_open

    keys = set(safe_open(str(out), "pt").keys())
    assert keys == set(safe_open(str(tmp_path / "flux1-dev.safetensors"), "pt").keys())
    assert any(k.startswith("double_blocks.0.img_attn.qkv") for k in keys)


def test_sd3_without_its_text_encoders_takes_them_as_files(tmp_path):
    """sd3_medium.safetensors holds the MMDiT and VAE only: its CLIP-L, CLIP-G and T5 come as ComfyUI's files, each
    put in its place by width and kind (given in any order), and lora-convert maps a LoRA through such a model."""
    from lora_kit.cli.convert import main as convert

    from lora_kit.models import open_pipeline
    from lora_kit.single_file.reader import PIPELINE_KEY
    from lora_kit.single_file.writer import _config_files, plan, stream

    pipe = tiny("sd3", str(tmp_path / "tok"))
    meta = {PIPELINE_KEY: json.dumps(_config_files(pipe))}
    main = {"transformer": "model.diffusion_model.", "vae": "first_stage_model."}
    stream(tmp_path / "sd3.safetensors", [(k, *v) for k, v in plan(pipe, main, None).items()], meta)
    for comp, name in {"text_encoder_3": "t5xxl", "text_encoder_2": "clip_g", "text_encoder": "clip_l"}.items():
        stream(tmp_path / f"{name}.safetensors", [(k, *v) for k, v in plan(pipe, {comp: ""}, None).items()], {})
    spec = ",".join(str(tmp_path / f"{n}.safetensors") for n in ("sd3", "t5xxl", "clip_g", "clip_l"))
    assert_same_weights(pipe, open_pipeline(spec))
    with pytest.raises(LoraKitError, match="holds no text_encoder"):
        open_pipeline(str(tmp_path / "sd3.safetensors"))
    lora = _lora(pipe, tmp_path / "l.safetensors", "dit", "transformer")
    result = CliRunner().invoke(convert, [str(lora), "--to", "peft", "--model", spec, "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output


def _lora(pipe, path, preset, component, seed=3):
    from conftest import randomize_adapters

    import lora_kit
    from lora_kit.inject import inject_lora, remove_lora

    module = getattr(pipe, component)
    inject_lora(module, preset, rank=2, alpha=1.0)
    randomize_adapters(module, seed=seed, std=0.3)
    lora_kit.save(pipe, path)
    remove_lora(module)
    return path


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    """The shipped toy model (SD1, OpenAI's CLIP vocabulary) written as one A1111 checkpoint, fp32."""
    from lora_kit.models import open_pipeline
    from lora_kit.single_file.writer import write_single_file

    folder = tmp_path_factory.mktemp("toyfile")
    return str(write_single_file(open_pipeline("toy"), folder / "toy.safetensors"))


def test_merge_into_a_checkpoint_equals_collapse_in_memory(toy_file, tmp_path):
    """`lora-merge MODEL.safetensors LORA -o x.safetensors`: the checkpoint opened again equals collapsing the LoRA
    in memory, keys it does not model are kept bit for bit, the input is untouched, and outputs are refused."""
    from lora_kit.cli.merge import main as merge

    import lora_kit
    from lora_kit.models import open_pipeline
    from lora_kit.single_file.writer import DTYPE_NAMES, stream, tensor_reader

    src = tmp_path / "model.safetensors"  # the toy file plus what real checkpoints carry beside the model
    read = tensor_reader(Path(toy_file))
    from safetensors import safe_open

    rows = [(k, list(read(k).shape), read(k).dtype, lambda k=k: read(k)) for k in safe_open(toy_file, "pt").keys()]
    extra = {"model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.linspace(1, 0.01, 10).half()}
    rows += [(k, list(v.shape), v.dtype, lambda v=v: v) for k, v in extra.items()]
    stream(src, rows, dict(safe_open(toy_file, "pt").metadata()))
    pipe = open_pipeline(str(src))
    lora = _lora(pipe, tmp_path / "style.safetensors", "kohya", "unet")
    before = sha(src)
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(merge, [str(src), str(lora), "--alpha", "0.7", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sha(src) == before
    expected = open_pipeline(str(src))
    lora_kit.load(expected, lora, weight=0.7)
    lora_kit.collapse(expected)
    assert_same_weights(expected, open_pipeline(str(out)))
    merged = safe_open(str(out), "pt")
    for k, v in extra.items():
        assert torch.equal(merged.get_tensor(k), v), k
    header = {k: DTYPE_NAMES[merged.get_tensor(k).dtype] for k in ("alphas_cumprod",)}
    assert header == {"alphas_cumprod": "F16"}
    again = CliRunner().invoke(merge, [str(src), str(lora), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    into_input = CliRunner().invoke(merge, [str(src), str(lora), "-o", str(src), "--force"])
    assert into_input.exit_code == 2 and sha(src) == before


def test_a_folder_written_as_a_single_file_in_fp16(tmp_path):
    """`lora-merge FOLDER LORA --to single-file --dtype fp16`: A1111's SD1 layout, every float tensor F16."""
    from lora_kit.cli.merge import main as merge
    from safetensors import safe_open

    from lora_kit.models import open_pipeline

    pipe = open_pipeline("toy")
    lora = _lora(pipe, tmp_path / "s.safetensors", "attn", "unet")
    out = tmp_path / "sd15"
    result = CliRunner().invoke(merge, ["toy", str(lora), "--to", "single-file", "--dtype", "fp16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    f = safe_open(str(out), "pt")
    keys = list(f.keys())
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}


def test_training_from_a_single_file_is_bit_identical(toy_file, tmp_path):
    """Two steps of LoRA training from the toy folder and from its single file give the same adapter, bit for bit."""
    from safetensors.torch import load_file

    from lora_kit.train.config import TrainConfig
    from lora_kit.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {colour} circle on a blue background")
    outs = []
    for model in ("toy", toy_file):
        out = tmp_path / f"{len(outs)}.safetensors"
        train(TrainConfig(model=model, data=str(data), output=str(out), steps=2, rank=2, resolution=64, lr=1e-2))
        outs.append(load_file(out))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_generating_from_a_single_file_is_bit_identical(toy_file, tmp_path):
    from lora_kit.cli.generate import main as generate
    from PIL import Image

    pixels = []
    for model in ("toy", toy_file):
        out = tmp_path / str(len(pixels))
        args = ["--model", model, "--prompt", "a red circle on a blue background", "--steps", "2", "-o", str(out)]
        result = CliRunner().invoke(generate, args)
        assert result.exit_code == 0, result.output
        pixels.append(Image.open(out / "000-seed0.png").tobytes())
    assert pixels[0] == pixels[1]


def test_extract_from_single_files_equals_from_folders(toy_file, tmp_path):
    from safetensors.torch import load_file

    from lora_kit import tools
    from lora_kit.models import open_pipeline
    from lora_kit.single_file.writer import write_single_file

    pipe = open_pipeline("toy")
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "attn2.to_k" in name and p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    pipe.save_pretrained(tmp_path / "tuned")
    tuned_file = write_single_file(pipe, tmp_path / "tuned.safetensors")
    a = tools.extract("toy", str(tmp_path / "tuned"), tmp_path / "a.safetensors", rank=2, targets="attn")
    b = tools.extract(toy_file, str(tuned_file), tmp_path / "b.safetensors", rank=2, targets="attn")
    ta, tb = load_file(a.path), load_file(b.path)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_inspect_names_a_checkpoint(toy_file):
    from lora_kit.cli.inspect import main as inspect

    result = CliRunner().invoke(inspect, [toy_file])
    assert result.exit_code == 0, result.output
    assert "format        checkpoint" in result.output and "SD1.x" in result.output
    info = json.loads(CliRunner().invoke(inspect, [toy_file, "--json"]).output)
    assert info["architecture"] == "SD1.x" and set(info["components"]) == {"unet", "vae", "text_encoder"}


def test_wrong_files_get_one_line(toy_file, tmp_path):
    """A model where a LoRA is expected and the reverse, a truncated file, keys of no known model, a UNet alone
    without its other parts, a pickle without --allow-pickle: one line naming the file, exit 2, nothing written."""
    from lora_kit.cli.generate import main as generate
    from lora_kit.cli.merge import main as merge

    from lora_kit.models import check_spec, open_pipeline
    from lora_kit.single_file.writer import stream

    pipe = open_pipeline("toy")
    lora = _lora(pipe, tmp_path / "l.safetensors", "attn", "unet")
    out = tmp_path / "out"

    def fails(cmd, args, *expected):
        result = CliRunner().invoke(cmd, args)
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and all(e in line for e in expected), line
        assert not out.exists()

    fails(generate, ["--model", str(lora), "--prompt", "x", "-o", str(out)], str(lora), "is a LoRA")
    fails(merge, [str(lora), toy_file, "-o", str(out)], toy_file, "SD1.x checkpoint", "not a LoRA")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(Path(toy_file).read_bytes()[:5000])
    fails(generate, ["--model", str(truncated), "--prompt", "x", "-o", str(out)], str(truncated))
    odd = tmp_path / "odd.safetensors"
    stream(odd, [("foo.weight", [2, 2], torch.float32, lambda: torch.zeros(2, 2))], {})
    fails(generate, ["--model", str(odd), "--prompt", "x", "-o", str(out)], str(odd), "not a checkpoint of")
    scaled = tmp_path / "fp8_scaled.safetensors"
    stream(scaled, [("scaled_fp8", [2], torch.float8_e4m3fn, lambda: torch.zeros(2).to(torch.float8_e4m3fn))], {})
    fails(generate, ["--model", str(scaled), "--prompt", "x", "-o", str(out)], str(scaled), "scaled fp8")
    from safetensors import safe_open

    f = safe_open(toy_file, "pt")
    unet_only = tmp_path / "unet.safetensors"
    rows = [(k, list(f.get_slice(k).get_shape()), torch.float32, lambda k=k: f.get_tensor(k))
            for k in f.keys() if k.startswith("model.diffusion_model.")]  # fmt: skip
    stream(unet_only, rows, {})
    fails(generate, ["--model", str(unet_only), "--prompt", "x", "-o", str(out)], str(unet_only), "holds no",
          "vae")  # fmt: skip
    from lora_kit.models import toy_model

    with_parts = open_pipeline(f"{unet_only},{toy_model()}")  # the other parts from a diffusers folder
    assert_same_weights(open_pipeline(toy_file), with_parts)
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: f.get_tensor(k) for k in f.keys()}}, pickled)
    with pytest.raises(LoraKitError, match="allow-pickle"):
        check_spec(str(pickled))
    from lora_kit.cli.extract import main as extract

    fails(extract, [str(pickled), toy_file, "-o", str(out)], str(pickled), "--allow-pickle")
    # a .ckpt carries no configs: the toy folder's (a real SD1.5 .ckpt alone takes the shipped ones)
    opened = open_pipeline(f"{pickled},{toy_model()}", allow_pickle=True)
    assert_same_weights(open_pipeline(toy_file), opened)


def test_sd2_without_a_stated_prediction_needs_it(tmp_path, monkeypatch):
    """SD2's 768-v and 512-base checkpoints share every key: a file that does not say (no lora_kit configs, no
    modelspec.prediction_type, no v_pred key) opens with the shipped configs for browsing, but training and
    sampling refuse it until --prediction-type says; a file that states it is taken at its word."""
    from lora_kit.models import open_pipeline, refuse_guessed_prediction
    from lora_kit.single_file import reader
    from lora_kit.single_file.reader import PIPELINE_KEY
    from lora_kit.single_file.writer import _config_files, plan, stream

    pipe = tiny("sd2", str(tmp_path / "tok"))
    shipped = tmp_path / "assets"  # the shipped-config path, with the tiny model's configs as the "v2" type
    for rel, text in _config_files(pipe).items():
        (shipped / "v2" / rel).parent.mkdir(parents=True, exist_ok=True)
        (shipped / "v2" / rel).write_text(text)
    monkeypatch.setattr(reader, "ASSETS", shipped)
    monkeypatch.setattr(reader, "DEFAULT_TYPE", dict(reader.DEFAULT_TYPE, sd2="v2"))
    monkeypatch.setattr(reader, "config_folder", _keep_tokenizers(reader.config_folder))
    comps = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.model."}
    rows = [(k, s, d, fn) for k, (s, d, fn) in plan(pipe, comps, None).items()]
    bare = stream(tmp_path / "sd2.safetensors", rows, {})
    opened = open_pipeline(str(bare))
    assert_same_weights(pipe, opened)
    with pytest.raises(LoraKitError, match="--prediction-type"):
        refuse_guessed_prediction(opened, str(bare), None)
    eps = open_pipeline(str(bare), prediction_type="epsilon")
    refuse_guessed_prediction(eps, str(bare), "epsilon")
    assert eps.scheduler.config.prediction_type == "epsilon"
    stated = stream(tmp_path / "sd2v.safetensors", rows, {"modelspec.prediction_type": "v"})
    assert open_pipeline(str(stated)).scheduler.config.prediction_type == "v_prediction"
    assert PIPELINE_KEY not in reader.sniff(bare).metadata


def _keep_tokenizers(config_folder):
    """The tiny tokenizers stand in for the shipped CLIP vocabulary (the tiny text encoder has 500 tokens)."""

    def wrapped(main, arch, folder, rest=None):
        config_folder(main, arch, folder, rest)
        for name in ("tokenizer",):
            for f in (folder / name).glob("*"):
                f.unlink()
        src = Path(reader_assets()) / "v2" / "tokenizer"
        for f in src.glob("*"):
            (folder / "tokenizer" / f.name).write_text(f.read_text())

    return wrapped


def reader_assets():
    from lora_kit.single_file import reader

    return reader.ASSETS


SHIPPED = {"v1": "sd1", "v2": "sd2", "xl_base": "sdxl", "sd3": "sd3", "sd35_medium": "sd3", "sd35_large": "sd3",
           "flux-dev": "flux", "flux-schnell": "flux"}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(SHIPPED))
def test_shipped_configs_are_the_ones_real_files_get(model_type, tmp_path):
    """Each shipped config folder builds its real-size pipeline (on the meta device: shapes, no weights); the
    checkpoint keys and shapes lora_kit would write for it are told as the right architecture, and diffusers' own
    model-type inference on them picks this very folder, so a real file of that model opens with these configs."""
    import diffusers
    import transformers

    from lora_kit.single_file import reader
    from lora_kit.single_file.sniff import LAYOUTS, sniff
    from lora_kit.single_file.writer import DTYPE_NAMES, plan

    folder = reader.ASSETS / model_type
    index = json.loads((folder / "model_index.json").read_text())
    arch = SHIPPED[model_type]
    parts = {}
    with torch.device("meta"):
        for comp in LAYOUTS[arch]:
            library, cls_name = index[comp]
            if library == "diffusers":
                cls = getattr(diffusers, cls_name)
                parts[comp] = cls.from_config(cls.load_config(folder / comp))
            else:
                cls = getattr(transformers, cls_name)
                parts[comp] = cls(cls.config_class.from_pretrained(folder / comp))

    class Pipe:  # what plan() reads of a pipeline: its components by name
        def __init__(self, comps):
            self.__dict__.update(comps)

    entries = {key: {"shape": shape, "dtype": DTYPE_NAMES[torch.float16]}
               for key, (shape, _, _) in plan(Pipe(parts), {c: p for c, (_, p) in LAYOUTS[arch].items()},
                                               _source(arch)).items()}  # fmt: skip
    found = sniff(tmp_path / "x.safetensors", entries, {})
    assert found.arch == arch and set(found.parts) == set(LAYOUTS[arch])
    assert reader.model_type(found, arch) == model_type
    for name in reader.tokenizer_slots(index):  # the shipped vocabularies load as the configs ask
        sub = tmp_path / name
        import shutil

        shutil.copytree(folder / name, sub)
        from lora_kit.single_file.tokenizers import add_vocabulary

        add_vocabulary(sub, index[name][1])
        tok = getattr(transformers, index[name][1]).from_pretrained(sub)
        expected = [3, 9, 1202, 13, 3, 9, 1712, 1] if "T5" in index[name][1] else [49406, 320, 1125, 539, 320, 2368]
        assert tok("a photo of a cat").input_ids[: len(expected)] == expected


def _source(arch):
    """A stand-in Source naming the architecture (plan() reads the arch from it)."""
    from types import SimpleNamespace

    return SimpleNamespace(main=SimpleNamespace(arch=arch, part_arch=None))


def test_a_pipeline_from_part_files_runs(tmp_path):
    """The parts' text encoders are whole modules (their buffers too): the pipeline built from split files draws the
    same image as the pipeline it was written from."""
    from lora_kit.models import open_pipeline
    from lora_kit.single_file.reader import PIPELINE_KEY
    from lora_kit.single_file.writer import _config_files, plan, stream

    pipe = tiny("flux", str(tmp_path / "tok"))
    meta = {PIPELINE_KEY: json.dumps(_config_files(pipe))}
    for comp, name in {"transformer": "flux1", "vae": "ae", "text_encoder": "clip_l", "text_encoder_2": "t5"}.items():
        rows = [(k, *v) for k, v in plan(pipe, {comp: ""}, None).items()]
        stream(tmp_path / f"{name}.safetensors", rows, meta if comp == "transformer" else {})
    opened = open_pipeline(",".join(str(tmp_path / f"{n}.safetensors") for n in ("flux1", "ae", "clip_l", "t5")))
    kwargs = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                  max_sequence_length=16)  # fmt: skip
    a = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    b = opened(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (a == b).all()
