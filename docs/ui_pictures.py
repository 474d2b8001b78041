"""Headless-browser check of the MLflow UI, and the README's pictures of it.

    .venv/bin/python docs/ui_pictures.py [--out docs/images]      (make ui-pictures)

What it does, on this machine, with nothing but the project's own code:

1. starts a real `mlflow server` (SQLite store and artifacts in a temporary folder, a free
   port on 127.0.0.1; tests/mlflow_server.py's helper, as the tests start one);
2. makes two real training runs the way the pipeline does, against that server: a small
   synthetic ISIC-format dataset (`skinlesion synth`), preprocess, the lesion-grouped split,
   class weights, then train (a narrow model at 32 px, 1 and 2 epochs) and evaluate, which
   logs the test metrics (test_balanced_accuracy, ...) into each training run;
3. registers both (register: alias `challenger`) and promotes the first to `champion`
   (promote), so the registered model has two versions and both aliases;
4. opens three pages of the UI in Chromium from Debian's packages (/usr/bin/chromium,
   --headless=new, one load each with --dump-dom and --screenshot, after --budget_ms of
   virtual time): the experiment's runs (#/experiments/<id>/runs, with the headline metric
   columns: a view shared the UI's way, see share_runs_view), the second run
   (#/experiments/<id>/runs/<run id>) and the registered model (#/models/<name>). The DOM
   must show the headline metric names test_balanced_accuracy, test_accuracy, test_f1_macro
   and test_roc_auc_macro and the run ids (runs and run page), or the model's name, both
   versions and the alias tags @challenger and @champion (model page). The screenshots,
   1400 px wide, go to OUT/mlflow_runs.png, OUT/mlflow_run.png and OUT/mlflow_model.png.

The browser opens the UI as http://mlflow-ui.test:<port> (mapped to 127.0.0.1 by Chromium's
--host-resolver-rules; the server allows that Host): MLflow opens its Assistant panel, a
quarter of the window, on the first load from localhost, not under other names.

Exits 0 when every check passed; otherwise non-zero, naming the page and what was missing
(the DOM it saw is kept beside the pictures as <page>.html). The server and Chromium are
stopped and the temporary folder removed at exit (--keep leaves the folder, with the
server's log). About 85 s of CPU in all (the server's start, the two runs, three page loads);
3 to 4 minutes of wall time on two cores shared with other work. tests/test_mlflow_ui.py
runs it (marked slow).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and tests/mlflow_server.py

CHROMIUM = "/usr/bin/chromium"
WIDTH = 1400
# The UI's host name in the browser (see the docstring's last paragraph).
UI_HOST = "mlflow-ui.test"
SERVER_ENV = {"MLFLOW_SERVER_ALLOWED_HOSTS": f"{UI_HOST}:*,127.0.0.1:*,localhost:*",
              "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": f"http://{UI_HOST}:*"}
SHARE_KEY = "ui-pictures"         # the runs table's columns: a view shared through the UI
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 20_000            # a blank page or a spinner is a few kB
EXPERIMENT = "skin-lesion"        # components/common/tracking.py's DEFAULT_EXPERIMENT
MODEL = "skin-lesion-hybrid"      # RegisterConfig.model_name
# evaluate logs the headline metrics into the training run as test_<name>
# (components/evaluation/metrics.py's HEADLINE_SHOWN; checked in make_runs)
METRIC_NAMES = ("balanced_accuracy", "accuracy", "f1_macro", "roc_auc_macro")


class CheckFailed(RuntimeError):
    """A page did not show what it should."""


@dataclass
class Page:
    name: str                  # the picture: OUT/<name>.png
    url: str
    height: int                # of the window (its width is WIDTH)
    expected: dict[str, str]   # what the DOM must show: label -> regular expression


# -- two real runs and a registered model -----------------------------------------------------
def make_runs(work: Path, n_images: int = 64, epochs: tuple[int, int] = (1, 2)) -> dict:
    """The pipeline's steps on a small synthetic set, tracked by the server MLFLOW_TRACKING_URI
    names; returns the experiment id, the run ids and the registry's state."""
    import mlflow
    import torch

    from components import class_weights, evaluate, preprocess, register, split, train
    from components.common.config import EvaluateConfig, TrainConfig
    from components.evaluation.metrics import HEADLINE_SHOWN
    from components.commands import promote, synth

    if not set(METRIC_NAMES) <= set(HEADLINE_SHOWN):
        raise CheckFailed(f"{METRIC_NAMES} are not all headline metrics {HEADLINE_SHOWN}")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()

    def say(what: str) -> None:
        print(f"[{time.perf_counter() - started:4.0f} s] {what}", flush=True)

    raw, prepared, splits = work / "raw", work / "prepared", work / "splits"
    synth.run(raw, n=n_images, seed=0)
    preprocess.run(raw / "labels.csv", raw / "images", prepared, metadata=raw / "metadata.csv",
                   workers=1, size=40)
    report = split.run(prepared / "labels.csv", splits, metadata=prepared / "metadata.csv",
                       mode="grouped", seed=0)
    class_weights.run(splits / "train.csv", work / "class_weights.json")
    say(f"data: {n_images} synthetic images, prepared and split")

    run_ids, versions = [], []
    for i, n_epochs in enumerate(epochs):
        out = work / f"run{i + 1}"
        cfg = TrainConfig(preset="tiny", img_size=32,
                          batch_size=8, epochs=n_epochs, warmup_epochs=1, num_workers=0,
                          seed=i, gpu_resident="off", mixup_alpha=0.0, ema_decay=0.9)
        data = train.TrainingData.read(splits / "train.csv", prepared / "images",
                                       val_csv=splits / "val.csv",
                                       class_weights=work / "class_weights.json")
        train.run(data, out / "train", config=cfg, experiment=EXPERIMENT)
        evaluate.run(out / "train", splits / "test.csv", prepared / "images", out / "eval",
                     config=EvaluateConfig(bootstrap=50))
        result = register.run(out / "train", out / "eval" / "metrics.json", report,
                              experiment=EXPERIMENT)
        if not result.get("version"):
            raise CheckFailed(f"run {i + 1} was not registered: {result}")
        run_ids.append(result["run_id"])
        versions.append(str(result["version"]))
        if i == 0:  # the first version becomes champion; the next stays challenger
            promote.run("balanced_accuracy", model_name=MODEL)
        say(f"run {i + 1}: trained {n_epochs} epoch(s), evaluated, registered as {MODEL} "
            f"version {result['version']}")

    client = mlflow.MlflowClient()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for run_id in run_ids:  # what the UI will be asked to show is in the store
        logged = client.get_run(run_id).data.metrics
        if lost := [m for m in METRIC_NAMES if f"test_{m}" not in logged]:
            raise CheckFailed(f"run {run_id} has no test_ metric for {lost}")
    share_runs_view(client, experiment_id)
    return {"experiment_id": experiment_id, "run_ids": run_ids, "versions": versions,
            "aliases": dict(client.get_registered_model(MODEL).aliases)}


