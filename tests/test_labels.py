"""The one label reader: every accepted format, every rejected row, image lookup."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from components.common.labels import CLASSES, LabelError, find_image, read_labels, reconcile

ONE_HOT_HEADER = "image," + ",".join(CLASSES)


def write(path: Path, text: str, *, bom: bool = False, crlf: bool = False) -> Path:
    if crlf:
        text = text.replace("\n", "\r\n")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def one_hot(k: int, *, unk: float | None = None, fmt: str = "{:.1f}") -> str:
    values = [fmt.format(float(i == k)) for i in range(len(CLASSES))]
    return ",".join(values + ([fmt.format(unk)] if unk is not None else []))


def expect_error(path: Path, line: int | None, match: str, **kwargs) -> None:
    with pytest.raises(LabelError, match=match) as info:
        read_labels(path, **kwargs)
    assert str(path) in str(info.value)
    if line is not None:
        assert f"line {line}" in str(info.value)
        assert info.value.line == line


def test_integer_format_accepts_indices_and_names(tmp_path):
    csv = write(tmp_path / "l.csv", "image,label\na,0\nb,7\nc,NV\nd,scc\n")
    table = read_labels(csv)
    assert list(table.columns) == ["image", "label", "class_name"]
    assert table["label"].tolist() == [0, 7, 1, 7]
    assert table["class_name"].tolist() == ["MEL", "SCC", "NV", "SCC"]


def test_one_hot_integer_values(tmp_path):
    csv = write(tmp_path / "l.csv", f"{ONE_HOT_HEADER}\nx,{one_hot(2, fmt='{:.0f}')}\n")
    assert read_labels(csv)["class_name"].tolist() == ["BCC"]


def test_official_format_with_unk_bom_crlf_and_downsampled_ids(tmp_path):
    rows = [f"ISIC_0000017_downsampled,{one_hot(4, unk=0.0)}", f"ISIC_0024306,{one_hot(1, unk=0.0)}"]
    csv = write(tmp_path / "gt.csv", ONE_HOT_HEADER + ",UNK\n" + "\n".join(rows) + "\n", bom=True, crlf=True)
    table = read_labels(csv)
    assert table["image"].tolist() == ["ISIC_0000017_downsampled", "ISIC_0024306"]
    assert table["label"].tolist() == [4, 1]


def test_metadata_adds_lesion_ids_missing_ones_are_na(tmp_path):
    csv = write(tmp_path / "l.csv", "image,label\na,0\nb,1\nc,2\n")
    meta = write(tmp_path / "m.csv", "image,age_approx,lesion_id\na,50,L1\nb,40,\n", crlf=True, bom=True)
    table = read_labels(csv, metadata=meta)
    assert table["lesion_id"].iloc[0] == "L1"
    assert table["lesion_id"].isna().tolist() == [False, True, True]


@pytest.mark.parametrize("row, match", [
    ("b,1.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0", r"several classes \(MEL, SCC\)"),
    ("b," + ",".join(["0.0"] * 9), "no class"),
    (f"b,{one_hot(-1, unk=1.0)}", "UNK"),
    (f"b,{one_hot(0, unk=1.0)}", "several classes"),
    (f"b,{one_hot(0, unk=0.0).replace('1.0', '0.5')}", "must be 0 or 1"),
    (f"b,{one_hot(0, unk=0.0).replace('1.0', 'yes')}", "non-numeric"),
    (f"b,{one_hot(0)}", "non-numeric"),                     # a short row: UNK left empty
])
def test_bad_one_hot_rows_name_file_and_line(tmp_path, row, match):
    csv = write(tmp_path / "bad.csv", f"{ONE_HOT_HEADER},UNK\na,{one_hot(1, unk=0.0)}\n{row}\n")
    expect_error(csv, 3, match)


def test_unknown_class_in_integer_format(tmp_path):
    expect_error(write(tmp_path / "l.csv", "image,label\na,NV\nb,XYZ\n"), 3, "unknown class 'XYZ'")
    expect_error(write(tmp_path / "l.csv", "image,label\na,NV\nb,8\n"), 3, "unknown class '8'")


def test_unknown_class_column_in_one_hot_header(tmp_path):
    expect_error(write(tmp_path / "l.csv", f"{ONE_HOT_HEADER},FOO\na,{one_hot(1)},0\n"), 1, "unknown class or column 'FOO'")


def test_duplicate_id_names_both_lines(tmp_path):
    csv = write(tmp_path / "l.csv", "image,label\na,0\nb,1\na,2\n")
    expect_error(csv, 4, r"duplicate image id 'a' \(first on line 2\)")


@pytest.mark.parametrize("text, match", [("", "empty file"), ("image,label\n", "no rows"), ("\n\n", "empty file")])
def test_empty_files(tmp_path, text, match):
    expect_error(write(tmp_path / "l.csv", text), None, match)


def test_header_without_labels(tmp_path):
    expect_error(write(tmp_path / "l.csv", "image,MEL,NV\na,1,0\n"), 1, "missing BCC")


def test_missing_image_is_an_error_when_images_are_checked(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"x")
    (images / "b.PNG").write_bytes(b"x")
    csv = write(tmp_path / "l.csv", "image,label\na,0\nb,1\nc,2\n")
    expect_error(csv, 4, "image 'c' not found", images_dir=images)
    assert read_labels(csv)["image"].tolist() == ["a", "b", "c"]  # unchecked: fine


def test_find_image_and_reconcile(tmp_path):
    for name in ("a.jpg", "b.jpeg", "c.png", "d.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert find_image(tmp_path, "b") == tmp_path / "b.jpeg"
    assert find_image(tmp_path, "c") == tmp_path / "c.png"
    assert find_image(tmp_path, "d") == tmp_path / "d.JPG"
    with pytest.raises(FileNotFoundError, match="'notes'"):
        find_image(tmp_path, "notes")
    labels = pd.DataFrame({"image": ["a", "b", "x"]})
    assert reconcile(labels, tmp_path) == (["x"], ["c", "d"])


def test_shared_ham_labels(shared_data):
    table = read_labels(shared_data / "ham10000-200x150" / "labels.csv",
                        images_dir=shared_data / "ham10000-200x150" / "images")
    assert len(table) == 10013
    counts = table["class_name"].value_counts()
    assert counts["NV"] == 6703 and counts["DF"] == 115


def test_shared_official_ground_truth_with_unk_and_metadata(shared_data):
    meta = shared_data / "isic2019-meta"
    table = read_labels(meta / "ISIC_2019_Training_GroundTruth.csv", metadata=meta / "ISIC_2019_Training_Metadata.csv")
    assert len(table) == 25331
    assert table["label"].value_counts()[CLASSES.index("NV")] == 12875
    assert table["lesion_id"].notna().sum() == 23247
    assert table["image"].str.endswith("_downsampled").any()
