"""preprocess step: decode and resize every labelled image once.

Output (other steps depend on this layout):

    OUT/images/<image_id>.jpg     RGB JPEG, quality 95, short side exactly `size`
    OUT/manifest.csv              image,label,class_name,src_file,src_format,src_mode,
                                  src_width,src_height,width,height,src_sha256
    OUT/preprocess_report.json    counts, corrupt files, unlabelled images, labels without
                                  images, seconds, images/s

Small images are upscaled too, so every output has the same short side and training's
224 crop always fits. Source sizes are as displayed (after EXIF orientation).

Re-running skips an image whose source sha256 and target size match the manifest. New
images are written to a staging folder and moved in only when the whole step succeeds, so
a failure (a corrupt file without --skip-corrupt) leaves OUT as it was.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from tqdm import tqdm

from components import atomic
from components.labels import image_index, read_labels, reconcile

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image", "label", "class_name", "src_file", "src_format", "src_mode",
                    "src_width", "src_height", "width", "height", "src_sha256"]
# Pillow's own default (~89 MP); ISIC's largest images are 6000x4000 = 24 MP.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
JPEG_QUALITY = 95


class CorruptImageError(ValueError):
    """An image cannot be decoded (corrupt, truncated, not an image, or a decompression bomb)."""


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


def prepare_image(data: bytes, size: int, *, draft: bool = True,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, dict]:
    """Decode encoded image bytes into an RGB image with short side `size`, plus source facts."""
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # Pillow's own guard, at twice its limit
        raise CorruptImageError(f"decompression bomb guard: {err}") from None
    with opened as im:
        raw_w, raw_h = im.size
        if raw_w * raw_h > max_pixels:
            raise CorruptImageError(
                f"decompression bomb guard: {raw_w}x{raw_h} = {raw_w * raw_h:,} pixels "
                f"exceeds the limit of {max_pixels:,} (--max-pixels)")
        info = {"src_format": im.format, "src_mode": im.mode}
        orientation = im.getexif().get(0x0112, 1)
        rotated = orientation in (5, 6, 7, 8)  # EXIF orientations that swap width and height
        width, height = (raw_h, raw_w) if rotated else (raw_w, raw_h)
        out_w, out_h = target_size(width, height, size)
        if draft and im.format in ("JPEG", "MPO"):  # MPO: multi-picture JPEG from cameras
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the target size.
            im.draft(None, (out_h, out_w) if rotated else (out_w, out_h))
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        resized = to_rgb(im).resize((out_w, out_h), Image.Resampling.LANCZOS)
    return resized, {**info, "src_width": width, "src_height": height, "width": out_w, "height": out_h}


def _process_one(job: dict) -> dict:
    """Worker: hash, skip if unchanged, else convert one image into the staging folder."""
    src = Path(job["src"])
    data = src.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    result = {"image": job["image"], "src_file": src.name, "src_sha256": sha}
    if sha == job["known_sha256"]:
        return {**result, "status": "unchanged"}
    try:
        im, info = prepare_image(data, job["size"], draft=job["draft"], max_pixels=job["max_pixels"])
    except (OSError, ValueError, SyntaxError) as err:
        # Pillow reports truncated/unreadable files as OSError (UnidentifiedImageError is one).
        return {**result, "status": "corrupt", "error": f"{type(err).__name__}: {err}"}
    im.save(Path(job["staging"]) / f"{job['image']}.jpg", "JPEG", quality=JPEG_QUALITY)
    return {**result, **info, "status": "converted"}


def _previous_manifest(out: Path, size: int) -> pd.DataFrame:
    """Rows of an earlier run whose output exists and has this run's short side."""
    path = out / "manifest.csv"
    if not path.is_file():
        return pd.DataFrame(columns=MANIFEST_COLUMNS).set_index("image")
    prev = pd.read_csv(path, dtype={"image": str}).set_index("image")
    exists = np.array([(out / "images" / f"{image}.jpg").is_file() for image in prev.index], dtype=bool)
    still_valid = (prev[["width", "height"]].min(axis=1) == size).to_numpy() & exists
    return prev[still_valid]


