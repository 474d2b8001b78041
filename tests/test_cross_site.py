"""Leave-one-source-out (benchmarks/cross_site.py) and the robustness study
(benchmarks/robustness.py) on two sites: a small real HAM10000 subset (rosendahl and
vidir_modern, the metadata's `dataset` column) when ../shared/data is there, else the
synthetic two-source set whose sites have different colour casts. Each site is held out once,
its test split is that site entire, and the evaluation reports per held-out source; the study
trains each candidate with its own switches and scores the evaluation-only one on the
baseline's models."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HAM = ROOT.parent / "shared" / "data" / "ham10000-200x150"
TINY = {"preprocess": {"size": 40},
        "train": {"preset": "tiny", "img_size": 32, "epochs": 2,
                  "batch_size": 16, "warmup_epochs": 0, "num_workers": 0, "ema_decay": 0.9,
                  "gpu_resident": "on", "self_supervised_epochs": 0},
        "evaluate": {"bootstrap": 20}}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder as HAM10000's (labels.csv, images/, ham10000_metadata.csv whose `dataset` names
    the site; lesion ids that do not) and its two sites."""
    data = tmp_path_factory.mktemp("two_sites")
    if (HAM / "ham10000_metadata.csv").is_file():
        meta = pd.read_csv(HAM / "ham10000_metadata.csv")
        labels = pd.read_csv(HAM / "labels.csv")
        names = ["rosendahl", "vidir_modern"]
        # up to 8 images per site and class (every class is at both): about 120 real images
        label = labels.set_index("image").idxmax(axis=1)
        chosen = meta[meta["dataset"].isin(names)]
        chosen = chosen.groupby([chosen["dataset"], chosen["image"].map(label)]).head(8)
        chosen.to_csv(data / "ham10000_metadata.csv", index=False)
        labels[labels["image"].isin(chosen["image"])].to_csv(data / "labels.csv", index=False)
        (data / "images").symlink_to(HAM / "images")  # read in place, never copied
        return data, names
    from components.commands import synth

    synth.run(data, n=160, seed=0, sources=2)
    meta = pd.read_csv(data / "metadata.csv")
    meta["dataset"] = meta["lesion_id"].str.split("_").str[0]
    meta["lesion_id"] = "L" + meta["lesion_id"].str.replace("_", "")
    meta.to_csv(data / "ham10000_metadata.csv", index=False)
    return data, ["SITEA", "SITEB"]


@pytest.mark.slow
def test_leave_one_source_out_holds_out_each_site_once(tmp_path, two_sites):
    cross_site = _script("cross_site")
    data, names = two_sites
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    argv = ["--labels", str(data / "labels.csv"), "--images", str(data / "images"),
            "--metadata", str(data / "ham10000_metadata.csv"), "--out", str(tmp_path / "loso"),
            "--params", str(ROOT / "params.yaml"), "--params_file", str(tmp_path / "tiny.yaml"),
            "-S", "preprocess.color_constancy=shades_of_gray", "--no_mlflow",
            "--source_column", "dataset"]
    assert cross_site.main(argv) == 0
    results = json.loads((tmp_path / "loso" / "results.json").read_text())
    assert [r["source"] for r in results] == names
    assert sum(r["n_images"] for r in results) == len(pd.read_csv(data / "labels.csv"))
    for r in results:
        test = (tmp_path / "loso" / f"test_{r['source']}" / "splits" / "test.csv").read_text()
        assert all(line.endswith(r["source"]) for line in test.splitlines()[1:])
        assert 0 <= r["balanced_accuracy"] <= 1
        assert r["melanoma"]["chosen_on"] in ("validation", "test")  # too few on tiny data
    report = json.loads((tmp_path / "loso" / "prepared" / "preprocess_report.json").read_text())
    assert report["color_constancy"] == "shades_of_gray"
    assert f"| {names[0]} | " in (tmp_path / "loso" / "results.md").read_text()
    with pytest.raises(SystemExit, match="no column 'site'"):
        cross_site.main([*argv[:-1], "site"])


@pytest.mark.slow
def test_the_robustness_study_trains_each_switch_and_reports_in_and_out_of_site(tmp_path,
                                                                                   two_sites):
    from components.training import checkpoint

    robustness = _script("robustness")
    data, names = two_sites
    out, results_md = tmp_path / "study", tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nkept\n")
    switches = "class_site+field_of_view+strong_photometric+wide_crop+self_supervised"
    with pytest.raises(SystemExit, match="run the baseline"):
        robustness.main(["--data", str(data), "--out", str(out), "--smoke", "--no_mlflow",
                         "--candidates", "tta", "--sites", ",".join(names)])
    argv = ["--data", str(data), "--out", str(out), "--smoke", "--no_mlflow",
            "--candidates", f"baseline,{switches},tta", "--sites", ",".join(names),
            "--hold_out", names[0], "--results", str(results_md)]
    assert robustness.main(argv) == 0

    trained = checkpoint.load(out / "runs" / f"{switches}-s0" / "in_site" / "train" / "checkpoint_last.pt")
    recipe = trained["train_config"]["train"]
    assert (recipe["sampler_balance"], recipe["field_of_view"], recipe["photometric"],
            tuple(recipe["crop_scale"])) == ("class_site", 0.5, "strong", (0.35, 1.0))
    for part in ("in_site", f"held_out_{names[0]}"):  # each warm start its own training's
        run = checkpoint.load(out / "runs" / f"{switches}-s0" / part / "train" / "checkpoint_last.pt")
        warm = Path(run["train_config"]["warm_start"])
        assert warm.is_file() and warm.is_relative_to(out / "runs" / f"{switches}-s0" / part)
    assert not (out / "runs" / "tta-s0" / "in_site" / "train").exists()  # the baseline's, rescored
    tta = json.loads((out / "runs" / "tta-s0" / "in_site" / "eval_test" / "metrics.json").read_text())
    assert tta["tta"] is True
    for name in ("baseline", switches, "tta"):
        r = json.loads((out / "results" / f"{name}-s0.json").read_text())
        held = r[f"held_out_{names[0]}"]
        assert held["source"] == names[0] and 0 <= held["balanced_accuracy"] <= 1
        test = pd.read_csv(out / "runs" / f"{'baseline' if name == 'tta' else name}-s0"
                           / f"held_out_{names[0]}" / "splits" / "test.csv")
        assert set(test["source"]) == {names[0]}
        assert set(r["in_site"]["test"]["within_mel_vs_nv"]) == set(names)
    text = results_md.read_text()
    assert text.startswith("# Results\n\nkept\n") and text.count("| baseline | 0 |") == 1
    assert "<!-- robustness-study:start -->" in text and f"held out {names[0]}" in text


def test_a_candidate_with_a_bad_switch_stops_the_study_before_any_work(tmp_path, monkeypatch):
    robustness = _script("robustness")
    monkeypatch.setitem(robustness.CANDIDATES, "broken", {"train": {"crop_scale": [0.9, 0.2]}})
    with pytest.raises(SystemExit):
        robustness.main(["--out", str(tmp_path / "s"), "--candidates", "broken", "--no_mlflow"])
    with pytest.raises(SystemExit):
        robustness.main(["--out", str(tmp_path / "s"), "--candidates", "nosuch"])
    assert not (tmp_path / "s").exists()