# -- Chromium ---------------------------------------------------------------------------------
def chromium(url: str, profile: Path, picture: Path, height: int, budget_ms: int,
             timeout: float = 120) -> str:
    """Load `url` in headless Chromium, let it run `budget_ms` of virtual time, save a
    screenshot (WIDTH x height) to `picture`; returns the DOM at that moment."""
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio",
           f"--user-data-dir={profile}", f"--host-resolver-rules=MAP {UI_HOST} 127.0.0.1",
           f"--window-size={WIDTH},{height}", f"--virtual-time-budget={budget_ms}",
           "--run-all-compositor-stages-before-draw", f"--screenshot={picture}", "--dump-dom",
           url]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            raise CheckFailed(f"chromium ran past {timeout} s on {url}") from None
    if proc.returncode != 0:
        raise CheckFailed(f"chromium exited {proc.returncode} on {url}:\n{err[-2000:]}")
    return out


def check_page(page: Page, out: Path, profile: Path, budget_ms: int) -> dict:
    """Load the page, require each of its patterns in the DOM; keep its screenshot."""
    picture = out / f"{page.name}.png"
    picture.unlink(missing_ok=True)
    dom = chromium(page.url, profile, picture, page.height, budget_ms)
    missing = [label for label, pattern in page.expected.items() if not re.search(pattern, dom)]
    if missing:
        (out / f"{page.name}.html").write_text(dom)
        raise CheckFailed(f"{page.name}: {page.url} does not show {missing} "
                          f"(the DOM it had after {budget_ms} ms: {out / f'{page.name}.html'}; "
                          f"its screenshot: {picture})")
    (out / f"{page.name}.html").unlink(missing_ok=True)  # a failed try's DOM
    data = picture.read_bytes() if picture.is_file() else b""
    if not data.startswith(PNG_MAGIC) or len(data) < MIN_PNG_BYTES:
        raise CheckFailed(f"{page.name}: the screenshot {picture} is missing or nearly empty "
                          f"({len(data)} bytes)")
    return {"page": page.name, "url": page.url, "found": list(page.expected), "png": str(picture),
            "bytes": len(data)}


