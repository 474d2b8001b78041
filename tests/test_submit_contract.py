"""Contract tests of `skinlesion pipeline submit`: kfp.Client against a local HTTP stand-in for
the Kubeflow Pipelines v2beta1 API (http.server on 127.0.0.1), recording what the client
sends. They check the requests (experiment lookup/creation, the run with the compiled
pipeline, its platform spec and arguments), not a real cluster's behaviour."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from components.commands.cli import main as skinlesion

EXPERIMENT_ID = "6f1c2a4e-0000-4000-8000-000000000001"
RUN_ID = "9d2b7c1f-0000-4000-8000-000000000002"


class FakeKFP:
    """Records every request; answers like the KFP API server would."""

    def __init__(self, existing_experiments: list[str] = ()):
        self.requests: list[dict] = []
        self.experiments = {name: EXPERIMENT_ID for name in existing_experiments}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                entry = {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                         "headers": {k.lower(): v for k, v in self.headers.items()},
                         "body": json.loads(raw) if raw else None}
                fake.requests.append(entry)
                return entry

            def do_GET(self):
                req = self._record()
                if req["path"] == "/apis/v2beta1/healthz":
                    return self._reply(200, {"multi_user": False})
                if req["path"] == "/apis/v2beta1/experiments":
                    wanted = json.loads(req["query"]["filter"][0])["predicates"][0]["stringValue"]
                    found = [{"experiment_id": fake.experiments[wanted], "display_name": wanted}
                             ] if wanted in fake.experiments else []
                    return self._reply(200, {"experiments": found, "total_size": len(found)})
                return self._reply(404, {"error": f"no route {req['path']}"})

            def do_POST(self):
                req = self._record()
                if req["path"] == "/apis/v2beta1/experiments":
                    name = req["body"]["display_name"]
                    fake.experiments[name] = EXPERIMENT_ID
                    return self._reply(200, {"experiment_id": EXPERIMENT_ID, "display_name": name})
                if req["path"] == "/apis/v2beta1/runs":
                    body = req["body"]
                    return self._reply(200, {"run_id": RUN_ID, "display_name": body["display_name"],
                                             "experiment_id": body["experiment_id"],
                                             "state": "PENDING"})
                return self._reply(404, {"error": f"no route {req['path']}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKFP":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]


@pytest.fixture(autouse=True)
def _no_local_kfp_context(monkeypatch, tmp_path):
    # kfp.Client reads ~/.config/kfp/context.json and KF_PIPELINES_* variables
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
                "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME", "KFP_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def _submit(url: str, *extra: str) -> int:
    return skinlesion(["pipeline", "submit", "--host", url, *extra])


def test_submit_contract_creates_the_experiment_and_a_run_of_the_compiled_pipeline(capsys):
    with FakeKFP() as kfp_api:
        assert _submit(kfp_api.url, "--experiment", "skin-lesion-ci", "--run-name", "ci-run",
                       "-S", "train.epochs=3", "-S", "register.gate_threshold=0.55",
                       "-S", "mlflow_tracking_uri=http://mlflow.mlflow:5000",
                       "-S", "data_repo=https://git.example.com/skinlesion.git",
                       "-S", "data_rev=v1.0") == 0

    lookups = kfp_api.calls("GET", "/apis/v2beta1/experiments")
    assert len(lookups) == 1
    predicate = json.loads(lookups[0]["query"]["filter"][0])["predicates"][0]
    assert predicate["key"] == "display_name" and predicate["stringValue"] == "skin-lesion-ci"
    created = kfp_api.calls("POST", "/apis/v2beta1/experiments")
    assert len(created) == 1 and created[0]["body"]["display_name"] == "skin-lesion-ci"

    runs = kfp_api.calls("POST", "/apis/v2beta1/runs")
    assert len(runs) == 1
    run = runs[0]["body"]
    assert run["experiment_id"] == EXPERIMENT_ID
    assert run["display_name"] == "ci-run"
    spec = run["pipeline_spec"]
    pipeline_spec = spec.get("pipeline_spec", spec)
    assert pipeline_spec["pipelineInfo"]["name"] == "skin-lesion"
    assert {"train", "evaluate", "register"} <= set(pipeline_spec["root"]["dag"]["tasks"])
    platform = spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "emptyDirMounts" in platform["exec-train"] and "tolerations" in platform["exec-train"]

    parameters = run["runtime_config"]["parameters"]
    assert parameters["train_params"]["epochs"] == 3
    assert parameters["train_params"]["peak_lr"] == 0.01, "untouched keys keep params.yaml's values"
    assert parameters["register_params"]["gate_threshold"] == 0.55
    assert parameters["mlflow_tracking_uri"] == "http://mlflow.mlflow:5000"
    assert parameters["data_repo"] == "https://git.example.com/skinlesion.git"
    assert parameters["data_rev"] == "v1.0"
    assert "local_data" not in parameters or parameters["local_data"] == ""

    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed["run_id"] == RUN_ID and printed["experiment"] == "skin-lesion-ci"
    url = f"{kfp_api.url}/#/runs/details/{RUN_ID}"
    assert printed["url"] == url and url in captured.err  # where to look, printed for people


def test_submit_contract_reuses_an_existing_experiment_and_sends_the_token(monkeypatch, tmp_path):
    monkeypatch.setenv("KFP_TOKEN", "t0ken")
    demo = tmp_path / "demo.yaml"
    demo.write_text("train:\n  epochs: 2\nsplit:\n  seed: 7\n")
    with FakeKFP(existing_experiments=["skin-lesion"]) as kfp_api:
        assert _submit(kfp_api.url, "--params-file", str(demo), "--no-cache") == 0

    assert kfp_api.calls("POST", "/apis/v2beta1/experiments") == []
    run_calls = kfp_api.calls("POST", "/apis/v2beta1/runs")
    assert len(run_calls) == 1
    assert run_calls[0]["headers"].get("authorization") == "Bearer t0ken"
    run = run_calls[0]["body"]
    assert run["experiment_id"] == EXPERIMENT_ID
    parameters = run["runtime_config"]["parameters"]
    assert parameters["train_params"]["epochs"] == 2 and parameters["split_params"]["seed"] == 7
    # --no-cache: every task's caching is switched off in the submitted spec
    spec = run["pipeline_spec"]
    tasks = spec.get("pipeline_spec", spec)["root"]["dag"]["tasks"]
    assert all(not t.get("cachingOptions", {}).get("enableCache", False) for t in tasks.values())


def test_submit_contract_reports_an_unknown_parameter_before_any_request():
    with FakeKFP() as kfp_api:
        with pytest.raises(SystemExit, match="not a pipeline parameter"):
            _submit(kfp_api.url, "-S", "epochs=3")
    assert kfp_api.requests == []


def test_submit_builds_the_pipeline_once_spied(monkeypatch):
    """A pipeline is built on demand only: never at import, once per command (the -S
    names are checked against the pipeline that is then compiled and sent). A spy around the
    real build_pipeline counts the builds."""
    import pipeline.pipeline as kfp_pipeline

    builds = []
    real = kfp_pipeline.build_pipeline
    monkeypatch.setattr(kfp_pipeline, "build_pipeline",
                        lambda *a, **kw: builds.append(a) or real(*a, **kw))
    with FakeKFP() as kfp_api:
        assert _submit(kfp_api.url, "-S", "mlflow_tracking_uri=http://mlflow:5000") == 0
    assert len(builds) == 1
    [run] = kfp_api.calls("POST", "/apis/v2beta1/runs")
    assert run["body"]["runtime_config"]["parameters"]["mlflow_tracking_uri"] == "http://mlflow:5000"
