"""MLflow glue: where the tracking store is, whether it answers, the training's run (params,
tags, datasets, metrics), and keeping secrets out of every message.

The tracking URI comes from MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the project
(DVC_ROOT, which DVC sets for stage commands, else the current folder). With a SQLite store the
artifacts go to `mlartifacts/` beside the database, not to MLflow's default `./mlruns` of
whichever folder first created the experiment: under `dvc exp run --temp` that is DVC's
temporary copy, which DVC deletes. A server that does not answer fails within seconds, naming
the URI (with any password in it masked), rather than after MLflow's minutes of retries.

mlflow is imported inside the functions that use it: `skinlesion train --no_mlflow` and the
benchmarks run where mlflow is not installed (a bare GPU box, a slim training image).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml

DEFAULT_EXPERIMENT = "skin-lesion"
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store; also `mlflow server`'s default name
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
REACH_TIMEOUT_S = 5.0
MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value


class TrackingUnreachable(RuntimeError):
    """The tracking server did not answer."""


def project_root() -> Path:
    """The project this process works for. DVC sets DVC_ROOT for stage commands, to the
    repository `dvc exp run` was started in, not the temporary copy it runs them in."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or a SQLite file in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def local_artifact_root(uri: str) -> Path | None:
    """Where runs of a SQLite store keep their files: `mlartifacts/` beside the database.
    None for any other store (a server decides itself)."""
    if urlsplit(uri).scheme != "sqlite":
        return None
    from sqlalchemy.engine import make_url  # mlflow's own dependency, parses sqlite:////abs

    return Path(make_url(uri).database or ".").resolve().parent / ARTIFACTS_DIR


# user[:password]@ after a scheme: everything up to the LAST @ before the path, so a password
# holding a raw @ (or # or ?, which urlsplit would cut at) is masked whole
USERINFO = re.compile(r"(\b[A-Za-z][\w+.-]*://)[^/\s]*@")


def redact(uri: str) -> str:
    """The URI with any user:password replaced by ***, fit for logs and messages."""
    return USERINFO.sub(r"\1***@", uri, count=1)


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Raise TrackingUnreachable unless an http(s) server answers /health, or a local store's
    folder exists."""
    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme in ("http", "https"):
        # user:password in the URI become a Basic auth header (urllib takes them for the host).
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        request = urllib.request.Request(
            urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health")
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            request.add_header("Authorization",
                               "Basic " + base64.b64encode(token.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                if reply.status == 200:
                    return
                problem = f"/health answered HTTP {reply.status}"
        except (urllib.error.URLError, OSError) as err:
            problem = str(getattr(err, "reason", err))
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} is unreachable ({problem}); start it, point "
            f"MLFLOW_TRACKING_URI elsewhere, or pass --no_mlflow")
    if scheme == "sqlite":
        folder = Path(urlsplit(uri).path).parent
        if not folder.is_dir():
            raise TrackingUnreachable(f"MLflow store {uri}: folder {folder} does not exist")


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b": "value"} with values as MLflow-sized strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def git_commit(cwd: str | os.PathLike = ".") -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_hash(img_dir: str | os.PathLike, split_csvs: list[str | os.PathLike]) -> str:
    """An md5 naming the data: `data/raw.dvc`'s (the DVC-tracked raw data), else the
    preprocess manifest's next to the images, else one over the split CSVs themselves."""
    dvc_file = Path("data/raw.dvc")
    if dvc_file.is_file():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        if outs[0].get("md5"):
            return str(outs[0]["md5"]).removesuffix(".dir")
    manifest = Path(img_dir).parent / "manifest.csv"
    sources = [manifest] if manifest.is_file() else [Path(p) for p in split_csvs]
    digest = hashlib.md5()
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def use_uri(uri: str) -> None:
    """Point MLflow at `uri`. With user:password in it, stop MLflow printing "View run at
    <tracking URI>" links, which would show the password."""
    import mlflow

    parts = urlsplit(uri)
    if parts.username is not None or parts.password is not None:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)


def _vanished(location: str) -> bool:
    """Whether a local artifact location's folder is gone (its parent with it: a fresh
    experiment's own folder appears only with its first file)."""
    parts = urlsplit(location)
    if parts.scheme not in ("", "file"):
        return False
    return not Path(unquote(parts.path)).parent.exists()


