"""The site-shortcut report (evaluation/sites.py) on constructed predictions: a score that knows
only the site gets a high pooled melanoma AUC, chance within each site, and the flag; a score
that follows the label does not. The same on a real HAM10000 subset when ../shared/data is
there (its `dataset` column is the site)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.common.labels import CLASS_INDEX, CLASSES, read_labels
from components.evaluation import mlflow_log, sites
from components.registry import model_card

MEL, NV, BKL = CLASS_INDEX["MEL"], CLASS_INDEX["NV"], CLASS_INDEX["BKL"]
HAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-200x150"


def _probs(mel_score: np.ndarray) -> np.ndarray:
    """Probability rows whose MEL column is `mel_score`, the rest spread evenly."""
    p = np.repeat(((1 - mel_score) / (len(CLASSES) - 1))[:, None], len(CLASSES), axis=1)
    p[:, MEL] = mel_score
    return p


def _two_sites(seed: int = 0):
    """Site A: 45 MEL, 30 NV, 10 BKL; site B: 5 MEL, 120 NV, 10 BKL; site C: 40 NV only.
    Two images per lesion."""
    counts = {"A": (45, 30, 10), "B": (5, 120, 10), "C": (0, 40, 0)}
    y = np.concatenate([np.repeat([MEL, NV, BKL], c) for c in counts.values()])
    source = np.concatenate([np.full(sum(c), s) for s, c in counts.items()])
    groups = np.array([f"L{i // 2}" for i in range(len(y))], dtype=object)
    return y, source, groups, np.random.default_rng(seed)


def test_a_score_that_knows_only_the_site_is_flagged():
    y, source, groups, rng = _two_sites()
    site_level = pd.Series(source).map({"A": 0.6, "B": 0.2, "C": 0.2}).to_numpy()
    r = sites.report(y, _probs(site_level + rng.uniform(0, 0.1, len(y))), source, groups,
                     n=300)
    t = r["tasks"]["mel_vs_nv"]
    assert t["pooled"]["auc"] > 0.75
    for s in ("A", "B"):
        assert 0.3 < t["within"][s]["auc"] < 0.7
        ci = t["within"][s]["ci95"]
        assert ci["low"] <= t["within"][s]["auc"] <= ci["high"]
    assert t["within"]["C"] == {"auc": None, "n_positive": 0, "n_negative": 40,
                                "no_auc": "no MEL images", "judged": False}
    assert t["within"]["A"]["judged"] and not t["within"]["B"]["judged"]  # B: 5 MEL
    assert t["pooled"]["n_positive"] == 50 and t["pooled"]["n_negative"] == 190
    assert t["gap"]["ci95"]["low"] > 0 and t["shortcut"] is True
    assert t["gap"]["value"] == pytest.approx(t["pooled"]["auc"] - t["within"]["A"]["auc"])
    assert r["tasks"]["mel_vs_rest"]["shortcut"] is True
    assert "site shortcut" in r["summary"][0] and "C no AUC (no MEL images)" in r["summary"][0]
    json.dumps(r, allow_nan=False)  # no NaN anywhere: absent figures are None with a reason


def test_a_score_that_follows_the_label_is_not_flagged():
    y, source, groups, rng = _two_sites()
    r = sites.report(y, _probs(0.3 * (y == MEL) + rng.uniform(0, 0.6, len(y))), source, groups,
                     n=300)
    for task in ("mel_vs_nv", "mel_vs_rest"):
        t = r["tasks"][task]
        assert t["shortcut"] is False, task
        assert t["within"]["A"]["auc"] > 0.7 and t["pooled"]["auc"] > 0.7
        assert t["gap"]["ci95"]["low"] <= 0
    assert "no site shortcut shown" in r["summary"][1]


def test_a_site_too_small_to_judge_does_not_hide_the_shortcut():
    """HAM10000's vidir_molemax test split: 2 melanomas among 573 nevi. Ranked first there by
    luck, they gave that site an AUC above the pooled one, and the old rule (the best of every
    site) called a site-only model clean. A site under MIN_PER_CLASS of a class is reported
    but not judged."""
    y, source, groups, rng = _two_sites()
    big = source == "A"
    score = np.where(big, 0.7, 0.3) + rng.normal(0, 0.05, len(y))  # knows the site only
    lucky = np.flatnonzero((source == "B") & (y == MEL))[:2]
    y = np.where((source == "B") & (y == MEL), NV, y)
    y[lucky], score[lucky] = MEL, 0.69  # B: 2 MEL, ranked above all of B's nevi
    r = sites.report(y, _probs(np.clip(score, 0, 1)), source, groups, n=200)
    t = r["tasks"]["mel_vs_nv"]
    assert t["within"]["B"]["auc"] > t["pooled"]["auc"] and not t["within"]["B"]["judged"]
    assert t["best_source"] == "A" and t["shortcut"] is True
    assert "B " in r["summary"][0] and "(too few to judge)" in r["summary"][0]


def test_no_flag_without_a_site_holding_both_classes_or_without_a_bootstrap():
    y = np.array([MEL] * 6 + [NV] * 6)
    source = np.array(["A"] * 6 + ["B"] * 6)
    r = sites.report(y, _probs(np.linspace(0.9, 0.1, 12)), source, n=50)
    t = r["tasks"]["mel_vs_nv"]
    assert t["pooled"]["auc"] == 1.0 and t["best_source"] is None
    assert t["gap"]["value"] is None and t["shortcut"] is None
    y, source, groups, rng = _two_sites()
    off = sites.report(y, _probs(rng.uniform(0, 1, len(y))), source, groups, n=0)
    assert off["tasks"]["mel_vs_nv"]["shortcut"] is None
    assert off["tasks"]["mel_vs_nv"]["gap"]["ci95"] == {"low": None, "high": None}


def test_the_run_description_and_the_model_card_show_the_cross_site_report():
    y, source, groups, rng = _two_sites()
    site_level = pd.Series(source).map({"A": 0.6, "B": 0.2, "C": 0.2}).to_numpy()
    cross_site = sites.report(y, _probs(site_level + rng.uniform(0, 0.1, len(y))), source,
                              groups, n=100)
    metrics = {"n_images": len(y), "bootstrap": {"unit": "lesion", "resamples": 100},
               "ci95": {}, "cross_site": cross_site}
    note = mlflow_log.test_note(metrics)
    card = model_card.model_card("m", None, "run", {}, metrics, {}, {}, None)
    for text in (note, card):
        assert "Cross-site" in text
        for line in cross_site["summary"]:
            assert line in text
    assert "Cross-site" not in mlflow_log.test_note({**metrics, "cross_site": None})
    flat = mlflow_log._flat_metrics({**metrics, "roc_auc_per_class": {}}, "test_")
    assert flat["test_mel_vs_nv_site_shortcut"] == 1.0
    assert flat["test_B_mel_vs_nv_auc"] == cross_site["tasks"]["mel_vs_nv"]["within"]["B"]["auc"]
    assert "test_C_mel_vs_nv_auc" not in flat   # no AUC where a class is absent, not NaN


@pytest.mark.skipif(not (HAM / "ham10000_metadata.csv").is_file(),
                    reason="../shared/data (real HAM10000) is not here")
def test_real_ham10000_sites_site_only_score_is_flagged_label_score_is_not():
    """300 images of each of three HAM10000 collections, lesion-grouped; scores constructed
    (no model): one from the site's melanoma share, one from the label."""
    meta = pd.read_csv(HAM / "ham10000_metadata.csv", usecols=["image", "dataset"])
    labels = read_labels(HAM / "labels.csv").merge(meta, on="image")
    picked = labels[labels["dataset"].isin(["rosendahl", "vidir_modern", "vidir_molemax"])]
    picked = picked.groupby("dataset").sample(300, random_state=0).reset_index(drop=True)
    y, source = picked["label"].to_numpy(), picked["dataset"].to_numpy()
    groups = pd.read_csv(HAM / "image_info.csv", usecols=["image", "lesion_id"]).set_index(
        "image")["lesion_id"].reindex(picked["image"]).to_numpy(dtype=object)
    rng = np.random.default_rng(0)
    mel_share = picked.groupby("dataset")["label"].transform(lambda s: (s == MEL).mean())
    knows_site = sites.report(y, _probs(mel_share.to_numpy() + rng.uniform(0, 0.01, len(y))),
                              source, groups, n=200)["tasks"]["mel_vs_nv"]
    assert knows_site["shortcut"] is True and knows_site["pooled"]["auc"] > 0.7
    assert all(0.35 < w["auc"] < 0.65 for w in knows_site["within"].values()
               if w["auc"] is not None)
    knows_lesion = sites.report(y, _probs(0.5 * (y == MEL) + rng.uniform(0, 0.5, len(y))),
                                source, groups, n=200)["tasks"]["mel_vs_nv"]
    assert knows_lesion["shortcut"] is False


