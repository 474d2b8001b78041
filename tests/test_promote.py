"""promote: the champion moves only through the metric gate, never across test splits, and a
forced move is recorded. Versions here carry tags only (no artifacts): the gate reads tags."""
from __future__ import annotations

import mlflow
import pytest

from components.tools import promote

SPLIT_A, SPLIT_B = "a" * 64, "b" * 64


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("promote")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # runs keep their artifacts here, not in ./mlruns
    mlflow.MlflowClient(uri).create_experiment("promote", artifact_location=(root / "a").as_uri())
    return uri


@pytest.fixture
def client(uri):
    return mlflow.MlflowClient(uri, registry_uri=uri)


_names = iter(range(1000))


@pytest.fixture
def name(client):
    name = f"m{next(_names)}"
    client.create_registered_model(name)
    return name


def challenger(client, name, value=None, split=SPLIT_A, run_id=None, source=None, **tags) -> str:
    """A new version with alias challenger, as the register step leaves it."""
    all_tags = {"split_hash": split, **tags}
    if value is not None:
        all_tags["test_balanced_accuracy"] = f"{value:.6f}"
    v = client.create_model_version(name, source=source or "file:///nonexistent/dummy-model",
                                    run_id=run_id, tags=all_tags)
    client.set_registered_model_alias(name, "challenger", v.version)
    return str(v.version)


def champion(client, name) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def test_first_challenger_becomes_champion(uri, client, name):
    v1 = challenger(client, name, 0.5)
    result = promote.run("balanced_accuracy", name, tracking_uri=uri)
    assert result["decision"] == "first" and result["champion"] == v1
    assert champion(client, name) == v1
    assert client.get_model_version(name, v1).tags["promotion_metric"] == "balanced_accuracy"


def test_better_challenger_is_promoted_worse_is_not(uri, client, name):
    v1 = challenger(client, name, 0.50)
    promote.run("balanced_accuracy", name, tracking_uri=uri)
    v2 = challenger(client, name, 0.45)
    kept = promote.run("balanced_accuracy", name, tracking_uri=uri)
    assert kept["decision"] == "kept" and champion(client, name) == v1
    assert "0.4500 vs champion v1 0.5000" in kept["reason"]
    v3 = challenger(client, name, 0.50)  # a tie is not better
    assert promote.run("balanced_accuracy", name, tracking_uri=uri)["decision"] == "kept"
    v4 = challenger(client, name, 0.53)
    assert promote.run("balanced_accuracy", name, min_delta=0.05, tracking_uri=uri)["decision"] == "kept"
    result = promote.run("balanced_accuracy", name, min_delta=0.01, tracking_uri=uri)
    assert result["decision"] == "promoted" and result["previous_champion"] == v1
    assert result["delta"] == pytest.approx(0.03)
    assert champion(client, name) == v4
    assert str(client.get_model_version_by_alias(name, "previous-champion").version) == v1
    assert client.get_model_version(name, v1).tags["replaced_by"] == v4
    assert client.get_model_version(name, v4).tags["promoted_from"] == v1
    assert {v2, v3} and client.get_model_version(name, v2).tags["promotion_decision"].startswith("kept")


def test_different_test_splits_are_refused(uri, client, name, capsys):
    challenger(client, name, 0.5, split=SPLIT_A)
    promote.run("balanced_accuracy", name, tracking_uri=uri)
    challenger(client, name, 0.9, split=SPLIT_B)
    result = promote.run("balanced_accuracy", name, tracking_uri=uri)
    assert result["decision"] == "refused" and champion(client, name) == "1"
    assert "different test splits" in result["reason"] and SPLIT_A[:16] in result["reason"]
    assert promote.main(["--model-name", name, "--tracking-uri", uri]) == 1
    assert "refused: evaluated on different test splits" in capsys.readouterr().out


def test_force_needs_a_reason_and_is_recorded(uri, client, name):
    challenger(client, name, 0.5, split=SPLIT_A)
    promote.run("balanced_accuracy", name, tracking_uri=uri)
    v2 = challenger(client, name, 0.4, split=SPLIT_B)
    with pytest.raises(ValueError, match="reason"):
        promote.run("balanced_accuracy", name, force=True, tracking_uri=uri)
    result = promote.run("balanced_accuracy", name, force=True, reason="hotfix for ticket 42",
                         tracking_uri=uri)
    assert result["decision"] == "forced" and champion(client, name) == v2
    tags = client.get_model_version(name, v2).tags
    assert tags["forced"] == "true" and tags["force_reason"] == "hotfix for ticket 42"
    assert tags["forced_at"].endswith("+00:00")


