"""Champion and challenger scored on the same images: the difference of their metric with a
lesion-level paired bootstrap interval, and the rule that promotes on its lower bound (issue
27, item 2: the statistic; promote's wiring is still to come)."""
from __future__ import annotations

import numpy as np
import pytest

from components.evaluation.metrics import bootstrap, paired_difference, paired_gate


def _models(n_lesions: int = 300, fixed: float = 0.08, seed: int = 0):
    """Labels, lesion ids (two images each) and two models' probabilities that agree on every
    lesion except a share `fixed` of those the champion gets wrong, which the challenger
    gets right: the same hard lesions, a small real gain."""
    rng = np.random.default_rng(seed)
    k = 4
    lesion_class = rng.integers(0, k, n_lesions)
    y = np.repeat(lesion_class, 2)
    groups = np.repeat([f"L{i}" for i in range(n_lesions)], 2)
    champion_right = np.repeat(rng.random(n_lesions) < 0.6, 2)
    fixed_now = np.repeat(rng.random(n_lesions) < fixed / 0.4, 2) & ~champion_right
    wrong = (y + 1) % k

    def probs(right):
        p = np.full((len(y), k), 0.1 / (k - 1))
        p[np.arange(len(y)), np.where(right, y, wrong)] = 0.9
        return p

    return y, groups, probs(champion_right), probs(champion_right | fixed_now)


def test_pairing_sees_a_gain_that_two_separate_intervals_cannot():
    y, groups, champion, challenger = _models()
    diff = paired_difference(y, challenger, champion, groups, "accuracy", n=400, seed=0)
    assert diff["difference"] == pytest.approx(diff["challenger"] - diff["champion"])
    assert 0.04 < diff["difference"] < 0.12 and diff["low"] > 0
    assert diff["n_images"] == 600 and diff["n_lesions"] == 300
    apart = [bootstrap(lambda rows, p=p: {"accuracy": (p[rows].argmax(1) == y[rows]).mean()},
                       len(y), groups, n=400, seed=0)["accuracy"] for p in (champion, challenger)]
    assert apart[1]["low"] < apart[0]["high"], "the unpaired intervals overlap"
    assert paired_gate(diff, min_delta=0.0) and not paired_gate(diff, min_delta=diff["high"])


def test_identical_models_are_not_promoted():
    y, groups, champion, _ = _models()
    diff = paired_difference(y, champion, champion, groups, "balanced_accuracy", n=100)
    assert diff["difference"] == diff["low"] == diff["high"] == 0.0
    assert not paired_gate(diff, min_delta=0.0)


def test_for_ece_lower_is_better():
    y, groups, champion, challenger = _models()
    diff = paired_difference(y, challenger, champion, groups, "ece", n=200)
    # the challenger is right more often at the same 0.9 confidence: better calibrated
    assert diff["high"] < 0 and paired_gate(diff, min_delta=0.0)
    reverse = paired_difference(y, champion, challenger, groups, "ece", n=200)
    assert not paired_gate(reverse, min_delta=0.0)


def test_mismatched_inputs_are_refused():
    y, groups, champion, challenger = _models()
    with pytest.raises(ValueError, match="same images"):
        paired_difference(y, challenger[:-1], champion, groups, "accuracy")
    with pytest.raises(ValueError, match="unknown metric"):
        paired_difference(y, challenger, champion, groups, "speed")
