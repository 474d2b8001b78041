"""Images that are not dermoscopy, rendered at run time (no download): the real photographs
scikit-image ships (skimage.data: a person, a cat, coffee, a rocket, text, the moon, a
retina, a microscopy slide, textures, ...), uniform noise and flat frames. evaluate reports
how well the OOD score separates the test split from these."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# skimage.data photographs bundled with the package (the others need a download).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "page", "text",
          "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "grass",
          "gravel", "brick", "clock")
FLAT_COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128),
                "skin_tone": (224, 172, 150)}
N_NOISE = 4
SIZE = 512


def images(seed: int = 0) -> dict[str, Image.Image]:
    """{name: RGB image} of the photographs, noise frames and flat frames."""
    import skimage.data

    out = {}
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        out[f"photo_{name}"] = Image.fromarray(array).convert("RGB")
    rng = np.random.default_rng(seed)
    for i in range(N_NOISE):
        out[f"noise_{i}"] = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    for name, colour in FLAT_COLOURS.items():
        out[f"flat_{name}"] = Image.new("RGB", (SIZE, SIZE), colour)
    return out


def png_bytes(image: Image.Image) -> bytes:
    """The image encoded as PNG: what a client would send the served model."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
