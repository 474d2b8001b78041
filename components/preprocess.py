"""preprocess step: decode and resize every labelled image once.

Output (other steps depend on this layout):

    OUT/images/<image_id>.jpg     RGB JPEG, quality 95, short side exactly `size`
    OUT/labels.csv                image,label of the images kept: what the split step reads
    OUT/metadata.csv              the --metadata rows of the images kept (when given)
    OUT/manifest.csv              image,label,class_name,src_file,src_format,src_mode,
                                  src_width,src_height,width,height,src_sha256
    OUT/preprocess_report.json    counts, corrupt files, unlabelled images, labels without
                                  images, seconds, images/s

Small images are upscaled too, so every output has the same short side and training's
224 crop always fits. Source sizes are as displayed (after EXIF orientation).

Re-running skips an image whose source sha256 and target size match the manifest. New
images are written to a staging folder and moved in only when the whole step succeeds, so
a failure (a corrupt file without --skip_corrupt) leaves OUT as it was; with it, every
unreadable file is listed in the report with the reason and left out of labels.csv, so no
later step ever sees it.
"""
from __future__ import annotations

import hashlib
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
from PIL import UnidentifiedImageError
from tqdm import tqdm

from components.common import atomic, cli_args, outputs
from components.common.config import ConfigError, PreprocessConfig
from components.common.images import DEFAULT_MAX_PIXELS, CorruptImageError, prepare_image
from components.common.labels import LabelError, image_index, read_labels, reconcile

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image", "label", "class_name", "src_file", "src_format", "src_mode",
                    "src_width", "src_height", "width", "height", "src_sha256"]
JPEG_QUALITY = 95


def _process_one(job: dict) -> dict:
    """Worker: hash, skip if unchanged, else convert one image into the staging folder."""
    src = Path(job["src"])
    result = {"image": job["image"], "src_file": src.name}
    try:
        data = src.read_bytes()
    except OSError as err:  # a symlink loop, no permission: as unreadable as a corrupt file
        return {**result, "status": "corrupt", "error": f"{type(err).__name__}: {err.strerror}"}
    result["src_sha256"] = hashlib.sha256(data).hexdigest()
    if result["src_sha256"] == job["known_sha256"]:
        return {**result, "status": "unchanged"}
    try:
        im, info = prepare_image(data, job["size"], draft=job["draft"], max_pixels=job["max_pixels"],
                                 color=job["color"], minkowski_p=job["minkowski_p"])
    except UnidentifiedImageError:  # Pillow's text names the BytesIO, a heap address
        return {**result, "status": "corrupt",
                "error": "UnidentifiedImageError: cannot identify image file (not an image "
                         "format Pillow reads)"}
    except (OSError, ValueError, SyntaxError) as err:
        # Pillow reports truncated/unreadable files as OSError.
        return {**result, "status": "corrupt", "error": f"{type(err).__name__}: {err}"}
    im.save(Path(job["staging"]) / f"{job['image']}.jpg", "JPEG", quality=JPEG_QUALITY)
    return {**result, **info, "status": "converted"}


def _previous_manifest(out: Path, cfg: PreprocessConfig) -> pd.DataFrame:
    """Rows of an earlier run whose output exists and was made with these settings (short
    side and colour constancy)."""
    path = out / outputs.MANIFEST
    report = out / outputs.PREPROCESS_REPORT
    earlier = json.loads(report.read_text()) if report.is_file() else {}
    same_colour = (earlier.get("color_constancy", "none"), earlier.get("minkowski_p", 6.0)) == \
        (cfg.color_constancy, cfg.minkowski_p)
    if not path.is_file() or not same_colour:
        return pd.DataFrame(columns=MANIFEST_COLUMNS).set_index("image")
    prev = pd.read_csv(path, dtype={"image": str}).set_index("image")
    exists = np.array([(out / outputs.PREPARED_IMAGES / f"{image}.jpg").is_file()
                       for image in prev.index], dtype=bool)
    still_valid = (prev[["width", "height"]].min(axis=1) == cfg.size).to_numpy() & exists
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