def pages(base: str, state: dict) -> list[Page]:
    """The three pages, by the UI's hash routes (MLflow 3: #/experiments/<id>/runs,
    #/experiments/<id>/runs/<run id>, #/models/<name>)."""
    exp, run_id = state["experiment_id"], state["run_ids"][-1]
    metrics = {f"metric {m}": rf"\btest_{m}\b" for m in METRIC_NAMES}

    def alias(name: str) -> str:  # the version's alias tag: "@ champion"
        return rf"@(?:&nbsp;|\s|\u00a0)*{re.escape(name)}\b"

    return [
        Page("mlflow_runs", f"{base}/#/experiments/{exp}/runs?viewStateShareKey={SHARE_KEY}", 600,
             {**metrics, **{f"run {r[:8]}": re.escape(r) for r in state["run_ids"]}}),
        Page("mlflow_run", f"{base}/#/experiments/{exp}/runs/{run_id}", 1100,
             {**metrics, "run id": re.escape(run_id)}),
        Page("mlflow_model", f"{base}/#/models/{MODEL}", 1100,
             {"model name": re.escape(MODEL),
              **{f"alias {a}": alias(a) for a in sorted(state["aliases"])},
              **{f"version {v}": rf"Version {v}\b" for v in state["versions"]}}),
    ]


def share_runs_view(client, experiment_id: str) -> None:
    """Make the runs table show the headline metrics, sorted by balanced accuracy: a view
    shared the UI's way (an experiment tag mlflow.sharedViewState.<key>, opened with
    ?viewStateShareKey=<key>); by default the table shows no metric column."""
    columns = [f"metrics.`test_{m}`" for m in METRIC_NAMES]
    view = {"selectedColumns": ["attributes.`Models`", *columns],
            "columnOrder": ["attributes.`Models`", *columns],
            "columnWidths": {"attributes.`Models`": 170, columns[0]: 170,  # fit 1400 px
                             columns[1]: 125, columns[2]: 125, columns[3]: 135},
            "orderByKey": columns[0], "orderByAsc": False}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(view))


# -- main -------------------------------------------------------------------------------------
def _import_pipeline() -> None:
    """make_runs's imports."""
    import components.class_weights  # noqa: F401
    import components.evaluate  # noqa: F401
    import components.evaluation.mlflow_log  # noqa: F401
    import components.preprocess  # noqa: F401
    import components.register  # noqa: F401
    import components.split  # noqa: F401
    import components.commands.promote  # noqa: F401
    import components.commands.synth  # noqa: F401
    import components.train  # noqa: F401


def run(out: Path, budget_ms: int = 8_000, n_images: int = 64, epochs: tuple[int, int] = (1, 2),
        keep: bool = False) -> list[dict]:
    """Server, runs, registry, then the three pages; returns one record per page checked."""
    from mlflow_server import start_mlflow_server

    if not os.access(CHROMIUM, os.X_OK):
        raise CheckFailed(f"{CHROMIUM} not found: `apt-get install chromium` (Debian's package)")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ui_pictures-"))
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY",
                                            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    started = time.perf_counter()
    # torch, mlflow and the steps take a while to import: meanwhile the server starts
    preload = threading.Thread(target=_import_pipeline, daemon=True)
    preload.start()
    try:
        with start_mlflow_server(work / "server", env={**os.environ, **SERVER_ENV}) as uri:
            preload.join()
            print(f"mlflow server at {uri} ({time.perf_counter() - started:.0f} s to start; "
                  f"store in {work / 'server'})", flush=True)
            os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true",
                              MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
            state = make_runs(work / "pipeline", n_images, epochs)
            print(f"runs {state['run_ids']} in experiment {state['experiment_id']}; {MODEL} "
                  f"versions {state['versions']}, aliases {state['aliases']}", flush=True)
            base = f"http://{UI_HOST}:{uri.rsplit(':', 1)[1]}"
            results = []
            for page in pages(base, state):
                results.append(check_page(page, out, work / "chromium", budget_ms))
                print(f"ok  {page.name}: shows {', '.join(page.expected)} -> {results[-1]['png']} "
                      f"({results[-1]['bytes'] // 1000} kB)", flush=True)
            return results
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN)
        print(f"{time.perf_counter() - started:.0f} s in all; CPU {own.ru_utime + own.ru_stime:.0f} s "
              f"here, {children.ru_utime + children.ru_stime:.0f} s in the server and Chromium",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="docs/ui_pictures.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images",
                        help="folder for the PNGs (default docs/images)")
    parser.add_argument("--budget_ms", type=int, default=8_000,
                        help="Chromium's virtual time for a page to load (ms; default 8000)")
    parser.add_argument("--n_images", type=int, default=64, help="synthetic images (default 64)")
    parser.add_argument("--epochs", type=lambda t: tuple(int(x) for x in t.split(",")),
                        default=(1, 2), help="epochs of the two runs (default 1,2)")
    parser.add_argument("--keep", action="store_true", help="keep the server's temporary folder")
    args = parser.parse_args(argv)
    try:
        run(args.out, args.budget_ms, args.n_images, args.epochs, args.keep)
    except CheckFailed as exc:
        print(f"ui_pictures: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"ui_pictures: all checks passed; pictures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
