"""promote: the champion moves only through the metric gate, never across test splits, and a
forced move is recorded. Versions here carry tags only (no artifacts): the gate reads tags."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from components.registry import client as registry
from components.registry import lock
from components.registry.client import ensure_registered_model
from components.commands import promote

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


def leftover_lock(client, name, host="elsewhere", since=None, pid=1) -> str:
    """A lock version as a promote on `host` leaves it (a crash, an outage)."""
    ensure_registered_model(client, name + lock.SUFFIX)
    since = time.time() if since is None else since
    return client.create_model_version(name + lock.SUFFIX, lock.SOURCE, tags={
        "holder": f"someone@{host} pid {pid}", "host": host, "pid": str(pid),
        "since": str(since), "token": "theirs"}).version


def live_locks(client, name) -> list:
    return registry.versions(client, name + lock.SUFFIX)


def test_a_promote_finding_the_lock_taken_changes_nothing(uri, client, name, capsys):
    v1 = challenger(client, name, 0.5)
    with lock.held(client, name, "another promote"):
        assert promote.main(["--model_name", name, "--tracking_uri", uri]) == 1
        assert "lost: another promote of" in capsys.readouterr().err
    assert client.get_model_version(name, v1).aliases == ["challenger"]
    assert promote.run("balanced_accuracy", name, tracking_uri=uri)["champion"] == v1
    # a lock left on another host more than 10 minutes ago is broken as stale, and recorded
    leftover_lock(client, name, since=0)
    challenger(client, name, 0.9)
    assert promote.run("balanced_accuracy", name, tracking_uri=uri)["decision"] == "promoted"
    assert "(stale after 600 s)" in client.get_registered_model(name).tags[lock.BROKEN_TAG]
    assert live_locks(client, name) == []


def test_a_promote_takes_back_its_own_lock(uri, client, name):
    """A promote retrying after an outage (same token) finds its own lock and goes on; another
    promote is still refused."""
    mine = lock.take(client, name, "token-1")
    assert lock.take(client, name, "token-1") == mine
    with pytest.raises(lock.Busy, match="another promote of .* is running"):
        lock.take(client, name, "token-2")
    assert [str(v.version) for v in live_locks(client, name)] == [mine]


def test_a_lock_that_cannot_be_given_back_does_not_redo_the_promotion(uri, client, name,
                                                                      monkeypatch, caplog):
    """Fault injection (the server going away between the promotion and the release): the
    promote reports its decision once, 'first', instead of retrying the promotion and
    reporting that it lost to its own lock; the lock left names this process, so it is stale
    once the process ends."""
    import requests

    version = challenger(client, name, 0.6)
    real_delete = mlflow.MlflowClient.delete_model_version

    def delete_fails_for_the_lock(self, model, number):
        if model.endswith(lock.SUFFIX):
            raise requests.exceptions.ConnectionError("connection refused")
        return real_delete(self, model, number)

    monkeypatch.setattr(mlflow.MlflowClient, "delete_model_version", delete_fails_for_the_lock)
    result = promote.run("balanced_accuracy", name, tracking_uri=uri)
    assert result["decision"] == "first" and champion(client, name) == version
    assert "could not give back the promotion lock" in caplog.text
    [left] = live_locks(client, name)
    assert left.tags["pid"] == str(os.getpid())


def test_break_lock_by_hand_needs_a_reason_and_is_recorded(uri, client, name, capsys):
    challenger(client, name, 0.5)
    leftover_lock(client, name, host="node-7")  # recent, on a host this one cannot ask
    assert promote.main(["--model_name", name, "--tracking_uri", uri]) == 1
    assert "someone@node-7 pid 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        promote.main(["--model_name", name, "--tracking_uri", uri, "--break_lock"])
    assert "--break_lock needs --reason" in capsys.readouterr().err
    assert promote.main(["--model_name", name, "--tracking_uri", uri, "--break_lock",
                         "--reason", "node-7 was drained"]) == 0
    assert "broke the promotion lock held by someone@node-7 pid 1" in capsys.readouterr().out
    record = client.get_registered_model(name).tags[lock.BROKEN_TAG]
    assert f"{lock.user()}@" in record and "--break_lock: node-7 was drained" in record
    assert promote.main(["--model_name", name, "--tracking_uri", uri]) == 0


def _hold_lock_in_a_child(uri: str, name: str) -> subprocess.Popen:
    """A process holding the promotion lock of `name` as a promote does; given a line on
    stdin it gives the lock back (MLflow's client not retrying: the test stops the server)."""
    code = ("import sys, mlflow; from components.registry import lock; "
            f"c = mlflow.MlflowClient({uri!r}, registry_uri={uri!r})\n"
            f"with lock.held(c, {name!r}, 'child'):\n"
            "    print('locked', flush=True); sys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert child.stdout.readline().strip() == "locked"
    return child


def test_the_lock_of_a_killed_promote_is_broken(uri, client, capsys):
    """kill -9 during a promote: the next promote on this host sees its process gone and breaks
    the lock; `--break_lock` breaks it by hand."""
    names = [f"killed{i}" for i in range(2)]
    children = []
    for n in names:
        client.create_registered_model(n)
        challenger(client, n, 0.5)
        children.append(_hold_lock_in_a_child(uri, n))
    for child in children:
        child.send_signal(signal.SIGKILL)
        child.wait()
    auto, by_hand = names
    assert promote.main(["--model_name", auto, "--tracking_uri", uri]) == 0
    assert "first:" in capsys.readouterr().out
    assert f"pid {children[0].pid} is no longer running" in \
        client.get_registered_model(auto).tags[lock.BROKEN_TAG]
    assert promote.main(["--model_name", by_hand, "--tracking_uri", uri, "--break_lock",
                         "--reason", "killed"]) == 0
    assert f"pid {children[1].pid}" in capsys.readouterr().out
    assert live_locks(client, by_hand) == []


def test_two_concurrent_promotes_to_prod_make_one_prod_version(mlflow_server, tmp_path):
    """Two real `skinlesion promote --to NAME-prod` processes at once against a real server:
    exactly one moves the champion and copies it; the other loses or finds it done."""
    import subprocess
    import sys

    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    name = f"concurrent-{tmp_path.name}"[:60]
    client.create_registered_model(name)
    challenger(client, name, 0.7, source="s3://bucket/dummy-model")  # a server checks local paths
    cmd = [sys.executable, "-m", "components.commands.promote", "--model_name", name,
           "--tracking_uri", mlflow_server, "--to", f"{name}-prod"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=120), p.stdout.read() + p.stderr.read()) for p in procs]
    won = [o for rc, o in outcomes if rc == 0 and ("first:" in o or "promoted:" in o)]
    assert len(won) == 1, outcomes
    other = next(o for o in (o for _, o in outcomes) if o is not won[0])
    assert "lost: another promote" in other or "already @champion" in other, outcomes
    assert len(client.search_model_versions(f"name = '{name}-prod'")) == 1
    assert live_locks(client, name) == []


