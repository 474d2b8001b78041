"""class_weights: inverse-frequency, square-root and effective-number weights and the class
priors from the train split; a missing class is an error."""
from __future__ import annotations

import json

import numpy as np
import pytest

from components import class_weights
from components.training.balance import weights_for_counts
from components.common.labels import CLASSES, LabelError


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


@pytest.mark.parametrize("method", ["sqrt", "effective_number"])
def test_milder_methods_keep_the_order_and_the_mean_training_weight(tmp_path, method):
    counts = np.array([100, 4000, 50, 30, 90, 20, 25, 15])
    result = class_weights.run(write_train(tmp_path / "t.csv", counts), tmp_path / "w.json",
                               method=method, beta=0.999)
    weights = np.array(result["weights"])
    balanced = weights_for_counts(counts, "balanced")
    assert (np.argsort(weights) == np.argsort(balanced)).all()  # rarer always weighs more
    # milder: the rarest / commonest ratio is below inverse frequency's
    assert weights.max() / weights.min() < balanced.max() / balanced.min()
    assert (counts * weights).sum() == pytest.approx(counts.sum(), rel=1e-5)  # mean 1 per image
    assert result["priors"] == pytest.approx(counts / counts.sum(), abs=1e-7)
    assert result["method"] == method


def test_effective_number_is_cui_et_al_eq_6():
    counts = np.array([10, 1000])
    w = weights_for_counts(counts, "effective_number", beta=0.99)
    raw = (1 - 0.99) / (1 - 0.99 ** counts)
    assert w[0] / w[1] == pytest.approx(raw[0] / raw[1])
    sqrt = weights_for_counts(counts, "sqrt")
    assert sqrt[0] / sqrt[1] == pytest.approx(10.0)  # sqrt(1000 / 10)