def _map(jobs: list[dict], workers: int, stop_on_corrupt: bool):
    """Yield worker results over a process pool (inline for one worker); stop early on demand."""
    bar = tqdm(total=len(jobs), desc="preprocess", unit="img", disable=None)
    if workers <= 1:
        results = map(_process_one, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_process_one, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers))))
    try:
        for result in results:
            bar.update()
            yield result
            if stop_on_corrupt and result["status"] == "corrupt":
                return
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def run(labels: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
        size: int = 256, workers: int | None = None, skip_corrupt: bool = False,
        draft: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Resize every labelled image in `images` into `out`; return the report's counts."""
    start = time.perf_counter()
    images, out = Path(images), Path(out)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if (out / "images").resolve() == images.resolve() or out.resolve() == images.resolve():
        raise ValueError(f"output {out} would overwrite the source images in {images}")
    table = read_labels(labels)
    found = image_index(images)
    missing, unlabelled = reconcile(table, found)
    n_labels = len(table)
    if missing:
        log.warning("%d labelled images are not in %s (listed in the report)", len(missing), images)
    table = table[table["image"].isin(found)].set_index("image")

    prev = _previous_manifest(out, size)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        jobs = [{"image": image, "src": str(found[image]), "staging": str(staging), "size": size,
                 "draft": draft, "max_pixels": max_pixels,
                 "known_sha256": prev["src_sha256"].get(image)}
                for image in table.index]
        workers = workers or os.cpu_count() or 1
        results = list(_map(jobs, workers, stop_on_corrupt=not skip_corrupt))
        corrupt = [{"image": r["image"], "file": str(found[r["image"]]), "error": r["error"]}
                   for r in results if r["status"] == "corrupt"]
        if corrupt and not skip_corrupt:
            bad = corrupt[0]
            shutil.rmtree(staging)
            if created:
                out.rmdir()  # leave no trace of a failed first run
            raise CorruptImageError(f"{bad['file']} (image {bad['image']}): {bad['error']}; "
                                    "nothing was written (use --skip-corrupt to exclude and list bad files)")
        rows = _manifest_rows(results, prev, table)
        _commit(staging, out, rows, prev)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    converted = sum(r["status"] == "converted" for r in results)
    seconds = time.perf_counter() - start
    report = {
        "size": size,
        "counts": {"labels": n_labels, "images_found": len(found), "in_manifest": len(rows),
                   "converted": converted, "unchanged": sum(r["status"] == "unchanged" for r in results),
                   "corrupt": len(corrupt), "unlabelled_images": len(unlabelled),
                   "labels_without_images": len(missing)},
        "corrupt": corrupt,
        "unlabelled_images": unlabelled,
        "labels_without_images": missing,
        "workers": workers,
        "draft": draft,
        "seconds": round(seconds, 3),
        "images_per_second": round(converted / seconds, 2) if seconds > 0 else None,
    }
    atomic.write_json(out / "preprocess_report.json", report)
    return {"out": str(out), **report["counts"], "seconds": report["seconds"],
            "images_per_second": report["images_per_second"]}


def _manifest_rows(results: list[dict], prev: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Manifest: converted rows from this run, unchanged rows from the last; labels always current."""
    rows = []
    for r in results:
        if r["status"] == "converted":
            rows.append(r)
        elif r["status"] == "unchanged":
            rows.append({**prev.loc[r["image"]].to_dict(), "image": r["image"]})
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).set_index("image").sort_index()
    manifest["label"] = table["label"]
    manifest["class_name"] = table["class_name"]
    return manifest.reset_index()[MANIFEST_COLUMNS]


def _commit(staging: Path, out: Path, manifest: pd.DataFrame, prev: pd.DataFrame) -> None:
    """Move staged images into OUT/images, drop outputs of images no longer listed, write the manifest."""
    final = out / "images"
    final.mkdir(exist_ok=True)
    for path in staging.iterdir():
        os.replace(path, final / path.name)
    for image in set(prev.index) - set(manifest["image"]):
        (final / f"{image}.jpg").unlink(missing_ok=True)
    with atomic.atomic_path(out / "manifest.csv") as tmp:
        manifest.to_csv(tmp, index=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="labels CSV (any accepted format)")
    parser.add_argument("--images", required=True, help="folder of raw images <id>.jpg/.jpeg/.png")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=int, default=256, help="short side after resizing (default 256)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--skip-corrupt", action="store_true", help="exclude unreadable images and list them in the report")
    parser.add_argument("--no-draft", dest="draft", action="store_false", help="decode JPEGs at full size (slower)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit in pixels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run(args.labels, args.images, args.out, size=args.size, workers=args.workers,
                 skip_corrupt=args.skip_corrupt, draft=args.draft, max_pixels=args.max_pixels)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
