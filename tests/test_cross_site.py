"""Leave-one-source-out (benchmarks/cross_site.py) on a synthetic two-site dataset whose sites
have different colour casts: each site is held out once, its test split is that site entire,
and the evaluation reports per held-out source."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"preprocess": {"size": 40},
        "train": {"preset": "tiny", "img_size": 32, "epochs": 2,
                  "batch_size": 16, "warmup_epochs": 0, "num_workers": 0, "ema_decay": 0.9,
                  "gpu_resident": "on"},
        "evaluate": {"bootstrap": 20}}


@pytest.mark.slow
def test_leave_one_source_out_holds_out_each_site_once(tmp_path):
    from components.commands import synth

    spec = importlib.util.spec_from_file_location("cross_site", ROOT / "benchmarks" / "cross_site.py")
    cross_site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cross_site)
    raw = tmp_path / "raw"
    synth.run(raw, n=160, seed=0, sources=2)
    # the sites in a column of another name, as HAM10000's `dataset`, and lesion ids that do
    # not name them: only --source_column can tell the sites
    meta = pd.read_csv(raw / "metadata.csv")
    meta["site"] = meta["lesion_id"].str.split("_").str[0]
    meta["lesion_id"] = "L" + meta["lesion_id"].str.replace("_", "")
    meta.to_csv(raw / "metadata.csv", index=False)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    argv = ["--labels", str(raw / "labels.csv"), "--images", str(raw / "images"), "--metadata",
            str(raw / "metadata.csv"), "--out", str(tmp_path / "loso"), "--params",
            str(ROOT / "params.yaml"), "--params_file", str(tmp_path / "tiny.yaml"),
            "-S", "preprocess.color_constancy=shades_of_gray", "--no_mlflow",
            "--source_column", "site"]
    assert cross_site.main(argv) == 0
    results = json.loads((tmp_path / "loso" / "results.json").read_text())
    assert [r["source"] for r in results] == ["SITEA", "SITEB"]
    assert sum(r["n_images"] for r in results) == 160
    for r in results:
        test = (tmp_path / "loso" / f"test_{r['source']}" / "splits" / "test.csv").read_text()
        assert all(line.endswith(r["source"]) for line in test.splitlines()[1:])
        assert 0 <= r["balanced_accuracy"] <= 1
    report = json.loads((tmp_path / "loso" / "prepared" / "preprocess_report.json").read_text())
    assert report["color_constancy"] == "shades_of_gray"
    assert "| SITEA | " in (tmp_path / "loso" / "results.md").read_text()
    with pytest.raises(SystemExit, match="no column 'dataset'"):
        cross_site.main([*argv[:-1], "dataset"])