def test_five_promotes_breaking_one_stale_lock_make_one_winner(mlflow_server, tmp_path):
    """Five real promotes released at once against a real server find a stale lock: one
    breaks it and promotes, the others lose with a sentence (or find the work done); no raw
    RESOURCE_DOES_NOT_EXIST, no traceback, no lock left, one break recorded."""
    client = mlflow.MlflowClient(mlflow_server, registry_uri=mlflow_server)
    name = f"stale-{tmp_path.name}"[:60]
    client.create_registered_model(name)
    challenger(client, name, 0.7, source="s3://bucket/dummy-model")  # a server checks local paths
    leftover_lock(client, name, since=0)
    child = ("import sys, mlflow; from components.commands import promote; print('ready', flush=True); "
             "sys.stdin.readline(); sys.exit(promote.main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", child, "--model_name", name, "--tracking_uri", mlflow_server]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(5)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # all five at once
        p.stdin.write("go\n")
        p.stdin.flush()
    outcomes = [(p.wait(timeout=120), p.stdout.read() + p.stderr.read()) for p in procs]
    shown = "\n\n".join(f"exit {rc}:\n{out[-1500:]}" for rc, out in outcomes)
    assert len([o for rc, o in outcomes if rc == 0 and "first:" in o]) == 1, shown
    for rc, out in outcomes:
        assert "first:" in out or "already @champion" in out or \
            (rc == 1 and "lost: another promote of" in out), outcomes
        assert "RESOURCE_DOES_NOT_EXIST" not in out and "Traceback" not in out, out
    assert live_locks(client, name) == []
    assert len(client.get_registered_model(name).tags[lock.BROKEN_TAG].splitlines()) == 1


