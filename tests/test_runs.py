"""`skinlesion runs`: recent training runs with data, split, params, metrics and registered
versions, best first; evaluate/register runs of their own are left out."""
from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from components.commands import runs, text_table


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("skin-lesion", artifact_location=(root / "a").as_uri())
    ids = {}
    for name, mode, epochs, value in (("paper-grouped-e2-s0", "grouped", 2, 0.61),
                                      ("paper-paper-e2-s0", "paper", 2, 0.72),
                                      ("paper-grouped-e5-s1", "grouped", 5, None)):
        run = client.create_run(exp, run_name=name, tags={"data_hash": "0123456789abcdef",
                                                          "split_mode": mode})
        for key, v in {"train.preset": "paper", "train.epochs": epochs, "train.seed": 0,
                       "train.img_size": 32}.items():
            client.log_param(run.info.run_id, key, v)
        if value is not None:
            client.log_metric(run.info.run_id, "test_balanced_accuracy", value)
            client.log_metric(run.info.run_id, "test_balanced_accuracy_ci_low", value - 0.05)
            client.log_metric(run.info.run_id, "test_balanced_accuracy_ci_high", value + 0.05)
        client.log_metric(run.info.run_id, "val_ema_balanced_accuracy", 0.5)
        client.set_terminated(run.info.run_id)
        ids[name] = run.info.run_id
    client.create_run(exp, run_name="register-x", tags={"skinlesion.step": "register"})
    client.create_registered_model("skin-lesion-hybrid")
    for name in ("paper-grouped-e2-s0", "paper-paper-e2-s0"):
        v = client.create_model_version("skin-lesion-hybrid", source="file:///nonexistent/m",
                                        run_id=ids[name])
    client.set_registered_model_alias("skin-lesion-hybrid", "champion", "1")
    client.set_registered_model_alias("skin-lesion-hybrid", "challenger", v.version)
    return uri


def test_table_ranks_by_metric_and_shows_versions(uri):
    table = runs.run(top=10, tracking_uri=uri)
    assert table["run"].tolist() == ["paper-paper-e2-s0", "paper-grouped-e2-s0", "paper-grouped-e5-s1"]
    first = table.iloc[0]
    assert first["split"] == "paper" and first["data"] == "01234567" and first["epochs"] == "2"
    assert first["balanced_accuracy"] == pytest.approx(0.72)
    assert first["balanced_accuracy_ci95"] == "0.670-0.770"
    assert first["registered"] == "skin-lesion-hybrid v2 @challenger"
    assert table.iloc[1]["registered"] == "skin-lesion-hybrid v1 @champion"
    assert table.iloc[2]["registered"] == ""


def test_recent_order_top_and_cli(uri, capsys):
    recent = runs.run(top=2, sort="recent", tracking_uri=uri)
    assert recent["run"].tolist() == ["paper-grouped-e5-s1", "paper-paper-e2-s0"]
    assert runs.main(["--tracking-uri", uri, "--top", "3", "--wide"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "run_id", "started"]
    assert "paper-paper-e2-s0" in out[1] and "@challenger" in out[1] and "0.7200" in out[1]
    assert runs.main(["--tracking-uri", uri, "--experiment", "nope"]) == 1


def test_the_table_fits_120_columns_and_wide_shows_everything(uri, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert runs.main(["--tracking-uri", uri]) == 0
    narrow = capsys.readouterr().out.splitlines()
    assert max(map(len, narrow)) <= 120
    assert narrow[0].split()[:2] == ["run", "run_id"] and "registered" in narrow[0]
    assert "bal_acc_ci95" in narrow[0] and "--wide shows all)" in narrow[-1]
    assert runs.main(["--tracking-uri", uri, "--wide"]) == 0
    wide = capsys.readouterr().out.splitlines()
    assert max(map(len, wide)) > 120 and all(c in wide[0] for c in ("data", "dvc_exp", "lr"))


def test_long_cells_are_cut_and_columns_left_out_in_order():
    frame = pd.DataFrame([{"name": "x" * 60, "a": "1" * 30, "b": "2" * 30, "c": "3"}])
    assert text_table.render(frame.iloc[:, ::-1], 10).endswith("x" * 60)  # the last: whole
    text = text_table.fit(frame, ["b", "a"], width=80)
    assert text.splitlines()[1].startswith("x" * 33 + "~") and "  3" in text.splitlines()[1]
    assert " b " not in text.splitlines()[0] and "a" in text.splitlines()[0]
    assert text.endswith("(left out to fit 80 columns: b; --wide shows all)")
    assert "x" * 60 in text_table.fit(frame, ["b", "a"], width=80, wide=True)
