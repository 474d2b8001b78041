"""register step: the trained EMA model as a new version of an MLflow registered model.

    python -m components.register --train_dir outputs/train --metrics outputs/evaluate/metrics.json \
        --split_report data/splits/split_report.json [--model_name skin-lesion-hybrid] [--out FILE]
    python -m components.register --run_id <training run id> --metrics ... --split_report ...

What it does, each part idempotent:

1. finds the training run (training_summary.json's `mlflow_run_id`, or `--run_id`) and the EMA
   weights (`ema_weights.pt` in the training folder, read with `torch.load(weights_only=True)`,
   or, given only a run id, the run's `ema_weights.pt` artifact);
2. if a version of the registered model already has tag `source_run_id` = that run, returns it
   (no second version; its aliases are left as they are unless it has none, then it gets
   `challenger`);
3. logs the serving model (components/serving.py, an mlflow.pyfunc model: safetensors weights
   + preprocessing JSON, no pickle) into the training run as `classifier`, unless the run
   already has one;
4. creates the version with tags (source_run_id, git_commit, data_hash, split_hash,
   split_mode, params_hash, weights_sha256, test_<metric> for the headline metrics and
   their 95% intervals) and a model card as its description, and points alias `challenger`
   at it. The training run gets tags split_hash / split_mode / registered_model.

A gate (`register.gate_metric` >= `register.gate_threshold` in params.yaml) can skip the
registration: the result then has version None and a `skipped` reason.

Connection errors are retried with exponential backoff (`retries`, `backoff_s`); after that the
step fails naming the tracking URI (password masked).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import atomic, tracking

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "skin-lesion-hybrid"
CHALLENGER, CHAMPION = "challenger", "champion"
ARTIFACT_NAME = "classifier"          # the pyfunc model's name inside the training run
SUMMARY_FILE = "training_summary.json"
EMA_FILE = "ema_weights.pt"
# metrics.json keys shown in the card and stored as tags (with their ci95 intervals)
CARD_METRICS = ("balanced_accuracy", "accuracy", "f1_macro", "precision_macro", "recall_macro",
                "roc_auc_macro", "top2_accuracy", "ece")
SECRETISH = re.compile(r"pass(word)?|secret|token|credential|access[_-]?key|api[_-]?key", re.I)


class RegistryUnavailable(RuntimeError):
    """The tracking / registry server could not be reached after the retries."""


# ------------------------------------------------------------------ inputs

def _load_json(value: str | os.PathLike | dict | None, what: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return json.loads(path.read_text())


def _source(source: str | os.PathLike) -> tuple[str | None, Path | None, dict]:
    """(run_id, EMA weights file or None, training summary) from a training folder, an
    ema_weights.pt / checkpoint file, or a run id."""
    path = Path(source)
    if path.is_dir():
        summary = _load_json(path / SUMMARY_FILE, "training summary") if (path / SUMMARY_FILE).is_file() else {}
        weights = Path((summary.get("paths") or {}).get("ema_weights") or path / EMA_FILE)
        if not weights.is_file():
            weights = path / EMA_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{path} holds no {EMA_FILE} (did training complete?)")
        return summary.get("mlflow_run_id"), weights, summary
    if path.is_file():
        return None, path, {}
    if re.fullmatch(r"[0-9a-f]{32}", str(source)):
        return str(source), None, {}
    raise FileNotFoundError(f"{source} is neither a training folder, a weights file nor a run id")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def params_hash(params: dict[str, str]) -> str:
    """sha256 (first 16 hex) of the run's training params (`train.*`), sorted: equal hashes,
    equal recipes."""
    train = {k: v for k, v in params.items() if k.startswith("train.")} or params
    return hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()[:16]


def clean_tags(tags: dict) -> dict[str, str]:
    """Tags as strings, without anything that looks like a secret: keys naming one are dropped,
    URLs lose their user:password."""
    out = {}
    for key, value in tags.items():
        if value is None or SECRETISH.search(str(key)):
            continue
        text = str(value)
        if "://" in text:
            text = tracking.redact(text)
        out[str(key)] = text[:5000]
    return out


def version_tags(run_id: str | None, run_tags: dict, run_params: dict, metrics: dict,
                 split_report: dict, weights_sha256: str, extra: dict | None = None) -> dict[str, str]:
    """The tags a registered version carries (all strings; see the module docstring)."""
    tags = {
        "source_run_id": run_id or "",
        "git_commit": run_tags.get("git_commit") or run_tags.get("mlflow.source.git.commit") or tracking.git_commit(),
        "data_hash": run_tags.get("data_hash") or (extra or {}).get("data_hash") or "",
        "split_hash": split_report.get("split_hash", ""),
        "split_mode": split_report.get("mode", ""),
        "params_hash": run_tags.get("params_hash") or (params_hash(run_params) if run_params else ""),
        "weights_sha256": weights_sha256,
        "evaluated_weights": str(metrics.get("weights", "")),
        "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if metrics.get("n_images") is not None:
        tags["test_n_images"] = str(metrics["n_images"])
    for name in CARD_METRICS:
        if metrics.get(name) is not None:
            tags[f"test_{name}"] = f"{float(metrics[name]):.6f}"
        ci = (metrics.get("ci95") or {}).get(name) or {}
        for end in ("low", "high"):
            if ci.get(end) is not None:
                tags[f"test_{name}_ci_{end}"] = f"{float(ci[end]):.6f}"
    for key in ("train.preset", "train.img_size", "train.epochs", "train.seed"):
        if key in run_params:
            tags[key.removeprefix("train.")] = run_params[key]
    return clean_tags({**(extra or {}), **tags})


def model_card(model_name: str, run_id: str | None, run_name: str, tags: dict, metrics: dict,
               split_report: dict, preprocessing: dict, n_params: int | None) -> str:
    """The version description: a short model card in Markdown."""
    cfg = preprocessing.get("model_config", {})
    mode = split_report.get("mode", "unknown")
    sizes = split_report.get("sizes") or {}
    mode_text = {
        "grouped": "lesion-grouped (no lesion in two splits)",
        "paper": "image-level stratified, as in the paper (images of one lesion can be in train "
                 f"and test: {100 * float(split_report.get('test_lesion_leakage') or 0):.0f}% of "
                 "test images here), so the scores overstate performance on new lesions",
    }.get(mode, mode)
    boot = metrics.get("bootstrap") or {}
    lines = [
        f"# {model_name}: hybrid ConvNeXtV2 + separable self-attention (EMA weights)",
        "",
        f"Ozdemir & Pacal, Sci Rep 2025, 15:4938. Preset `{cfg.get('preset', '?')}`"
        + (f", {n_params / 1e6:.2f}M parameters" if n_params else "")
        + f", input {preprocessing.get('img_size')} px, classes {', '.join(preprocessing.get('classes', []))}.",
        f"Training run `{run_name}` ({run_id or 'not tracked'}), git {tags.get('git_commit', '?')[:12]}, "
        f"params hash {tags.get('params_hash') or '?'}.",
        "",
        "## Data",
        f"- data hash: `{tags.get('data_hash') or '?'}`",
        f"- split: {mode_text}; split hash `{split_report.get('split_hash', '?')[:16]}`"
        + (f"; sizes train {sizes.get('train')}, val {sizes.get('val')}, test {sizes.get('test')}" if sizes else ""),
        "",
        f"## Test metrics ({metrics.get('n_images', '?')} images; 95% bootstrap intervals"
        + (f" over {boot.get('unit')}s, {boot.get('resamples')} resamples" if boot else "") + ")",
        "",
        "| metric | value | 95% interval |",
        "|---|---|---|",
    ]
    for name in CARD_METRICS:
        if metrics.get(name) is None:
            continue
        ci = (metrics.get("ci95") or {}).get(name) or {}
        interval = f"{ci['low']:.4f} - {ci['high']:.4f}" if ci.get("low") is not None and ci.get("high") is not None else "-"
        lines.append(f"| {name} | {float(metrics[name]):.4f} | {interval} |")
    lines += [
        "",
        "## Input",
        f"RGB image; short side resized to {preprocessing.get('prepare_size')} (as the preprocess step did), "
        f"then to {preprocessing.get('resize_size')} and centre-cropped to {preprocessing.get('img_size')}, "
        f"normalised with mean {preprocessing.get('mean')} and std {preprocessing.get('std')}. "
        "pyfunc input: DataFrame column `image` of paths, bytes or base64; output: one probability "
        "column per class, `predicted`, `error`.",
        "",
        "## Intended use",
        "Research and teaching: comparing training recipes and MLOps practice on dermoscopy "
        "images of the eight ISIC 2019 classes.",
        "",
        "## Limits",
        "- A research model, **not a medical device**: not validated clinically, not for diagnosis, "
        "triage or any decision about a patient.",
        "- Trained on ISIC-style dermoscopy images (mostly lighter skin types, referral-centre "
        "cases); other devices, clinical photographs and populations are untested.",
        "- Always answers one of the eight classes: an image of anything else (or not a lesion) "
        "still gets one; probabilities can be miscalibrated"
        + (f" (ECE {float(metrics['ece']):.3f} on test)." if metrics.get("ece") is not None else "."),
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ retries

def is_connection_error(err: BaseException) -> bool:
    """True for errors that a later retry can cure: the server not answering."""
    import requests

    if isinstance(err, (tracking.TrackingUnreachable, ConnectionError, TimeoutError,
                        requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    text = str(err)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "ConnectionError",
                                   "Failed to establish a new connection", "Read timed out",
                                   "Connection aborted", "RemoteDisconnected"))


def with_retries(fn, uri: str, retries: int = 4, backoff_s: float = 2.0):
    """Call fn(); on a connection error wait backoff_s * 2**attempt and try again, `retries`
    times; then raise RegistryUnavailable naming the (redacted) URI."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below
            if not is_connection_error(err):
                raise
            if attempt == retries:
                raise RegistryUnavailable(
                    f"MLflow at {tracking.redact(uri)} did not answer after {retries + 1} attempts: "
                    f"{err}") from err
            wait = backoff_s * 2 ** attempt
            log.warning("MLflow at %s unreachable (%s); retrying in %.1f s", tracking.redact(uri),
                        str(err).splitlines()[0][:200], wait)
            time.sleep(wait)