def test_an_outage_during_a_promote_leaves_no_lock_that_blocks_the_retry(tmp_path, capsys):
    """The server stops while a promote holds the lock, so giving it back fails; with the
    server restored (same store), the next promote is not told another one is running."""
    from mlflow_server import start_mlflow_server, stoppable_mlflow_server

    root = tmp_path / "server"
    with stoppable_mlflow_server(root) as (uri, stop):
        client = mlflow.MlflowClient(uri, registry_uri=uri)
        client.create_registered_model("outage")
        challenger(client, "outage", 0.7, source="s3://bucket/dummy-model")
        holder = _hold_lock_in_a_child(uri, "outage")
        stop()
        _, err = holder.communicate("go\n", timeout=60)
        # it could not give the lock back: a warning, its work under the lock stands
        assert holder.returncode == 0 and "could not give back the promotion lock" in err, err
    with start_mlflow_server(root) as restored:
        assert len(live_locks(mlflow.MlflowClient(restored, registry_uri=restored), "outage")) == 1
        assert promote.main(["--model_name", "outage", "--tracking_uri", restored]) == 0
        assert "first:" in capsys.readouterr().out


def test_an_edited_tag_never_outranks_the_metric_its_run_logged(uri, client, name):
    """A version tagged 0.99 (an edited metrics.json, registered before register checked it)
    whose run logged 0.4 is compared at 0.4; a later re-evaluation logged into the run does
    not turn the registered value into an edit."""
    exp = client.get_experiment_by_name("promote").experiment_id
    run = client.create_run(exp).info.run_id
    client.log_metric(run, "test_balanced_accuracy", 0.4)
    challenger(client, name, 0.5)
    promote.run("balanced_accuracy", name, tracking_uri=uri)
    challenger(client, name, 0.99, run_id=run)
    result = promote.run("balanced_accuracy", name, tracking_uri=uri)
    assert result["decision"] == "kept" and result["challenger_value"] == pytest.approx(0.4)
    client.log_metric(run, "test_balanced_accuracy", 0.45)
    v3 = challenger(client, name, 0.4, run_id=run)
    assert promote.run("balanced_accuracy", name, tracking_uri=uri)["challenger_value"] == \
        pytest.approx(0.4)
    assert champion(client, name) != v3


@pytest.mark.parametrize("args, says", [(["--to", "prod'env"], "name \"prod'env\" is not usable"),
                                        (["--metric", "balanced_acc"], "--metric 'balanced_acc'"),
                                        (["--min_delta", "-5"], "--min_delta -5.0")])
def test_bad_promote_arguments_are_refused_in_one_line(uri, client, name, capsys, args, says):
    challenger(client, name, 0.5)
    assert promote.main(["--model_name", name, "--tracking_uri", uri, *args]) == 1
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert list(client.get_registered_model(name).aliases) == ["challenger"]
    assert [m.name for m in client.search_registered_models() if "env" in m.name] == []
