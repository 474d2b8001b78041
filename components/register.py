"""register step: the trained EMA model as a new version of an MLflow registered model.

    python -m components.register --train_dir outputs/train --metrics outputs/eval/metrics.json \\
        --split_report data/splits/split_report.json [--params params.yaml] [--out FILE]
    python -m components.register --run_id <training run id> --metrics ... --split_report ...

What it does, in order:

1. the gate: registers only when metrics[register.gate_metric] clears register.gate_threshold
   (>=, or <= for a lower-is-better metric such as ece; the one place the pipeline decides
   it: DVC, KFP and the CLI all come here);
2. finds the weights (ema_weights.pt in the training folder, or the serving model the training
   logged into its run) and checks them: finite, and the very weights metrics.json scored
   (evaluate records their digest) on the split the training used (split hashes of the
   training, of metrics.json and of the split report agree); otherwise it refuses, naming both;
3. checks the numbers it copies from metrics.json (the gate metric, its interval, the card's
   metrics) against those evaluate logged to MLflow for these weights (the training run, or
   the evaluation run tagged with their digest): an edited metrics.json is refused, naming the
   metric and both values; if a version of the registered model already comes from this run
   (or, untracked, these weights), returns it: no second version, also when several
   registers run at once;
4. reuses the serving model the training logged into its run (registry/pyfunc.py), or logs it
   (an untracked training gets a run of its own);
5. creates the version with a handful of lineage tags and the model card as its description
   (registry/model_card.py), logs model_card.json into the run, and points alias `challenger`
   at the version;
6. logs the train and val images and lesions of the split folder beside the split report
   into the run (registry/seen_lesions.py): promote leaves them out when it scores this
   model on another version's test split.

Connection errors are retried with exponential backoff (register.retries, register.backoff_s);
after that the step fails naming the tracking URI (password masked).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.common import atomic, cli_args, outputs, tracking
from components.common.config import ConfigError, RegisterConfig, lower_is_better
from components.evaluation.mlflow_log import DIGEST_TAG
from components.registry import client as registry
from components.registry import model_card, pyfunc, seen_lesions
from components.training import checkpoint

log = logging.getLogger(__name__)


class LineageError(ValueError):
    """The metrics, split report and weights given to register do not belong together."""


@dataclass
class Candidate:
    """The model to register and what it was scored with."""
    run_id: str | None
    weights: dict              # the EMA state dict
    meta: dict                 # checkpoint.load_model's meta (model_config, img_size, ...)
    digest: str                # checkpoint.weights_digest(weights)
    metrics: dict              # evaluate's metrics.json
    split_report: dict
    tracking_uri_of_training: str | None = None


def _load_json(value: str | os.PathLike | dict, what: str) -> dict:
    if isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return json.loads(path.read_text())


def gate(metrics: dict, cfg: RegisterConfig) -> str | None:
    """Why the gate refuses these metrics, or None when they pass it (NaN never does)."""
    value = _number(metrics, cfg.gate_metric)
    if lower_is_better(cfg.gate_metric):
        if value <= cfg.gate_threshold:
            return None
        return f"{cfg.gate_metric}={value} is above the gate {cfg.gate_threshold} (lower is better)"
    if value >= cfg.gate_threshold:
        return None
    return f"{cfg.gate_metric}={value} is below the gate {cfg.gate_threshold}"


def _number(metrics: dict, name: str) -> float:
    """metrics.json's `name` as a float (NaN when absent); a LineageError when not a number."""
    value = metrics.get(name)
    try:
        return float("nan") if value is None else float(value)
    except (TypeError, ValueError):
        raise LineageError(f"metrics.json: {name} is not a number; re-run evaluate") from None


def copied_numbers(metrics: dict, gate_metric: str) -> dict[str, float]:
    """The numbers register copies from metrics.json into tags and the card, under the names
    evaluate logged them to MLflow (evaluation/mlflow_log.py: `test_`-prefixed)."""
    names = dict.fromkeys(("n_images", gate_metric, *model_card.CARD_METRICS))
    numbers = {f"test_{n}": _number(metrics, n) for n in names if metrics.get(n) is not None}
    for n in names:
        ci = (metrics.get("ci95") or {}).get(n) or {}
        numbers.update({f"test_{n}_ci_{end}": _number(ci, end) for end in ("low", "high")
                        if ci.get(end) is not None})
    return numbers