def ensure_experiment(uri: str, name: str):
    """The experiment `name`, created when missing with its artifacts in the project (SQLite
    store) and tagged for model training. One whose local artifact folder vanished (created
    before this rule, inside a DVC temporary copy) is renamed aside, with a warning, and a new
    one takes its name: its old runs keep their metrics, their files are gone either way."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None and _vanished(found.artifact_location):
        aside = f"{name} (artifacts lost, id {found.experiment_id})"
        client.rename_experiment(found.experiment_id, aside)
        print(f"warning: MLflow experiment {name!r} kept its files in "
              f"{found.artifact_location}, which no longer exists; renamed it {aside!r} and "
              f"started a new {name!r}", file=sys.stderr, flush=True)
        found = None
    if found is None:
        root = local_artifact_root(uri)
        location = None
        if root is not None:
            folder = root / re.sub(r"[^\w.-]+", "_", name)
            folder.mkdir(parents=True, exist_ok=True)
            location = folder.as_uri()
        try:
            client.create_experiment(name, artifact_location=location)
        except MlflowException:
            if client.get_experiment_by_name(name) is None:
                raise
            # else another step created it meanwhile: use that one
        found = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in (found.tags or {}):
        # Without it, MLflow 3's UI opens an experiment in its GenAI mode (traces, prompts).
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found


def start_run(uri: str, run_id: str | None, experiment: str, tags: dict | None = None):
    """Start (or, given run_id, resume) a run; returns MLflow's active-run context."""
    import mlflow

    use_uri(uri)
    if run_id is not None:
        return mlflow.start_run(run_id=run_id, tags=tags)
    found = ensure_experiment(uri, os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment)
    mlflow.set_experiment(experiment_id=found.experiment_id)
    return mlflow.start_run(tags=tags)


def log_datasets(frames: dict, digest: str) -> None:
    """Log each split (context -> (DataFrame, csv path)) as an MLflow dataset input."""
    import mlflow

    for context, (frame, source) in frames.items():
        with warnings.catch_warnings():
            # MLflow registers two equivalent local-file sources and warns about the tie, and
            # hints about integer columns in the schema it infers: neither matters here.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=str(Path(source).resolve()),
                                              targets="label", name=Path(source).stem,
                                              digest=digest)
            mlflow.log_input(dataset, context=context)


class Run:
    """The training's MLflow run, or a stand-in that logs nothing (--no_mlflow, DDP rank > 0).

    A logging call that fails (the server went away mid-run) does not stop training: the
    failure is kept in `failure` and warned about once, later calls are skipped, and the step
    exits non-zero at the end naming the server (components.train.main).
    """

    def __init__(self, active=None, uri: str | None = None):
        self.active, self.uri = active, uri
        self.failure: str | None = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, uri: str, run_id: str | None, experiment: str):
        """Start (or resume) the run; end it FINISHED, or FAILED after an error or a failure."""
        import mlflow

        run = cls(start_run(uri, run_id, experiment), uri)
        ok = False
        try:
            yield run
            ok = True
        finally:
            if run.failure is not None:  # the server already failed after MLflow's retries
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            try:
                mlflow.end_run("FINISHED" if ok and run.failure is None else "FAILED")
            except Exception as err:  # noqa: BLE001 - recorded; the step then exits non-zero
                run._failed("ending the run", err)

    @property
    def run_id(self) -> str | None:
        return self.active.info.run_id if self.active else None

    def call(self, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs) as a logging call of this run: None without a run or after a
        failure (recorded in `failure`)."""
        if self.active is None or self.failure is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any logging failure: recorded, training goes on
            self._failed(what, err)
            return None

    def _failed(self, what: str, err: BaseException) -> None:
        if self.failure is not None:
            return
        where = f"tracking server {redact(self.uri or tracking_uri())}"
        if os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
            where += f", artifact store {redact(os.environ['MLFLOW_S3_ENDPOINT_URL'])}"
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        self.failure = scrub(f"MLflow logging failed while {what} ({where}): {detail}")
        print(f"warning: {self.failure}; training goes on without MLflow and keeps writing its "
              f"checkpoints; the step will exit non-zero at the end", file=sys.stderr, flush=True)

    def log_params(self, params: dict) -> None:
        self.call("logging params", _mlflow("log_params"), flatten(params))

    def set_tags(self, tags: dict) -> None:
        self.call("setting tags", _mlflow("set_tags"), tags)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.call(f"logging the metrics of epoch {step}", _mlflow("log_metrics"),
                   {k: float(v) for k, v in metrics.items()}, step=step)

    def log_datasets(self, frames: dict, digest: str) -> None:
        self.call("logging the datasets", log_datasets, frames, digest)


def _mlflow(name: str):
    """mlflow.<name>, imported only when a run is active (a Run without one never calls it)."""
    def call(*args, **kwargs):
        import mlflow

        return getattr(mlflow, name)(*args, **kwargs)
    return call


def artifact_store_failure(err: BaseException) -> str | None:
    """A message naming the S3 endpoint when `err` (or its cause) came from the S3 artifact
    store client (boto3), else None."""
    chain, seen = [], err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if not any(type(e).__module__.split(".")[0] in ("boto3", "botocore", "s3transfer")
               for e in chain):
        return None
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or "AWS S3 (MLFLOW_S3_ENDPOINT_URL unset)"
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return scrub(f"the MLflow artifact store at {redact(endpoint)} refused the request: {detail}")


SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "AZURE_STORAGE_ACCESS_KEY")


def scrub(text: str) -> str:
    """`text` without user:password in URLs or the values of the secret variables above."""
    text = USERINFO.sub(r"\1***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
