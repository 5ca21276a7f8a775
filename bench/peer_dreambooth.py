"""The peer of bench/e2e.py: a LoRA trained the way diffusers' examples/dreambooth/train_dreambooth_lora.py trains one
(SD 1.x/2.x, no prior preservation), written here from that script's structure, not copied.

Every step loads and transforms its images (PIL: resize the short side to the resolution, centre crop, [-1, 1]),
encodes them with the VAE and tokenizes and encodes their captions with the text encoder (nothing is cached), puts
noise on the latents (DDPM schedule), predicts it with the UNet carrying peft LoRA layers (`unet.add_adapter`, rank r,
alpha r, gaussian initial factors, on to_q/to_k/to_v/to_out.0 and add_k_proj/add_v_proj where they exist: the
script's targets), and takes a clipped (1.0) AdamW step (torch.optim.AdamW, weight decay 1e-2; --use-8bit-adam:
bitsandbytes' AdamW8bit) through accelerate, the adapters in fp32 under --mixed-precision. The file is written with
`save_lora_weights`, as the script does. A caption per image: the image's .txt beside it (the script's caption
column), else --instance-prompt.

    python bench/peer_dreambooth.py --model FOLDER --data FOLDER --output DIR [--steps 300 --batch-size 4 ...]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]  # the script's UNet targets
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class InstanceImages(torch.utils.data.Dataset):
    """The script's DreamBoothDataset without class images: each item is an image transformed anew (every epoch) and
    its tokenized caption."""

    def __init__(self, folder: str, tokenizer, resolution: int, prompt: str | None):
        from PIL import Image, ImageOps

        self.image, self.exif = Image, ImageOps.exif_transpose
        self.paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in EXTENSIONS)
        if not self.paths:
            raise SystemExit(f"{folder}: no images")
        self.tokenizer, self.resolution, self.prompt = tokenizer, resolution, prompt

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, path: Path) -> torch.Tensor:
        image = self.exif(self.image.open(path)).convert("RGB")
        scale = self.resolution / min(image.size)  # transforms.Resize(resolution), bilinear
        w, h = max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale))
        image = image.resize((w, h), self.image.BILINEAR)
        left, top = (w - self.resolution) // 2, (h - self.resolution) // 2  # transforms.CenterCrop
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # ToTensor
        return array * 2.0 - 1.0  # Normalize([0.5], [0.5])

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.exists() else self.prompt
        ids = self.tokenizer(caption, truncation=True, padding="max_length",
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        return {"pixel_values": self.pixels(path), "input_ids": ids}


def collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]).float(),
        "input_ids": torch.cat([i["input_ids"] for i in items]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a diffusers SD 1.x/2.x folder")
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True, help="folder of pytorch_lora_weights.safetensors")
    parser.add_argument("--instance-prompt", default="a photo of sks")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--use-8bit-adam", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoTokenizer, CLIPTextModel

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    # (peft matches each name as a module path's end; the add_ projections exist only in some UNets)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS)
    unet.add_adapter(config)
    if args.mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)  # the adapters train in fp32
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    dataset = InstanceImages(args.data, tokenizer, args.resolution, args.instance_prompt)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)

    step = 0
    for _epoch in range(math.ceil(args.steps / len(loader))):
        unet.train()
        for batch in loader:
            with accelerator.accumulate(unet):
                pixels = batch["pixel_values"].to(dtype=vae.dtype)
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device).long()  # fmt: skip
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"].to(accelerator.device), return_dict=False)[0]
                pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step += 1
            if step >= args.steps:
                break
        if step >= args.steps:
            break

    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(unet).to(torch.float32)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(save_directory=args.output, unet_lora_layers=layers)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