def mismatch(metrics: dict, logged: dict, gate_metric: str) -> str | None:
    """The first number metrics.json and an MLflow record of the evaluation disagree on."""
    for key, value in copied_numbers(metrics, gate_metric).items():
        theirs = logged.get(key)
        name = key.removeprefix("test_")
        if theirs is None:
            return f"evaluate logged no {key} (metrics.json has {name} = {value})"
        if not (math.isclose(value, theirs, rel_tol=1e-9, abs_tol=1e-12)
                or math.isnan(value) and math.isnan(theirs)):
            return f"metrics.json has {name} = {value} but evaluate logged {theirs}"
    return None


def check_metrics(client, c: Candidate, run, gate_metric: str) -> None:
    """Refuse metrics.json unless its numbers are those evaluate logged for these weights: in
    an evaluation run tagged with their digest, or (evaluated before that tag) the training
    run. MLflow's record, not the file: a file is edited by hand or by mistake."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.`{DIGEST_TAG}` = '{c.digest}'",
                               order_by=["attributes.start_time DESC"], max_results=20)
    records = [(r.info.run_id, r.data.metrics) for r in found]
    if run is not None and run.info.run_id not in {r for r, _ in records}:
        records.append((run.info.run_id, run.data.metrics))
    problems = [(run_id, mismatch(c.metrics, logged, gate_metric)) for run_id, logged in records]
    if not problems:
        raise LineageError(f"MLflow holds no evaluation of weights {c.digest[:16]}: register "
                           f"checks metrics.json against what evaluate logged; run evaluate "
                           f"with MLflow (not --no_mlflow) on the same tracking server")
    if all(problem for _, problem in problems):
        run_id, problem = problems[0]
        raise LineageError(f"{problem} (run {run_id}): metrics.json is not what evaluate "
                           f"wrote; re-run evaluate, or restore the file")


def check_lineage(metrics: dict, split_report: dict, digest: str,
                  trained_split: str | None) -> None:
    """Refuse metrics of other weights, or of another split than the one trained on."""
    scored = metrics.get("weights_digest")
    if scored != digest:
        raise LineageError(
            f"metrics.json scored weights {scored or '(no weights_digest: re-run evaluate)'}, "
            f"but the weights to register are {digest}: evaluate these weights first")
    hashes = {"split report": split_report.get("split_hash"),
              "metrics.json": metrics.get("split_hash"), "training": trained_split}
    known = {k: v for k, v in hashes.items() if v}
    if len(set(known.values())) > 1:
        raise LineageError("the split hashes differ: " + ", ".join(
            f"{k} {v[:16]}" for k, v in known.items()) + "; evaluate and register on the "
            "split the model was trained on")
    if not hashes["split report"]:
        raise LineageError("the split report has no split_hash (is it split_report.json?)")


def load_candidate(source: str | os.PathLike, metrics: dict, split_report: dict,
                   client=None) -> Candidate:
    """The weights of a training folder, an ema_weights.pt file, or a run's logged model."""
    path = Path(source)
    summary = {}
    if path.is_dir():
        if (path / outputs.TRAINING_SUMMARY).is_file():
            summary = json.loads((path / outputs.TRAINING_SUMMARY).read_text())
        path = path / outputs.EMA_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} holds no {outputs.EMA_WEIGHTS} (did "
                                    f"training complete?)")
    if path.is_file():
        model, meta = checkpoint.load_model(path, which="ema")
        meta["calibration"] = path.parent / outputs.CALIBRATION  # fitted beside the weights
        run_id = summary.get("mlflow_run_id")
    elif re.fullmatch(r"[0-9a-f]{32}", str(source)):
        run_id = str(source)
        model, meta = _logged_model(client, run_id)
    else:
        raise FileNotFoundError(f"{source} is neither a training folder, a weights file nor a "
                                f"run id")
    weights = model.state_dict()
    checkpoint.check_finite(weights, str(source))
    digest = checkpoint.weights_digest(weights)
    check_lineage(metrics, split_report, digest, meta.get("split_hash"))
    return Candidate(run_id, weights, meta, digest, metrics, split_report,
                     summary.get("tracking_uri"))


