"""Decoding an image the way the pipeline does, once for preprocess and again for the served
model, so that both see the same pixels: decode (Pillow draft for big JPEGs, a decompression
bomb guard), EXIF orientation, any mode to 8-bit RGB, resize the short side, and optionally
colour constancy.

Colour constancy (Shades of Gray, Finlayson & Trezzi, CIC 2004): the illuminant is estimated
per channel as the Minkowski p-norm of its pixels (p = 1 is grey world, p -> inf max-RGB;
p = 6 as the ISIC 2018/2019 winners used), and each channel is scaled so that the illuminant
becomes neutral grey: dermoscopes of different sites cast different colours.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from components.common.config import COLOR_CONSTANCY

# Pillow's own default (~89 MP); ISIC's largest images are 6000x4000 = 24 MP.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class CorruptImageError(ValueError):
    """An image cannot be decoded (corrupt, truncated, not an image, or a decompression bomb)."""


def resize_size(img_size: int) -> int:
    """Short side before the centre crop to img_size: the usual 256/224 ratio (256 for 224)."""
    return round(img_size * 256 / 224)


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the short side exactly `size` and the aspect ratio kept."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent areas become white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: Pillow's convert() clips at 255, so scale 0-65535 down instead.
        grey = (np.asarray(im, dtype=np.float32) / 257.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return background
    return im.convert("RGB")  # CMYK, L, 1, YCbCr, ...


def open_image(data: bytes, size: int, *, draft: bool = True,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, dict]:
    """Read only the header of encoded image bytes: the opened, not yet decoded image and
    {"src_format", "src_mode", "decoded_pixels"}, what decoding will cost (a JPEG is set to
    decode at the smallest 1/2, 1/4 or 1/8 scale not under the target size). `max_pixels`
    bounds the source's own size (the decompression bomb guard). finish_image decodes it.
    (No EXIF here: a PNG's getexif() decodes the whole image to look for it.)"""
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # Pillow's own guard, at twice its limit
        raise CorruptImageError(f"decompression bomb guard: {err}") from None
    raw_w, raw_h = im.size
    if raw_w * raw_h > max_pixels:
        im.close()
        raise CorruptImageError(
            f"decompression bomb guard: {raw_w}x{raw_h} = {raw_w * raw_h:,} pixels "
            f"exceeds the limit of {max_pixels:,} (--max_pixels)")
    info = {"src_format": im.format, "src_mode": im.mode}
    if draft and im.format in ("JPEG", "MPO"):  # MPO: multi-picture JPEG from cameras
        # target_size is the same turned by 90 degrees: no need to know the EXIF rotation
        im.draft(None, target_size(raw_w, raw_h, size))
    return im, {**info, "raw_size": (raw_w, raw_h), "decoded_pixels": im.size[0] * im.size[1]}


def finish_image(im: Image.Image, info: dict, size: int, color: str = "none",
                 minkowski_p: float = 6.0) -> tuple[Image.Image, dict]:
    """Decode an image from open_image: EXIF rotation, RGB, short side `size`, colour
    constancy; plus the source facts."""
    with im:
        orientation = im.getexif().get(0x0112, 1)
        raw_w, raw_h = info["raw_size"]
        rotated = orientation in (5, 6, 7, 8)  # EXIF orientations that swap width and height
        width, height = (raw_h, raw_w) if rotated else (raw_w, raw_h)
        out_w, out_h = target_size(width, height, size)
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        # reducing_gap: a box reduce by whole factors first, then Lanczos over the last 3x or
        # less (Pillow: indistinguishable from a plain Lanczos), 8x faster from 40 MP.
        resized = to_rgb(im).resize((out_w, out_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    facts = {"src_format": info["src_format"], "src_mode": info["src_mode"],
             "src_width": width, "src_height": height, "width": out_w, "height": out_h}
    return color_constancy(resized, color, minkowski_p), facts


def prepare_image(data: bytes, size: int, *, draft: bool = True,
                  max_pixels: int = DEFAULT_MAX_PIXELS, color: str = "none",
                  minkowski_p: float = 6.0) -> tuple[Image.Image, dict]:
    """Decode encoded image bytes into an RGB image with short side `size` (then colour
    constancy `color`, on the resized image), plus source facts."""
    im, info = open_image(data, size, draft=draft, max_pixels=max_pixels)
    return finish_image(im, info, size, color, minkowski_p)


def shades_of_gray(image: Image.Image, p: float = 6.0) -> Image.Image:
    """The image with its Minkowski p-norm illuminant made neutral (see the module docstring).
    An image whose channels already have equal p-norms comes back unchanged."""
    x = np.asarray(image, dtype=np.float64)
    illuminant = np.power(np.mean(np.power(x, p), axis=(0, 1)), 1.0 / p)
    norm = np.linalg.norm(illuminant)
    if norm == 0:  # a black image has no colour cast
        return image
    gain = norm / (np.sqrt(3.0) * np.maximum(illuminant, 1e-6))
    return Image.fromarray(np.clip(np.rint(x * gain), 0, 255).astype(np.uint8), "RGB")


def color_constancy(image: Image.Image, method: str = "none", p: float = 6.0) -> Image.Image:
    if method == "none":
        return image
    if method == "shades_of_gray":
        return shades_of_gray(image, p)
    raise ValueError(f"unknown colour constancy {method!r}; choose from {COLOR_CONSTANCY}")
