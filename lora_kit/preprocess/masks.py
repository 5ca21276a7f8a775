"""Subject masks from a text prompt ("face") through a local CLIPSeg model, thresholded and blurred, as [0, 1] PNGs.

CLIPSeg sees the whole image squeezed to its input square, so its probability map covers the whole image in
fractions of width and height; crop.apply_to_mask cuts each crop's part out of it at the crop's output size.
"""

from __future__ import annotations

from ..errors import LoraKitError
from .loading import load_model, load_processor, model_config, quiet_transformers, to_device


class Masker:
    """prompt + images -> probability maps (float32 arrays in [0, 1], one per image, CLIPSeg's resolution)."""

    def __init__(self, path: str, prompt: str, device: str, dtype, batch_size: int = 4):
        from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

        config = model_config(path, "--mask-model")
        if not isinstance(config, CLIPSegConfig):
            raise LoraKitError(f"--mask-model {path}: a {config.model_type!r} model, not CLIPSeg "
                               "(CLIPSegForImageSegmentation)")  # fmt: skip
        self.model = load_model(CLIPSegForImageSegmentation, path, "--mask-model", device, dtype)
        self.processor = load_processor(path, "--mask-model")
        if not hasattr(self.processor, "image_processor") or not hasattr(self.processor, "tokenizer"):
            raise LoraKitError(
                f"--mask-model {path}: needs both an image processor and a tokenizer (CLIPSegProcessor)"
            )
        self.prompt, self.device, self.dtype, self.batch_size = prompt, device, dtype, batch_size

    def __call__(self, images) -> list:
        import torch

        maps = []
        with torch.no_grad(), quiet_transformers():
            for i in range(0, len(images), self.batch_size):
                batch = images[i : i + self.batch_size]
                inputs = self.processor(text=[self.prompt] * len(batch), images=batch, padding=True,
                                        return_tensors="pt")  # fmt: skip
                logits = self.model(**to_device(inputs, self.device, self.dtype)).logits
                # CLIPSeg squeezes a batch of one to (H, W); make it (B, H, W) again
                probs = torch.sigmoid(logits.float().reshape(len(batch), *logits.shape[-2:])).cpu().numpy()
                maps += list(probs)
        return maps


def finish(prob, threshold: float, blur: float):
    """A crop's probability map -> the mask written: binary at `threshold` (0 = keep soft), then blurred; uint8."""
    import numpy as np
    from PIL import Image, ImageFilter

    p = (prob >= threshold).astype(np.float32) if threshold > 0 else np.clip(prob, 0.0, 1.0)
    img = Image.fromarray(np.round(p * 255).astype(np.uint8), "L")
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return img
