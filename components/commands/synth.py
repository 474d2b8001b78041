"""Synthetic ISIC-format dataset for the demo and the tests (`skinlesion synth --n 400 --out DIR`).

Writes DIR/images/<id>.jpg, DIR/labels.csv (one-hot floats in the official ground-truth
column order, UNK included) and DIR/metadata.csv (image,lesion_id,age_approx,
anatom_site_general,sex). Each image is a dermoscopy-like picture: a skin-tone background
with a dark vignette and a lesion whose colour, shape and texture depend on its class, so a
small model learns it in a few CPU epochs. Several images show the same lesion (shifted,
scaled, rotated), as in ISIC, which makes lesion-grouped splits matter.

Class counts follow ISIC 2019's imbalance (NV most common) above a floor of 6% per class and
at least 20 lesions per class where the class has 20 images, so that at n=400 a 70/15/15
lesion-grouped split (20 folds) has every class in every split. Same seed, same bytes.

`--sources K` spreads the lesions over K sites (SITEA, SITEB, ...: the lesion ids' prefix, as
ISIC's BCN_/HAM_/MSK4_) and gives each site its dermoscope's colour cast, so that cross-site
evaluation and colour constancy have something to measure.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components.common import atomic, cli_args
from components.common.labels import CLASSES, UNKNOWN

# ISIC 2019 training counts per class (CLASSES order), for the imbalance.
ISIC_COUNTS = np.array([4522, 12875, 3323, 867, 2624, 239, 253, 628])
MIN_SHARE = 0.06          # floor per class, so small classes still reach every split
MIN_LESIONS = 20          # one per fold of a 15%-step grouped split
IMAGES_PER_LESION = 1.8   # mean; ISIC has about two
SIZES = [(300, 225), (320, 240), (280, 210), (225, 300), (256, 256)]
SIZE_P = [0.55, 0.15, 0.10, 0.10, 0.10]
LARGE = (1600, 1200)      # a few big images exercise preprocess's JPEG draft path
SKIN = np.array([(236, 194, 170), (224, 172, 140), (198, 140, 108), (170, 112, 82), (241, 208, 186)], float)
SITES = ["anterior torso", "posterior torso", "lateral torso", "upper extremity",
         "lower extremity", "head/neck", "palms/soles", "oral/genital"]

# Per class: base colour, second colour, mean radius, axis ratio, border irregularity, edge softness.
LOOK = {
    "MEL": dict(c1=(70, 40, 30), c2=(25, 20, 25), radius=0.55, ratio=1.3, rough=0.14, edge=0.03),
    "NV": dict(c1=(150, 95, 60), c2=(110, 65, 40), radius=0.45, ratio=1.1, rough=0.02, edge=0.06),
    "BCC": dict(c1=(220, 150, 150), c2=(170, 30, 45), radius=0.5, ratio=1.3, rough=0.05, edge=0.08),
    "AK": dict(c1=(195, 105, 85), c2=(245, 235, 225), radius=0.5, ratio=1.2, rough=0.08, edge=0.1),
    "BKL": dict(c1=(180, 140, 95), c2=(95, 70, 45), radius=0.5, ratio=1.4, rough=0.04, edge=0.015),
    "DF": dict(c1=(140, 90, 65), c2=(240, 232, 222), radius=0.3, ratio=1.0, rough=0.03, edge=0.05),
    "VASC": dict(c1=(175, 25, 60), c2=(90, 20, 70), radius=0.4, ratio=1.0, rough=0.0, edge=0.02),
    "SCC": dict(c1=(228, 175, 165), c2=(240, 222, 150), radius=0.5, ratio=1.9, rough=0.06, edge=0.05),
}


def class_counts(n: int) -> np.ndarray:
    """Images per class: a floor for every class, the rest in ISIC proportions (largest remainder)."""
    floor = max(1, int(round(MIN_SHARE * n)))
    rest = n - floor * len(CLASSES)
    if rest < 0:
        raise ValueError(f"n={n} is too small: every one of the {len(CLASSES)} classes needs an image")
    share = rest * ISIC_COUNTS / ISIC_COUNTS.sum()
    extra = np.floor(share).astype(int)
    extra[np.argsort(extra - share)[: rest - extra.sum()]] += 1
    return floor + extra


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a small random grid upscaled bicubically."""
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32), "F")
    return np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC)).clip(0, 1)


