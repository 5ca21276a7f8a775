"""Find, hash, open and validate input images: EXIF orientation, any PIL mode -> 8-bit RGB, rejections with reasons.

Nothing here writes: inputs are opened read-only and every conversion makes a new in-memory image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Files that commonly sit beside photos and are not meant as images; everything else is tried, so that a HEIC or
# a misnamed file shows up in the report as "not an image" instead of vanishing.
SIDECARS = {".txt", ".caption", ".json", ".jsonl", ".xmp", ".md", ".toml", ".yaml", ".yml", ".csv", ".npz", ".npy"}
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
# Formats whose frames are a sequence in time. Other multi-frame files hold one photo plus extras, and their first
# frame is the photo: a camera JPEG with an MPF preview (PIL: MPO), a multi-page TIFF, a PSD's layers, an ICO's sizes.
ANIMATED_FORMATS = {"GIF", "PNG", "WEBP", "AVIF", "FLI"}


class Rejected(Exception):
    """An input that cannot be used; `reason` is a short category for the summary, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Loaded:
    image: object  # PIL.Image.Image, RGB, EXIF orientation applied
    warnings: list[str] = field(default_factory=list)


def find_files(root: Path) -> list[Path]:
    """Every candidate file under `root`, recursively, sorted; hidden files/folders and caption sidecars skipped."""
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() in SIDECARS or not p.is_file():
            continue
        found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_quietly(path: Path):
    """Image.open without Pillow's DecompressionBombWarning: an image between its MAX_IMAGE_PIXELS and twice that
    opens (a larger one raises DecompressionBombError: "too large" below), and the warning would be a stray line on
    stderr beside lora_kit's own output."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


@contextlib.contextmanager
def decoded(path: Path, animated_ok: bool = False):
    """`path` opened and fully decoded (its first frame), for the `with` block; Rejected for what is not one readable
    image: not an image, too large (a decompression bomb), unreadable, corrupt, truncated, or animated (a GIF, APNG,
    WebP, AVIF or FLI with several frames, unless `animated_ok`). The one check of an image file: lora-ppim's inputs,
    lora-train's images and masks."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    # A library elsewhere may have switched this on globally; a half-grey truncated photo must not slip through.
    truncated_ok, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        try:
            img = open_quietly(path)
        except UnidentifiedImageError:
            raise Rejected("not an image", "PIL cannot identify the file format") from None
        except Image.DecompressionBombError as e:
            raise Rejected("too large", str(e)) from None
        except OSError as e:
            raise Rejected("unreadable", str(e)) from None
        with img:
            try:
                frames = getattr(img, "n_frames", 1)
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise Rejected("corrupt", str(e) or type(e).__name__) from None
            if frames > 1 and img.format in ANIMATED_FORMATS and not animated_ok:
                raise Rejected("animated", f"{img.format} with {frames} frames")
            try:
                img.load()
            except Image.DecompressionBombError as e:
                raise Rejected("too large", str(e)) from None
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                msg = str(e) or type(e).__name__
                raise Rejected("truncated" if "truncated" in msg else "corrupt", msg) from None
            yield img
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def upright(img):
    """(`img` turned by its EXIF orientation, None); for a malformed EXIF block, which must not lose the photo,
    (`img` as stored, why). lora-ppim and lora-train both turn images by this."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img), None
    except Exception as e:
        return img, f"EXIF orientation unreadable ({e}); used as stored"


def open_image(path: Path, background: tuple[int, int, int], min_size: int) -> Loaded:
    """Decode `path` fully and return it as RGB, upright; raise Rejected for anything that is not a usable photo."""
    with decoded(path) as img:
        loaded = Loaded(None)
        turned, warning = upright(img)
        loaded.warnings += [warning] if warning else []
        loaded.image = to_rgb(turned, background, loaded.warnings)
    w, h = loaded.image.size
    if min(w, h) < min_size:
        raise Rejected("too small", f"{w}x{h}: shorter side below --min-size {min_size}")
    return loaded


def to_rgb(img, background: tuple[int, int, int], warnings: list[str]):
    """8-bit RGB from any PIL mode: 16-bit scaled (not clipped), ICC profile applied, alpha over `background`.

    The alpha (a channel, or a PNG tRNS colour key) is taken first and composited last: the 16-bit rescale and the
    ICC conversion make new images that carry neither."""
    import numpy as np
    from PIL import Image

    icc = img.info.get("icc_profile")
    alpha = _alpha(img)
    if img.mode in _HIGH_BIT_MODES:
        a = np.asarray(img).astype(np.float64)
        # PIL's own convert("L") clips 16-bit values at 255 (an all-white photo); scale the 16-bit range instead.
        if img.mode != "I" or a.max() > 255:
            a = a / 257.0
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        a = a * 255.0 if a.max() <= 1.0 else a
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    elif img.mode not in ("RGB", "CMYK", "L"):
        try:  # via RGBA where there is alpha: PIL warns about P -> RGB with a transparent palette entry
            img = img.convert("RGBA").convert("RGB") if alpha is not None else img.convert("RGB")
        except (ValueError, OSError) as e:
            raise Rejected("unsupported mode", f"PIL mode {img.mode}: {e}") from None
    if icc:
        img = _apply_icc(img, icc, warnings)
    img = img.convert("RGB")
    if alpha is None:
        return img
    return Image.composite(img, Image.new("RGB", img.size, background), alpha)


def _alpha(img):
    """The opacity of `img` as an 8-bit L image, or None when it is opaque: its alpha channel, or 255 except where
    a pixel equals the PNG colour key (tRNS), compared at the stored bit depth."""
    import numpy as np
    from PIL import Image

    if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
        return None
    if img.mode in _HIGH_BIT_MODES:
        opaque = np.asarray(img) != img.info["transparency"]
        return Image.fromarray(np.where(opaque, 255, 0).astype(np.uint8), "L")
    try:
        return img.convert("RGBA").getchannel("A")
    except (ValueError, OSError) as e:
        raise Rejected("unsupported mode", f"PIL mode {img.mode} with transparency: {e}") from None


def _apply_icc(img, icc: bytes, warnings: list[str]):
    """Convert from the embedded colour profile to sRGB (CMYK, Adobe RGB, Display P3 photos look right)."""
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(src).lower().replace(" ", ""):
            return img  # already what we write
        return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        warnings.append(f"embedded ICC profile not applied ({e}); colours converted without it")
        return img
