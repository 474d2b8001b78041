"""class_weights: balanced inverse-frequency weights from the train split; a missing class is an error."""
from __future__ import annotations

import json

import numpy as np
import pytest

from components import class_weights
from components.labels import CLASSES, LabelError


def write_train(path, counts):
    rows = [f"img{k}_{i},{k}" for k, n in enumerate(counts) for i in range(n)]
    path.write_text("image,label\n" + "\n".join(rows) + "\n")
    return path


def test_balanced_weights(tmp_path):
    counts = [10, 50, 8, 4, 6, 2, 2, 3]
    out = tmp_path / "weights" / "class_weights.json"
    result = class_weights.run(write_train(tmp_path / "train.csv", counts), out)
    assert json.loads(out.read_text()) == result
    assert result["classes"] == list(CLASSES) and result["counts"] == counts
    expected = sum(counts) / (len(CLASSES) * np.array(counts))
    np.testing.assert_allclose(result["weights"], expected, rtol=1e-5)
    assert result["weights"][1] == min(result["weights"])  # the commonest class weighs least


def test_class_without_training_image_is_an_error(tmp_path):
    train = write_train(tmp_path / "train.csv", [5, 5, 5, 5, 5, 0, 5, 0])
    with pytest.raises(LabelError, match="no training image of class DF, SCC") as info:
        class_weights.run(train, tmp_path / "w.json")
    assert str(train) in str(info.value)
    assert not (tmp_path / "w.json").exists()


def test_cli(tmp_path, capsys):
    train = write_train(tmp_path / "train.csv", [1] * len(CLASSES))
    assert class_weights.main(["--train", str(train), "--out", str(tmp_path / "w.json")]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == [1.0] * len(CLASSES)