def _logged_model(client, run_id: str):
    """(model, meta) of the serving model logged into run `run_id`."""
    run = client.get_run(run_id)
    logged = pyfunc.existing_model(client, run)
    if logged is None:
        raise FileNotFoundError(f"run {run_id} has no logged `{pyfunc.ARTIFACT_NAME}` model; "
                                f"pass the training folder instead")
    net, info = pyfunc.load_network(f"models:/{logged.model_id}")
    return net, {**info, "split_hash": run.data.tags.get("split_hash")}


def run(source: str | os.PathLike, metrics: str | os.PathLike | dict,
        split_report: str | os.PathLike | dict, *, config: RegisterConfig | None = None,
        tracking_uri: str | None = None, alias: str = registry.CHALLENGER,
        extra_tags: dict | None = None, use_gate: bool = True,
        experiment: str = tracking.DEFAULT_EXPERIMENT) -> dict:
    """Register the EMA model of a training run as a version of cfg.model_name, alias `alias`.

    Args:
        source: the training output folder (ema_weights.pt + training_summary.json), an
            ema_weights.pt file (an untracked training: a run is made for it), or the
            training run id (the serving model it logged is used).
        metrics, split_report: evaluate's metrics.json and split's split_report.json (paths
            or dicts).
        config: params.yaml's `register` section (model name, gate, retries).
        extra_tags: provenance of a Kubeflow run (data_hash, data_source, data_rev).
        use_gate: False registers whatever the metrics (`--no_gate`).

    Returns:
        {"name", "version" (None when the gate refused), "alias", "run_id", "created",
         "model_uri", "aliases"} plus "skipped" (the reason) when the gate refused.
    """
    cfg = config or RegisterConfig()
    registry.check_name(cfg.model_name)
    registry.check_alias(alias)
    metrics = _load_json(metrics, "metrics")
    # the split CSVs lie beside the report (split's output folder)
    split_dir = None if isinstance(split_report, dict) else Path(split_report).parent
    split_report = _load_json(split_report, "split report")
    # not registering needs no check: an edited metrics.json can only cost a registration
    if use_gate and (reason := gate(metrics, cfg)):
        log.warning("not registering: %s", reason)
        return {"name": cfg.model_name, "version": None, "alias": None, "run_id": None,
                "created": False, "model_uri": None, "aliases": [], "skipped": reason}
    client, uri = registry.client_for(tracking_uri)

    def attempt() -> dict:
        tracking.check_reachable(uri)
        candidate = load_candidate(source, metrics, split_report, client)
        run = training_run(client, uri, candidate)
        check_metrics(client, candidate, run, cfg.gate_metric)
        result = _register(client, candidate, run, cfg, alias, extra_tags, experiment)
        if split_dir is not None:  # what promote leaves out when it scores this model
            version = client.get_model_version(result["name"], result["version"])
            seen_lesions.log_seen(client, version.run_id, split_dir, split_report.get("split_hash"))
        return result

    return registry.with_retries(attempt, uri, cfg.retries, cfg.backoff_s)


def training_run(client, uri: str, c: Candidate):
    """The training's MLflow run, or None for an untracked training."""
    from mlflow.exceptions import MlflowException

    if not c.run_id:
        return None
    try:
        return client.get_run(c.run_id)
    except MlflowException as err:
        where = c.tracking_uri_of_training
        raise LookupError(f"training run {c.run_id} is not in {tracking.redact(uri)}"
                          + (f" (training logged to {where})" if where else "")) from err