def test_to_copies_the_champion_once(uri, client, name):
    v1 = challenger(client, name, 0.5, source_run_id="r1")
    first = promote.run("balanced_accuracy", name, to=f"{name}-prod", tracking_uri=uri)
    assert first["copied"] == {"name": f"{name}-prod", "version": "1", "created": True}
    again = promote.run("balanced_accuracy", name, to=f"{name}-prod", tracking_uri=uri)
    assert again["decision"] == "kept" and again["copied"]["created"] is False
    copies = client.search_model_versions(f"name = '{name}-prod'")
    assert len(copies) == 1
    copy = client.get_model_version_by_alias(f"{name}-prod", "champion")
    assert copy.tags["copied_from"] == f"{name}/{v1}" and copy.tags["source_run_id"] == "r1"


def test_metric_from_the_run_and_lower_is_better(uri, client, name):
    exp = client.get_experiment_by_name("promote").experiment_id
    runs = []
    for ece in (0.10, 0.05):
        r = client.create_run(exp)
        client.log_metric(r.info.run_id, "test_ece", ece)
        runs.append(r.info.run_id)
    challenger(client, name, run_id=runs[0])
    promote.run("ece", name, tracking_uri=uri)
    v2 = challenger(client, name, run_id=runs[1])
    result = promote.run("ece", name, tracking_uri=uri)
    assert result["decision"] == "promoted" and champion(client, name) == v2
    assert result["challenger_value"] == pytest.approx(0.05)


def test_no_challenger_is_refused(uri, name):
    result = promote.run("balanced_accuracy", name, tracking_uri=uri)
    assert result["decision"] == "refused" and "no @challenger" in result["reason"]


def test_a_deleted_champion_never_turns_the_gate_off(uri, client, name):
    v1 = challenger(client, name, 0.80)
    assert promote.run("balanced_accuracy", name, tracking_uri=uri)["decision"] == "first"
    v2 = challenger(client, name, 0.20)
    assert promote.run("balanced_accuracy", name, tracking_uri=uri)["decision"] == "kept"
    client.delete_model_version(name, v1)  # the champion's version is gone
    result = promote.run("balanced_accuracy", name, tracking_uri=uri)
    assert result["decision"] == "refused" and "is gone" in result["reason"]
    v3 = challenger(client, name, 0.50)  # compared with the best remaining version (v2, 0.20)
    result = promote.run("balanced_accuracy", name, tracking_uri=uri)
    assert result["decision"] == "promoted" and result["champion_value"] == pytest.approx(0.2)
    assert champion(client, name) == v3 and result["previous_champion"] == v2
    v4 = challenger(client, name, 0.30)
    client.delete_registered_model_alias(name, "champion")  # alias removed by hand
    result = promote.run("balanced_accuracy", name, tracking_uri=uri)
    assert result["decision"] == "kept" and result["champion"] == v3  # 0.30 < v3's 0.50
    assert "champion" not in client.get_registered_model(name).aliases
    assert client.get_model_version(name, v4).aliases == ["challenger"]


def test_a_promote_finding_the_lock_taken_changes_nothing(uri, client, name, capsys):
    v1 = challenger(client, name, 0.5)
    with promote.promotion_lock(client, name):
        assert promote.main(["--model_name", name, "--tracking_uri", uri]) == 1
        assert "lost: another promote of" in capsys.readouterr().err
    assert client.get_model_version(name, v1).aliases == ["challenger"]
    assert promote.run("balanced_accuracy", name, tracking_uri=uri)["champion"] == v1
    # a lock left by a killed promote is broken once stale
    client.create_registered_model(name + promote.LOCK_SUFFIX, tags={"since": "0"})
    challenger(client, name, 0.9)
    assert promote.run("balanced_accuracy", name, tracking_uri=uri)["decision"] == "promoted"


def test_two_concurrent_promotes_to_prod_make_one_prod_version(mlflow_server, tmp_path):
    """Two real `skinlesion promote --to NAME-prod` processes at once against a real server:
    exactly one moves the champion and copies it; the other loses or finds it done."""
    import subprocess
    import sys

    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    name = f"concurrent-{tmp_path.name}"[:60]
    client.create_registered_model(name)
    challenger(client, name, 0.7, source="s3://bucket/dummy-model")  # a server checks local paths
    cmd = [sys.executable, "-m", "components.tools.promote", "--model_name", name,
           "--tracking_uri", mlflow_server, "--to", f"{name}-prod"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=120), p.stdout.read() + p.stderr.read()) for p in procs]
    won = [o for rc, o in outcomes if rc == 0 and ("first:" in o or "promoted:" in o)]
    assert len(won) == 1, outcomes
    other = next(o for o in (o for _, o in outcomes) if o is not won[0])
    assert "lost: another promote" in other or "already @champion" in other, outcomes
    assert len(client.search_model_versions(f"name = '{name}-prod'")) == 1
    assert name + promote.LOCK_SUFFIX not in [m.name for m in client.search_registered_models()]