def _lesion_params(rng: np.random.Generator, name: str) -> dict:
    """What stays the same across all images of one lesion."""
    look = LOOK[name]
    return {
        "name": name,
        "skin": SKIN[rng.integers(len(SKIN))] + rng.normal(0, 6, 3),
        "tint": rng.normal(1.0, 0.06, 3),
        "radius": look["radius"] * rng.uniform(0.8, 1.2),
        "harmonics": [(k, look["rough"] * rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)) for k in range(2, 8)],
        "lobes": rng.uniform(-0.35, 0.35, (rng.integers(3, 6), 2)),
        "stripe_angle": rng.uniform(0, np.pi),
    }


def render(rng: np.random.Generator, lesion: dict, width: int, height: int) -> np.ndarray:
    """One uint8 RGB image of `lesion` seen at a random shift, scale and rotation."""
    look = LOOK[lesion["name"]]
    half = min(width, height) / 2
    x = ((np.arange(width, dtype=np.float32) - width / 2) / half - rng.uniform(-0.12, 0.12))[None, :]
    y = ((np.arange(height, dtype=np.float32) - height / 2) / half - rng.uniform(-0.12, 0.12))[:, None]
    angle = rng.uniform(0, 2 * np.pi)
    u = x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))
    v = -x * np.float32(np.sin(angle)) + y * np.float32(np.cos(angle))
    radius = lesion["radius"] * rng.uniform(0.88, 1.12)

    # Shape: a rough ellipse, or a cluster of round lobes for vascular lesions.
    if lesion["name"] == "VASC":
        dist = np.min([np.hypot(u - a, v - b) / (radius * 0.6) for a, b in lesion["lobes"] * radius], axis=0)
        boundary = 1.0
    else:
        dist = np.hypot(u / look["ratio"] ** 0.5, v * look["ratio"] ** 0.5) / radius
        theta = np.arctan2(v, u)
        boundary = 1 + sum(a * np.cos(k * theta + phase) for k, a, phase in lesion["harmonics"])
    inside = 0.5 + 0.5 * np.tanh((boundary - dist) * radius / (2 * look["edge"]))  # soft-edged mask

    # Texture: how the two class colours mix inside the lesion.
    c1, c2 = np.array(look["c1"], np.float32), np.array(look["c2"], np.float32)
    name = lesion["name"]
    if name == "MEL":      # blotchy dark pigment with blue-grey veil
        mix = _smooth_noise(rng, height, width, 6)
        veil = (_smooth_noise(rng, height, width, 4) > 0.7)[..., None] * np.array([30, 45, 70], np.float32)
    elif name == "NV":     # fine regular pigment network
        f = 22 / radius
        mix = 0.5 * ((np.sin(u * f) * np.sin(v * f)) > 0.3)
    elif name == "BCC":    # thin branching vessels on pink
        a = lesion["stripe_angle"]
        wave = np.sin((u * np.cos(a) + v * np.sin(a)) * 18 + 3 * _smooth_noise(rng, height, width, 5))
        mix = (np.abs(wave) < 0.12).astype(np.float32)
    elif name == "AK":     # rough, scaly: white speckles
        mix = (rng.random((height, width), dtype=np.float32) > 0.85) * 0.8
    elif name == "BKL":    # cobblestone with dark comedo-like dots
        f = 14 / radius
        mix = ((np.cos(u * f) + np.cos(v * f)) > 1.4).astype(np.float32)
    elif name == "DF":     # central white scar inside a brown ring
        mix = 0.5 - 0.5 * np.tanh((dist - 0.5) / 0.16)
    elif name == "VASC":   # red-purple lobes with dark lacunae
        mix = _smooth_noise(rng, height, width, 8) ** 2
    else:                  # SCC: yellow keratin crust in the centre of a pink nodule
        mix = np.clip(1.4 - 1.6 * dist, 0, 1) * (0.6 + 0.4 * _smooth_noise(rng, height, width, 10))
    lesion_rgb = c1 + np.asarray(mix, np.float32)[..., None] * (c2 - c1)
    if name == "MEL":
        lesion_rgb = lesion_rgb + veil
    lesion_rgb = lesion_rgb * lesion["tint"].astype(np.float32)

    skin = lesion["skin"].astype(np.float32) * (0.92 + 0.16 * _smooth_noise(rng, height, width, 3))[..., None]
    image = skin + inside[..., None] * (lesion_rgb - skin)
    vignette = np.clip(1.25 - 0.35 * np.hypot(x, y) ** 2, 0.15, 1).astype(np.float32)  # dermatoscope's dark rim
    image = image * (vignette * np.float32(rng.uniform(0.9, 1.1)))[..., None]
    return image.clip(0, 255).astype(np.uint8)