def _register(client, c: Candidate, run, cfg: RegisterConfig, alias: str,
              extra_tags: dict | None, experiment: str) -> dict:
    import mlflow

    name = cfg.model_name
    existing = registry.find_version(client, name, c.run_id, c.digest)
    if existing is not None:
        return _already(client, name, existing.version, alias, c.run_id)

    if run is None:  # untracked training: a run of its own holds the registered model
        # ensure_experiment: artifacts in the project's store, not ./mlruns of this folder
        found = tracking.ensure_experiment(mlflow.get_tracking_uri(), experiment)
        mlflow.set_experiment(experiment_id=found.experiment_id)
        with mlflow.start_run(run_name=f"register-{c.digest[:8]}",
                              tags={"skinlesion.step": "register",
                                    "weights_hash": c.digest}) as active:
            run = client.get_run(active.info.run_id)
    run_id = run.info.run_id
    logged = pyfunc.existing_model(client, run)
    if logged is not None:
        model_uri, model_id = f"models:/{logged.model_id}", logged.model_id
    else:
        model_uri, model_id = pyfunc.log_model(run_id, c.weights,
                                               {**c.meta, "weights_digest": c.digest},
                                               c.meta.get("calibration"))

    params = dict(run.data.params)
    tags = model_card.version_tags(run_id, dict(run.data.tags), params, c.metrics,
                                   c.split_report, c.digest, cfg.gate_metric, extra_tags)
    from components.registry import serving  # mlflow at import: only once registering

    preprocessing = serving.preprocessing_info(c.meta)
    n_params = sum(t.numel() for k, t in c.weights.items() if not k.endswith("num_batches_tracked"))
    card = model_card.model_card(name, run_id, run.info.run_name or run_id, tags, c.metrics,
                                 c.split_report, preprocessing, n_params)
    registry.ensure_registered_model(client, name)
    version = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags,
                                          description=card, model_id=model_id)
    # MLflow has no transactions, so concurrent registers of one run (a KFP retry beside the
    # first try) can each create a version. Each looks again after creating: the lowest
    # version from this run wins (any lower one was created earlier, so every later look sees
    # it), and a register whose version is not the lowest deletes its own and reports the
    # winner. No lock: a killed register would leave one blocking the very retry that heals.
    first = registry.find_version(client, name, c.run_id, c.digest)
    if str(first.version) != str(version.version):
        client.delete_model_version(name, version.version)
        if not c.run_id:  # the run this register made for an untracked training
            client.delete_run(run_id)
        return _already(client, name, first.version, alias, c.run_id)
    client.set_registered_model_alias(name, alias, version.version)
    details = model_card.card_details(name, str(version.version), tags, c.metrics,
                                      c.split_report, preprocessing, params, n_params)
    with tempfile.TemporaryDirectory(prefix="card-") as tmp:
        card_file = Path(tmp) / pyfunc.CARD_ARTIFACT
        card_file.write_text(json.dumps(details, indent=2, default=str) + "\n")
        client.log_artifact(run_id, str(card_file), artifact_path=f"registry/{name}-v{version.version}")
    for key, value in (("split_hash", tags.get("split_hash")),
                       ("registered_model", f"{name}/{version.version}")):
        if value:
            client.set_tag(run_id, key, value)
    log.info("registered %s version %s from run %s as @%s", name, version.version, run_id, alias)
    return _result(name, version.version, alias, run_id, True,
                   registry.aliases_of(client, name, version.version))


def _already(client, name: str, version, alias: str, run_id: str | None) -> dict:
    """The result for a version registered before (by an earlier or a concurrent register);
    it gets `alias` unless it already has aliases."""
    aliases = registry.aliases_of(client, name, version)
    if not aliases:
        client.set_registered_model_alias(name, alias, version)
        aliases = [alias]
    log.info("run %s is already %s version %s (aliases %s)", run_id, name, version, aliases)
    return _result(name, version, alias if alias in aliases else None, run_id, False, aliases)


def _result(name, version, alias, run_id, created, aliases) -> dict:
    return {"name": name, "version": str(version), "alias": alias, "run_id": run_id,
            "created": created, "model_uri": f"models:/{name}/{version}", "aliases": aliases}


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="python -m components.register",
                                     description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--train_dir", help="training output folder")
    src.add_argument("--run_id", help="training run id (registers the model it logged)")
    parser.add_argument("--metrics", required=True, help="evaluate's metrics.json")
    parser.add_argument("--split_report", required=True, help="split_report.json")
    cli_args.add_params_flags(parser)
    parser.add_argument("--alias", default=registry.CHALLENGER)
    parser.add_argument("--tracking_uri")
    parser.add_argument("--out", help="write the result JSON here too (a DVC output)")
    parser.add_argument("--no_gate", dest="gate", action="store_false",
                        help="register even when the gate metric is below register.gate_threshold")
    cli_args.add_config_flags(parser, RegisterConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = RegisterConfig.resolve(cli_args.params_paths(args),
                                     **cli_args.config_flags(args, RegisterConfig))
        result = run(args.train_dir or args.run_id, args.metrics, args.split_report, config=cfg,
                     tracking_uri=args.tracking_uri, alias=args.alias, use_gate=args.gate)
    except (registry.RegistryUnavailable, registry.BadName, FileNotFoundError, LookupError,
            LineageError, ConfigError, checkpoint.CheckpointError) as err:
        print(f"register: {tracking.scrub(str(err))}", file=sys.stderr)
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