def run(labels: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
        config: PreprocessConfig | None = None, metadata: str | os.PathLike | None = None,
        workers: int | None = None, draft: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
        **settings) -> dict:
    """Resize every labelled image in `images` into `out`; return the report's counts.

    config (or settings such as size=, skip_corrupt=): params.yaml's `preprocess` section.
    metadata: the metadata CSV; its rows of the kept images are written beside the labels.
    """
    cfg = config or PreprocessConfig.from_dict(settings)
    size, skip_corrupt = cfg.size, cfg.skip_corrupt
    start = time.perf_counter()
    images, out = Path(images), Path(out)
    if (out / outputs.PREPARED_IMAGES).resolve() == images.resolve() or \
            out.resolve() == images.resolve():
        raise ValueError(f"output {out} would overwrite the source images in {images}")
    table = read_labels(labels)
    found = image_index(images)
    missing, unlabelled = reconcile(table, found)
    n_labels = len(table)
    if missing:
        log.warning("%d labelled images are not in %s (listed in the report)", len(missing), images)
    if len(missing) == n_labels:
        raise LabelError(labels, None, f"none of its {n_labels} images is in {images} (as "
                                       f"<id>.jpg/.jpeg/.png); nothing to preprocess")
    table = table[table["image"].isin(found)].set_index("image")

    prev = _previous_manifest(out, cfg)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        jobs = [{"image": image, "src": str(found[image]), "staging": str(staging), "size": size,
                 "draft": draft, "max_pixels": max_pixels, "color": cfg.color_constancy,
                 "minkowski_p": cfg.minkowski_p, "known_sha256": prev["src_sha256"].get(image)}
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
                                    "nothing was written (use --skip_corrupt to exclude and list bad files)")
        rows = _manifest_rows(results, prev, table)
        _commit(staging, out, rows, prev, _metadata_rows(metadata, rows["image"]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    converted = sum(r["status"] == "converted" for r in results)
    seconds = time.perf_counter() - start
    report = {
        "size": size,
        "color_constancy": cfg.color_constancy,
        "minkowski_p": cfg.minkowski_p,
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
    atomic.write_json(out / outputs.PREPROCESS_REPORT, report)
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


def _metadata_rows(metadata, kept: pd.Series) -> pd.DataFrame | None:
    """The metadata CSV's rows of the kept images (every column), or None without one."""
    if metadata is None:
        return None
    table = pd.read_csv(metadata, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if "image" not in table.columns:
        raise LabelError(metadata, None, "has no `image` column")
    return table[table["image"].isin(set(kept))]


def _commit(staging: Path, out: Path, manifest: pd.DataFrame, prev: pd.DataFrame,
            metadata: pd.DataFrame | None) -> None:
    """Move staged images into OUT/images, drop outputs of images no longer listed, write the
    manifest and the labels (and metadata) of the images kept: what the split step reads."""
    final = out / outputs.PREPARED_IMAGES
    final.mkdir(exist_ok=True)
    for path in staging.iterdir():
        os.replace(path, final / path.name)
    for image in set(prev.index) - set(manifest["image"]):
        (final / f"{image}.jpg").unlink(missing_ok=True)
    atomic.write_text(out / outputs.KEPT_LABELS, manifest[["image", "class_name"]]
                      .rename(columns={"class_name": "label"}).to_csv(index=False))
    if metadata is not None:
        atomic.write_text(out / outputs.KEPT_METADATA, metadata.to_csv(index=False))
    atomic.write_text(out / outputs.MANIFEST, manifest.to_csv(index=False))


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="python -m components.preprocess",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="labels CSV (any accepted format)")
    parser.add_argument("--images", required=True, help="folder of raw images <id>.jpg/.jpeg/.png")
    parser.add_argument("--metadata", help="metadata CSV (image, lesion_id, ...) to keep in step")
    parser.add_argument("--out", required=True, help="output folder")
    cli_args.add_params_flags(parser)
    cli_args.add_config_flags(parser, PreprocessConfig)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--no_draft", dest="draft", action="store_false",
                        help="decode JPEGs at full size (slower)")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="decompression-bomb limit in pixels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = PreprocessConfig.resolve(cli_args.params_paths(args),
                                       **cli_args.config_flags(args, PreprocessConfig))
        result = run(args.labels, args.images, args.out, config=cfg, metadata=args.metadata,
                     workers=args.workers, draft=args.draft, max_pixels=args.max_pixels)
    except (ConfigError, LabelError, CorruptImageError) as err:
        print(f"preprocess: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a read-only or full output folder, an unreadable input folder
        print(f"preprocess: {cli_args.os_error(err)}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
