"""preprocess: odd image modes accepted, bad files rejected by name, nothing half-written, re-runs skip."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components import preprocess
from components.common.images import CorruptImageError, prepare_image
from components.common.labels import CLASSES
from components.preprocess import MANIFEST_COLUMNS

SIZE = 64


def noisy(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_labels(folder: Path, images: list[str]) -> Path:
    csv = folder / "labels.csv"
    csv.write_text("image,label\n" + "".join(f"{image},{i % len(CLASSES)}\n" for i, image in enumerate(images)))
    return csv


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; there is no pixel data to decompress."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def truncated_jpeg(size=(800, 600)) -> bytes:
    buffer = io.BytesIO()
    noisy(size).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def odd_images(tmp_path) -> tuple[Path, Path]:
    """Images in every awkward form preprocess must accept."""
    src = tmp_path / "raw"
    src.mkdir()
    noisy((120, 90)).save(src / "rgb.jpg", quality=90)
    noisy((120, 90)).save(src / "png_named_jpg.jpg", "PNG")
    noisy((120, 90)).convert("CMYK").save(src / "cmyk.jpg", quality=90)
    Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)).save(src / "grey16.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(src / "tiny.png")
    noisy((50, 40)).convert("L").save(src / "grey.jpeg")
    noisy((50, 40)).convert("LA").save(src / "grey_alpha.png")
    noisy((50, 40)).convert("P").save(src / "palette.png")
    Image.new("RGBA", (50, 40), (0, 0, 0, 0)).save(src / "transparent.png")
    noisy((1600, 1200)).save(src / "large.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed: stored 80x40 shows as 40x80
    noisy((80, 40)).save(src / "rotated.jpg", exif=exif)
    names = sorted(p.stem for p in src.iterdir())
    return write_labels(tmp_path, names), src


def test_accepts_every_mode_and_writes_the_layout(odd_images, tmp_path):
    labels, src = odd_images
    out = tmp_path / "out"
    result = preprocess.run(labels, src, out, size=SIZE, workers=1)
    assert result["converted"] == result["in_manifest"] == 11

    manifest = pd.read_csv(out / "manifest.csv").set_index("image")
    assert list(manifest.reset_index().columns) == MANIFEST_COLUMNS
    for image, row in manifest.iterrows():
        with Image.open(out / "images" / f"{image}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (row.width, row.height)
            assert min(im.size) == SIZE
    assert tuple(manifest.loc["rotated", ["src_width", "src_height", "width", "height"]]) == (40, 80, 64, 128)
    assert tuple(manifest.loc["tiny", ["width", "height"]]) == (64, 64)  # upscaled, by design
    assert tuple(manifest.loc["large", ["width", "height"]]) == (85, 64)
    assert manifest.loc["cmyk", "src_mode"] == "CMYK"
    assert manifest.loc["png_named_jpg", "src_format"] == "PNG"
    with Image.open(out / "images" / "grey16.jpg") as im:  # 16-bit white stays white, not clipped junk
        assert np.asarray(im).min() >= 250
    with Image.open(out / "images" / "transparent.jpg") as im:  # transparency becomes white
        assert np.asarray(im).min() >= 250
    report = json.loads((out / "preprocess_report.json").read_text())
    assert report["counts"]["corrupt"] == 0 and report["size"] == SIZE
    assert report["images_per_second"] > 0


def test_rerun_skips_unchanged_and_redoes_changed(odd_images, tmp_path):
    labels, src = odd_images
    out = tmp_path / "out"
    preprocess.run(labels, src, out, size=SIZE, workers=1)
    again = preprocess.run(labels, src, out, size=SIZE, workers=1)
    assert (again["converted"], again["unchanged"]) == (0, 11)

    noisy((120, 90), seed=9).save(src / "rgb.jpg", quality=90)
    changed = preprocess.run(labels, src, out, size=SIZE, workers=1)
    assert (changed["converted"], changed["unchanged"]) == (1, 10)
    resized = preprocess.run(labels, src, out, size=SIZE + 8, workers=1)
    assert resized["converted"] == 11


def test_labels_without_images_and_unlabelled_images_are_reported(odd_images, tmp_path):
    labels, src = odd_images
    labels.write_text(labels.read_text() + "ghost,0\n")
    noisy((30, 30)).save(src / "stray.jpg")
    out = tmp_path / "out"
    result = preprocess.run(labels, src, out, size=SIZE, workers=1)
    report = json.loads((out / "preprocess_report.json").read_text())
    assert report["labels_without_images"] == ["ghost"]
    assert report["unlabelled_images"] == ["stray"]
    assert result["in_manifest"] == 11


@pytest.mark.parametrize("bad_name, data, match", [
    ("truncated", truncated_jpeg(), "truncated"),
    ("truncated_small", truncated_jpeg((120, 90)), "truncated"),
    ("empty", b"", "cannot identify image file"),
    ("bomb", bomb_png(20000, 20000), "decompression bomb"),
    ("symlink_loop", None, "Too many levels of symbolic links"),  # None: a link to itself
])
def test_bad_file_fails_by_name_and_leaves_nothing(tmp_path, bad_name, data, match):
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(3):
        noisy((60, 40), seed=i).save(src / f"ok{i}.jpg")
    bad = src / f"{bad_name}.{'png' if bad_name == 'bomb' else 'jpg'}"
    if data is None:
        bad.symlink_to(bad.name)
    else:
        bad.write_bytes(data)
    labels = write_labels(tmp_path, [f"ok{i}" for i in range(3)] + [bad_name])

    out = tmp_path / "out"
    with pytest.raises(CorruptImageError, match=match) as info:
        preprocess.run(labels, src, out, size=SIZE, workers=1)
    assert bad_name in str(info.value) and " at 0x" not in str(info.value)  # no heap address
    assert not out.exists()  # a failed first run leaves no trace

    # A failed re-run leaves the earlier good output exactly as it was.
    (tmp_path / "good").mkdir()
    good = write_labels(tmp_path / "good", [f"ok{i}" for i in range(3)])
    preprocess.run(good, src, out, size=SIZE, workers=1)
    before = snapshot(out)
    with pytest.raises(CorruptImageError):
        preprocess.run(labels, src, out, size=SIZE, workers=1)
    assert snapshot(out) == before
    assert not list(out.glob(".*"))  # no staging folder or temporary files

    # --skip-corrupt: excluded and listed.
    result = preprocess.run(labels, src, out, size=SIZE, workers=1, skip_corrupt=True)
    report = json.loads((out / "preprocess_report.json").read_text())
    assert [c["image"] for c in report["corrupt"]] == [bad_name]
    assert match in report["corrupt"][0]["error"]
    assert result["in_manifest"] == 3 and result["corrupt"] == 1
    assert not (out / "images" / f"{bad_name}.jpg").exists()


def test_low_pixel_limit_is_a_bomb(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    noisy((100, 100)).save(src / "a.jpg")
    labels = write_labels(tmp_path, ["a"])
    with pytest.raises(CorruptImageError, match="10,000 pixels exceeds the limit of 9,999"):
        preprocess.run(labels, src, tmp_path / "out", size=SIZE, workers=1, max_pixels=9_999)


def test_refuses_to_write_over_its_sources(tmp_path):
    src = tmp_path / "data" / "images"
    src.mkdir(parents=True)
    noisy((60, 40)).save(src / "a.jpg")
    labels = write_labels(tmp_path, ["a"])
    for out in (src, src.parent):
        with pytest.raises(ValueError, match="overwrite the source images"):
            preprocess.run(labels, src, out, size=SIZE, workers=1)


def test_cli_with_skip_corrupt(tmp_path, capsys):
    src = tmp_path / "raw"
    src.mkdir()
    noisy((60, 40)).save(src / "a.jpg")
    (src / "b.jpg").write_bytes(b"")
    labels = write_labels(tmp_path, ["a", "b"])
    code = preprocess.main(["--labels", str(labels), "--images", str(src), "--out", str(tmp_path / "out"),
                            "--size", "32", "--workers", "1", "--skip-corrupt"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["corrupt"] == 1


def test_shared_ham_images_in_parallel(shared_data, tmp_path):
    ham = shared_data / "ham10000-200x150"
    labels = tmp_path / "labels.csv"
    labels.write_text("".join((ham / "labels.csv").read_text().splitlines(keepends=True)[:301]))
    out = tmp_path / "out"
    result = preprocess.run(labels, ham / "images", out, size=SIZE, workers=2)
    assert result["converted"] == result["in_manifest"] == 300
    manifest = pd.read_csv(out / "manifest.csv")
    info = pd.read_csv(ham / "image_info.csv").set_index("image")
    assert (manifest["src_sha256"] == info.loc[manifest["image"], "sha256"].to_numpy()).all()
    assert set(zip(manifest["width"], manifest["height"])) == {(85, 64)}
    assert len(list((out / "images").iterdir())) == 300


def test_corrupt_file_stops_a_parallel_run(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(6):
        noisy((60, 40), seed=i).save(src / f"ok{i}.jpg")
    (src / "bad.jpg").write_bytes(truncated_jpeg((120, 90)))
    labels = write_labels(tmp_path, ["bad"] + [f"ok{i}" for i in range(6)])
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        preprocess.run(labels, src, tmp_path / "out", size=SIZE, workers=2)
    assert not (tmp_path / "out").exists()


# -- colour constancy (Shades of Gray) --------------------------------------------------------
def _minkowski(image, p=6.0):
    x = np.asarray(image, dtype=np.float64)
    return np.power(np.mean(np.power(x, p), axis=(0, 1)), 1 / p)


def test_shades_of_gray_leaves_a_neutral_image_and_neutralises_a_cast():
    from components.common.images import shades_of_gray

    rng = np.random.default_rng(0)
    grey = rng.integers(40, 220, (30, 40, 1), dtype=np.uint8).repeat(3, axis=2)
    neutral = Image.fromarray(grey)  # equal channels: equal p-norms
    assert np.array_equal(np.asarray(shades_of_gray(neutral)), grey)
    cast = (grey * np.array([1.0, 0.75, 0.55])).round().astype(np.uint8)  # a warm dermoscope
    norms = _minkowski(cast)
    assert norms.max() / norms.min() > 1.7
    fixed = _minkowski(shades_of_gray(Image.fromarray(cast)))
    assert fixed.max() / fixed.min() < 1.02, fixed  # the illuminant is grey again


def test_colour_constancy_in_preprocess_and_in_the_served_model_gives_the_same_pixels(tmp_path):
    """The served model prepares an image exactly as preprocess prepared the training images,
    colour constancy included, by reading the model's own preprocessing.json."""
    from components.registry import serving
    from components.training.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
    from model import HybridConvNeXtV2

    src = tmp_path / "raw"
    src.mkdir()
    rng = np.random.default_rng(1)
    pixels = (rng.integers(0, 255, (90, 120, 3)) * np.array([1.0, 0.7, 0.5])).astype(np.uint8)
    Image.fromarray(pixels).save(src / "a.png")
    (tmp_path / "labels.csv").write_text("image,label\na,MEL\n")
    out = tmp_path / "prep"
    preprocess.run(tmp_path / "labels.csv", src, out, size=40, workers=1,
                   color_constancy="shades_of_gray")
    report = json.loads((out / "preprocess_report.json").read_text())
    assert report["color_constancy"] == "shades_of_gray" and report["minkowski_p"] == 6.0
    prepared = Image.open(out / "images" / "a.jpg").convert("RGB")
    norms = _minkowski(prepared)
    assert norms.max() / norms.min() < 1.1  # neutralised (JPEG quality 95 adds a little)

    net = HybridConvNeXtV2(num_classes=len(CLASSES), preset="tiny").eval()
    meta = {"model_config": net.config, "classes": list(CLASSES), "img_size": 32,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "prepare_size": 40,
            "color_constancy": report["color_constancy"], "minkowski_p": report["minkowski_p"]}
    serving.write_artifacts(net.state_dict(), meta, tmp_path / "model")
    served = serving.load_local(tmp_path / "model").preprocess((src / "a.png").read_bytes())
    again, _ = prepare_image((src / "a.png").read_bytes(), 40, color="shades_of_gray")
    torch.testing.assert_close(served, eval_transform(32)(again))
    # and preprocess wrote exactly that image (as JPEG, quality 95) for training to read
    buffer = io.BytesIO()
    again.save(buffer, "JPEG", quality=preprocess.JPEG_QUALITY)
    assert np.array_equal(np.asarray(Image.open(buffer)), np.asarray(prepared))


def test_changing_colour_constancy_redoes_every_image(odd_images, tmp_path):
    labels, src = odd_images
    out = tmp_path / "out"
    preprocess.run(labels, src, out, size=SIZE, workers=1)
    again = preprocess.run(labels, src, out, size=SIZE, workers=1, color_constancy="shades_of_gray")
    assert again["unchanged"] == 0 and again["converted"] > 0