def client_for(tracking_uri: str | None):
    """(MlflowClient, uri) for the given URI, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    import mlflow

    uri = tracking_uri or tracking.tracking_uri()
    tracking.use_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri


# ------------------------------------------------------------------ registry helpers

def find_version(client, name: str, run_id: str | None, weights_sha256: str):
    """The version of `name` registered from this run (or, untracked, these weights), or None."""
    from mlflow.exceptions import MlflowException

    key, value = ("source_run_id", run_id) if run_id else ("weights_sha256", weights_sha256)
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.{key} = '{value}'")
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code):
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


def aliases_of(client, name: str, version: str | int) -> list[str]:
    model = client.get_registered_model(name)
    return sorted(a for a, v in (model.aliases or {}).items() if str(v) == str(version))


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
            raise
        try:
            client.create_registered_model(
                name, description="Hybrid ConvNeXtV2 skin-lesion classifier (ISIC 2019, 8 classes). "
                "Research model, not a medical device. Aliases: `challenger` (latest registered), "
                "`champion` (promoted through the metric gate: `skinlesion promote`).")
        except MlflowException as race:  # created meanwhile by another process
            if "ALREADY_EXISTS" not in str(race.error_code):
                raise


def _existing_pyfunc(client, run, name: str = ARTIFACT_NAME):
    """A pyfunc model already logged into the run under `name` (an earlier, interrupted try)."""
    try:
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'")
    except Exception:  # noqa: BLE001 - older stores: just log a new one
        return None
    ready = [m for m in models if str(getattr(m, "status", "")).endswith("READY")]
    return ready[0] if ready else None


def pyfunc_kwargs(artifacts: dict, classes: list[str]) -> dict:
    """Arguments of mlflow.pyfunc.log_model / save_model for the serving model: the code file
    components/serving.py (models from code: no pickle), its two artifacts, the `model` and
    `components` packages as code paths, the signature and pinned requirements."""
    from . import serving

    root = Path(__file__).resolve().parents[1]
    return dict(python_model=str(Path(serving.__file__).resolve()), artifacts=artifacts,
                code_paths=[str(root / "model"), str(root / "components")],
                signature=serving.signature(classes), pip_requirements=requirements())


def _log_pyfunc(run_id: str, artifacts: dict, classes: list[str]):
    """Log the serving model into the run as `classifier`; returns its URI and model id."""
    import mlflow

    # start_run(run_id) refuses a run outside the process's active experiment, which an
    # earlier call in the same process may have set to another one.
    mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # input-example advice
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name=ARTIFACT_NAME, **pyfunc_kwargs(artifacts, classes))
    return info.model_uri, info.model_id


def requirements() -> list[str]:
    """Pinned runtime requirements of the serving model (explicit: MLflow's inference would
    import the model in a subprocess, slowly)."""
    import importlib.metadata as md

    names = ("mlflow", "torch", "torchvision", "timm", "safetensors", "pillow", "pandas", "numpy",
             "pyyaml")
    out = []
    for name in names:
        try:
            out.append(f"{name}=={md.version(name).split('+')[0]}")
        except md.PackageNotFoundError:
            out.append(name)
    return out


# ------------------------------------------------------------------ the step

def run(source: str | os.PathLike, metrics: str | os.PathLike | dict,
        split_report: str | os.PathLike | dict, model_name: str = DEFAULT_MODEL_NAME,
        tracking_uri: str | None = None, *, alias: str = CHALLENGER,
        extra_tags: dict | None = None, gate_metric: str | None = None,
        gate_threshold: float | None = None, prepare_size: int | None = None,
        experiment: str = tracking.DEFAULT_EXPERIMENT, retries: int = 4,
        backoff_s: float = 2.0) -> dict:
    """Register the EMA model of a training run as a version of `model_name`, alias `alias`.

    Args:
        source: the training output folder (ema_weights.pt + training_summary.json), an
            ema_weights.pt file (an untracked training: a new run is made for it), or the
            training run id (its `ema_weights.pt` artifact is used).
        metrics: evaluate's metrics.json (path or dict): headline metrics + `ci95`.
        split_report: split's split_report.json (path or dict): `split_hash`, `mode`, `sizes`.
        model_name: registered model name (params.yaml register.model_name).
        tracking_uri: default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.
        extra_tags: more version tags (e.g. KFP provenance: data_hash, data_source, data_rev);
            secret-looking keys are dropped, URLs redacted.
        gate_metric, gate_threshold: skip registering when metrics[gate_metric] < threshold.
        prepare_size: short side the preprocess step resized to (default: the run's
            `preprocess.size` param, else img_size*256/224).

    Returns:
        {"name", "version" (str, None when gated out), "alias", "run_id", "created" (bool),
         "model_uri" ("models:/NAME/VERSION"), "aliases" (all aliases of the version)}
        plus "skipped" (reason) when the gate refused.
    """
    metrics = _load_json(metrics, "metrics")
    split_report = _load_json(split_report, "split report")
    if gate_metric and gate_threshold is not None:
        value = metrics.get(gate_metric)
        if value is None or float(value) < float(gate_threshold):
            reason = f"{gate_metric}={value} is below the gate {gate_threshold}"
            log.warning("not registering: %s", reason)
            return {"name": model_name, "version": None, "alias": None, "run_id": None,
                    "created": False, "model_uri": None, "aliases": [], "skipped": reason}
    run_id, weights, summary = _source(source)
    client, uri = client_for(tracking_uri)

    def attempt() -> dict:
        tracking.check_reachable(uri)
        return _register(client, uri, run_id, weights, summary, metrics, split_report,
                         model_name, alias, extra_tags, prepare_size, experiment)

    return with_retries(attempt, uri, retries, backoff_s)


def _register(client, uri, run_id, weights, summary, metrics, split_report, model_name, alias,
              extra_tags, prepare_size, experiment) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException

    from . import checkpoint, serving

    with tempfile.TemporaryDirectory(prefix="register-") as tmp:
        tmp = Path(tmp)
        run = None
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException as err:
                if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code) and "not found" not in str(err).lower():
                    raise
                where = summary.get("tracking_uri")
                raise LookupError(f"training run {run_id} is not in {tracking.redact(uri)}"
                                  + (f" (training logged to {where})" if where else "")) from err

        sha = _sha256(weights) if weights is not None else None
        existing = find_version(client, model_name, run_id, sha)
        if existing is not None:
            aliases = aliases_of(client, model_name, existing.version)
            if not aliases:
                client.set_registered_model_alias(model_name, alias, existing.version)
                aliases = [alias]
            log.info("run %s is already %s version %s (aliases %s)", run_id, model_name,
                     existing.version, aliases)
            return _result(model_name, existing.version, alias if alias in aliases else None,
                           run_id, False, aliases)

        if weights is None:  # run id only: the run's ema_weights.pt artifact
            try:
                weights = Path(client.download_artifacts(run_id, EMA_FILE, str(tmp)))
            except Exception as err:  # noqa: BLE001 - MlflowException or OSError by store
                if is_connection_error(err):
                    raise
                raise FileNotFoundError(
                    f"run {run_id} has no {EMA_FILE} artifact in {tracking.redact(uri)}; pass the "
                    f"training folder instead") from err
            sha = _sha256(weights)

        model, meta = checkpoint.load_model(weights, which="ema")  # torch.load(weights_only=True)
        if run is None:  # untracked training: a run of its own holds the registered model
            mlflow.set_experiment(experiment)
            with mlflow.start_run(run_name=f"register-{sha[:8]}",
                                  tags={"skinlesion.step": "register", "weights_sha256": sha}) as active:
                run_id = active.info.run_id
            run = client.get_run(run_id)
        params = dict(run.data.params)
        size = prepare_size or int(params.get("preprocess.size") or 0) or None
        artifacts = serving.write_artifacts(model.state_dict(), meta, tmp / "artifacts",
                                            prepare_size=size, source=f"runs:/{run_id}")
        preprocessing = json.loads(Path(artifacts["preprocessing"]).read_text())

        logged = _existing_pyfunc(client, run)
        if logged is not None:
            model_uri, model_id = f"models:/{logged.model_id}", logged.model_id
        else:
            model_uri, model_id = _log_pyfunc(run_id, artifacts, list(meta["classes"]))

        tags = version_tags(run_id, dict(run.data.tags), params, metrics, split_report, sha, extra_tags)
        card = model_card(model_name, run_id, run.info.run_name or run_id, tags, metrics,
                          split_report, preprocessing, sum(p.numel() for p in model.parameters()))
        ensure_registered_model(client, model_name)
        version = client.create_model_version(model_name, source=model_uri, run_id=run_id,
                                              tags=tags, description=card, model_id=model_id)
        client.set_registered_model_alias(model_name, alias, version.version)
        for key, value in (("split_hash", tags["split_hash"]), ("split_mode", tags["split_mode"]),
                           ("registered_model", f"{model_name}/{version.version}")):
            if value:
                client.set_tag(run_id, key, value)
        log.info("registered %s version %s from run %s as @%s", model_name, version.version,
                 run_id, alias)
        return _result(model_name, version.version, alias, run_id, True,
                       aliases_of(client, model_name, version.version))


def _result(name, version, alias, run_id, created, aliases) -> dict:
    return {"name": name, "version": str(version), "alias": alias, "run_id": run_id,
            "created": created, "model_uri": f"models:/{name}/{version}", "aliases": aliases}


def read_params(path: str | os.PathLike = "params.yaml") -> dict:
    """params.yaml's `register` section (empty when the file is absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    section = dict(data.get("register") or {})
    if (data.get("preprocess") or {}).get("size"):
        section.setdefault("prepare_size", data["preprocess"]["size"])
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.register",
                                     description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--train_dir", "--train-dir", help="training output folder")
    src.add_argument("--run_id", "--run-id", help="training run id (uses its ema_weights.pt artifact)")
    parser.add_argument("--metrics", required=True, help="evaluate's metrics.json")
    parser.add_argument("--split_report", "--split-report", required=True, help="split_report.json")
    parser.add_argument("--params", default="params.yaml", help="YAML with a `register` section")
    parser.add_argument("--model_name", "--model-name", help=f"default: params, else {DEFAULT_MODEL_NAME}")
    parser.add_argument("--alias", default=CHALLENGER)
    parser.add_argument("--tracking_uri", "--tracking-uri")
    parser.add_argument("--out", help="write the result JSON here too (a DVC output)")
    parser.add_argument("--no-gate", dest="gate", action="store_false",
                        help="register even when the gate metric is below register.gate_threshold")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = read_params(args.params)
    try:
        result = run(args.train_dir or args.run_id, args.metrics, args.split_report,
                     model_name=args.model_name or params.get("model_name") or DEFAULT_MODEL_NAME,
                     tracking_uri=args.tracking_uri, alias=args.alias,
                     gate_metric=params.get("gate_metric") if args.gate else None,
                     gate_threshold=params.get("gate_threshold") if args.gate else None,
                     prepare_size=params.get("prepare_size"),
                     retries=int(params.get("retries", 4)),
                     backoff_s=float(params.get("backoff_s", 2.0)))
    except (RegistryUnavailable, FileNotFoundError, LookupError) as err:
        print(f"register: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - the S3 artifact store refusing: name it
        message = tracking.artifact_store_failure(err)
        if message is None:
            raise
        print(f"register: {message}", file=sys.stderr)
        return 1
    if args.out:
        atomic.write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