def picture(rng: np.random.Generator, lesion: dict, width: int, height: int) -> np.ndarray:
    """`render` at up to 400 px wide, upscaled to the asked size (cheap large images), plus sensor noise."""
    scale = min(1.0, 400 / max(width, height))
    pixels = render(rng, lesion, round(width * scale), round(height * scale))
    if scale < 1:
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * 5
    return (pixels + noise).clip(0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


SITE_CASTS = ((1.0, 1.0, 1.0), (1.08, 0.92, 0.78), (0.85, 0.95, 1.12), (1.0, 0.82, 0.9))


def run(out: str | os.PathLike, n: int = 400, seed: int = 0, overwrite: bool = False,
        sources: int = 1) -> dict:
    """Write an n-image synthetic dataset into `out` (must be empty unless `overwrite`);
    `sources` > 1: lesions spread over that many sites, each with its own colour cast."""
    if not 1 <= sources <= len(SITE_CASTS):
        raise ValueError(f"sources must be 1 to {len(SITE_CASTS)}, got {sources}")
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--force) to replace its dataset")
        shutil.rmtree(out / "images", ignore_errors=True)
    rng = np.random.default_rng(seed)

    # Lesions per class, then images spread over them: every lesion gets one, the rest at random.
    counts = class_counts(n)
    image_lesion = []
    for k, count in enumerate(counts):
        n_lesions = max(min(count, MIN_LESIONS), int(round(count / IMAGES_PER_LESION)))
        extra = rng.integers(0, n_lesions, count - n_lesions)
        image_lesion += [(k, j) for j in range(n_lesions)] + [(k, int(j)) for j in extra]
    order = rng.permutation(n)  # interleave classes and lesions in id order
    image_lesion = [image_lesion[i] for i in order]

    lesions = {key: _lesion_params(rng, CLASSES[key[0]]) for key in sorted(set(image_lesion))}
    site_of = {key: i % sources for i, key in enumerate(lesions)}  # every class at every site
    patients = {key: (int(rng.integers(4, 18) * 5), SITES[rng.integers(len(SITES))], ("male", "female")[rng.integers(2)])
                for key in lesions}
    sizes = [SIZES[i] for i in rng.choice(len(SIZES), n, p=SIZE_P)]
    for i in rng.choice(n, max(1, n // 100), replace=False):
        sizes[i] = LARGE

    image_dir = out / "images"
    labels, metadata = [], []
    for i, ((k, j), (width, height), child) in enumerate(zip(image_lesion, sizes, rng.spawn(n))):
        image = f"SYN_{i:06d}"
        pixels = picture(child, lesions[k, j], width, height)
        if sources > 1:  # the site's dermoscope
            cast = np.asarray(SITE_CASTS[site_of[k, j]], dtype=np.float32)
            pixels = np.clip(pixels * cast, 0, 255).astype(np.uint8)
        atomic.write_bytes(image_dir / f"{image}.jpg", _jpeg(pixels))
        labels.append([image] + [float(c == k) for c in range(len(CLASSES))] + [0.0])
        age, site, sex = patients[k, j]
        prefix = f"SITE{chr(65 + site_of[k, j])}" if sources > 1 else "SYNL"
        metadata.append([image, f"{prefix}_{k}{j:04d}", age, site, sex])

    with atomic.atomic_path(out / "labels.csv") as tmp:
        pd.DataFrame(labels, columns=["image", *CLASSES, UNKNOWN]).to_csv(tmp, index=False)
    with atomic.atomic_path(out / "metadata.csv") as tmp:
        pd.DataFrame(metadata, columns=["image", "lesion_id", "age_approx", "anatom_site_general", "sex"]
                     ).to_csv(tmp, index=False)
    return {"out": str(out), "n": n, "seed": seed, "lesions": len(lesions),
            "counts": dict(zip(CLASSES, counts.tolist())),
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="skinlesion synth", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="number of images (default 400)")
    parser.add_argument("--out", required=True, help="output folder (must be empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--sources", type=int, default=1,
                        help="sites the lesions come from, each with its colour cast (1-4)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.out, n=args.n, seed=args.seed, overwrite=args.force,
                         sources=args.sources), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