# The documented way to name HAM10000's sites (README / evaluation/sites.py): its `dataset`
# column becomes the metadata's `source`, which preprocess keeps and split writes into test.csv.
HAM_SITES_ONE_LINER = ("import pandas as pd; pd.read_csv('{ham}/ham10000_metadata.csv')"
                       ".rename(columns={{'dataset': 'source'}}).to_csv('{out}', index=False)")


@pytest.mark.skipif(not (HAM / "ham10000_metadata.csv").is_file(),
                    reason="../shared/data (real HAM10000) is not here")
def test_real_ham10000_sites_reach_the_test_split_through_preprocess_and_split(tmp_path):
    import subprocess
    import sys

    from components import preprocess, split

    meta = tmp_path / "ham_sites.csv"
    subprocess.run([sys.executable, "-c", HAM_SITES_ONE_LINER.format(ham=HAM, out=meta)],
                   check=True)
    sites_of = pd.read_csv(meta, index_col="image")["source"]
    labels = pd.read_csv(HAM / "labels.csv")
    labels = labels[(labels["MEL"] == 1) | (labels["NV"] == 1)]
    subset = labels.groupby([labels["image"].map(sites_of), "MEL"]).head(8)  # per site x class
    subset.to_csv(tmp_path / "labels.csv", index=False)
    preprocess.run(tmp_path / "labels.csv", HAM / "images", tmp_path / "prepared", size=32,
                   metadata=meta, workers=1)
    split.run(tmp_path / "prepared" / "labels.csv", tmp_path / "splits",
              metadata=tmp_path / "prepared" / "metadata.csv", mode="grouped", seed=0,
              val_frac=0.2, test_frac=0.4)
    test = pd.read_csv(tmp_path / "splits" / "test.csv")
    assert set(test["source"]) <= set(sites_of) and test["source"].nunique() > 1
    assert (test["source"] == test["image"].map(sites_of)).all()
