"""`skinlesion promote`: move the `champion` alias to the `challenger` through a metric gate.

    skinlesion promote --metric balanced_accuracy [--min-delta 0.0] [--force --reason TEXT] \
        [--to NAME] [--model-name skin-lesion-hybrid]

Decision, from the versions behind the two aliases of the registered model:

- no challenger: refused;
- no champion yet: the challenger becomes champion ("first");
- challenger already champion: kept;
- each side's metric is what its version recorded at registration (tag `test_<metric>`, else
  its run's `test_<metric>` metric); a side without it: refused;
- different test splits (tag `split_hash`, else the run's tag) or an unknown split: refused,
  naming both hashes: scores on different test sets do not compare;
- otherwise promoted when the challenger is better by more than `--min-delta` (higher is better,
  except for ece/loss-like metrics), else kept.

`--force --reason TEXT` promotes regardless (a human override) and records tags on the version:
forced=true, force_reason, forced_at (UTC), forced_by ($USER). Every promotion records
promoted_at, promoted_from (the previous champion's version), promotion_metric and the values;
the replaced champion gets replaced_by and keeps alias `previous-champion`.

`--to NAME` then copies the champion into the registered model NAME (one per environment, e.g.
skin-lesion-hybrid-staging) with MlflowClient.copy_model_version, sets alias `champion` there,
and does nothing new when that exact version was copied before (tag `copied_from`).

Exit status: 0 promoted / first / forced / kept; 1 refused or an error.
"""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import math
import sys
from datetime import datetime, timezone

from . import tracking
from .register import CHALLENGER, CHAMPION, DEFAULT_MODEL_NAME, client_for, read_params, with_retries

log = logging.getLogger(__name__)

PREVIOUS = "previous-champion"
LOWER_IS_BETTER = ("ece", "loss", "log_loss", "brier", "nll")


def lower_is_better(metric: str) -> bool:
    return any(metric == m or metric.endswith(f"_{m}") for m in LOWER_IS_BETTER)


def _by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower():
            return None
        raise


def recorded_metric(client, version, metric: str) -> float | None:
    """The metric a version recorded: its tag test_<metric>, else its run's test_<metric>."""
    key = metric if metric.startswith("test_") else f"test_{metric}"
    value = version.tags.get(key)
    if value in (None, "") and version.run_id:
        try:
            value = client.get_run(version.run_id).data.metrics.get(key)
        except Exception:  # noqa: BLE001 - a deleted run: the metric is just unknown
            value = None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def split_hash(client, version) -> str:
    value = version.tags.get("split_hash") or ""
    if not value and version.run_id:
        try:
            value = client.get_run(version.run_id).data.tags.get("split_hash") or ""
        except Exception:  # noqa: BLE001
            value = ""
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(metric: str = "balanced_accuracy", model_name: str = DEFAULT_MODEL_NAME,
        min_delta: float = 0.0, force: bool = False, reason: str | None = None,
        to: str | None = None, tracking_uri: str | None = None, retries: int = 2,
        backoff_s: float = 2.0) -> dict:
    """Compare `challenger` with `champion` of `model_name` on `metric`; move `champion` when
    the challenger is better by more than `min_delta` (or when `force`, which needs `reason`).

    Returns {"decision": "first"|"promoted"|"forced"|"kept"|"refused", "reason", "metric",
    "challenger": version|None, "champion": the champion's version after the decision,
    "previous_champion", "challenger_value", "champion_value", "delta", "copied": {"name",
    "version", "created"} or None}.
    """
    if force and not (reason and reason.strip()):
        raise ValueError("--force needs --reason TEXT (it is recorded with the promotion)")
    client, uri = client_for(tracking_uri)

    def attempt():
        tracking.check_reachable(uri)
        return _promote(client, metric, model_name, min_delta, force, reason, to)

    return with_retries(attempt, uri, retries, backoff_s)


def _promote(client, metric, name, min_delta, force, reason, to) -> dict:
    challenger = _by_alias(client, name, CHALLENGER)
    champion = _by_alias(client, name, CHAMPION)
    result = {"model_name": name, "metric": metric, "min_delta": min_delta,
              "challenger": str(challenger.version) if challenger else None,
              "champion": str(champion.version) if champion else None,
              "previous_champion": None, "challenger_value": None, "champion_value": None,
              "delta": None, "copied": None}

    def done(decision: str, why: str) -> dict:
        result.update(decision=decision, reason=why)
        if challenger is not None:
            client.set_model_version_tag(name, str(challenger.version), "promotion_decision",
                                         f"{decision} at {_now()}: {why}"[:5000])
        if to and decision != "refused" and result["champion"] is not None:
            result["copied"] = copy_to(client, name, result["champion"], to)
        log.info("%s: %s", decision, why)
        return result

    if challenger is None:
        return done("refused", f"{name} has no @{CHALLENGER} version (run the register step)")
    result["challenger_value"] = recorded_metric(client, challenger, metric)
    if champion is not None:
        result["champion_value"] = recorded_metric(client, champion, metric)
    if champion is not None and str(champion.version) == str(challenger.version):
        return done("kept", f"version {challenger.version} is already @{CHAMPION}")

    if force:
        _move_champion(client, name, challenger, champion, metric, result)
        stamp = _now()
        for key, value in (("forced", "true"), ("force_reason", reason.strip()),
                           ("forced_at", stamp), ("forced_by", _user())):
            client.set_model_version_tag(name, str(challenger.version), key, value[:5000])
        return done("forced", f"forced by {_user()}: {reason.strip()}")

    if champion is None:
        _move_champion(client, name, challenger, None, metric, result)
        return done("first", f"no @{CHAMPION} yet: version {challenger.version} becomes champion")

    ch_split, cp_split = split_hash(client, challenger), split_hash(client, champion)
    if not ch_split or not cp_split:
        return done("refused", f"split hash unknown (challenger v{challenger.version}: "
                               f"{ch_split or 'none'}, champion v{champion.version}: "
                               f"{cp_split or 'none'}): cannot tell they share a test split")
    if ch_split != cp_split:
        return done("refused", f"evaluated on different test splits: challenger "
                               f"v{challenger.version} split_hash {ch_split[:16]}, champion "
                               f"v{champion.version} split_hash {cp_split[:16]}; re-evaluate "
                               f"both on one split (or --force --reason)")
    a, b = result["challenger_value"], result["champion_value"]
    if a is None or b is None:
        missing = [f"{role} v{v.version}" for role, v, x in
                   (("challenger", challenger, a), ("champion", champion, b)) if x is None]
        return done("refused", f"no recorded test_{metric} for {', '.join(missing)}")
    delta = (b - a) if lower_is_better(metric) else (a - b)
    result["delta"] = delta
    comparison = f"{metric} challenger v{challenger.version} {a:.4f} vs champion v{champion.version} {b:.4f}"
    if delta > min_delta:
        _move_champion(client, name, challenger, champion, metric, result)
        return done("promoted", f"{comparison}: better by {delta:.4f} > {min_delta}")
    return done("kept", f"{comparison}: improvement {delta:.4f} is not above {min_delta}")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"


def _move_champion(client, name, challenger, champion, metric, result) -> None:
    client.set_registered_model_alias(name, CHAMPION, str(challenger.version))
    stamp = _now()
    tags = {"promoted_at": stamp, "promotion_metric": metric,
            "promoted_from": str(champion.version) if champion else "",
            "promotion_challenger_value": str(result["challenger_value"]),
            "promotion_champion_value": str(result["champion_value"])}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(challenger.version), key, value)
    if champion is not None:
        client.set_model_version_tag(name, str(champion.version), "replaced_by", str(challenger.version))
        client.set_model_version_tag(name, str(champion.version), "replaced_at", stamp)
        client.set_registered_model_alias(name, PREVIOUS, str(champion.version))
    result["previous_champion"] = str(champion.version) if champion else None
    result["champion"] = str(challenger.version)


def copy_to(client, name: str, version: str, dst: str) -> dict:
    """Copy `name` version `version` into registered model `dst` (alias champion there);
    idempotent through the copy's tag `copied_from`."""
    from mlflow.exceptions import MlflowException

    origin = f"{name}/{version}"
    try:
        found = client.search_model_versions(f"name = '{dst}' and tags.copied_from = '{origin}'")
    except MlflowException:
        found = []
    created = not found
    if found:
        copy = min(found, key=lambda v: int(v.version))
    else:
        copy = client.copy_model_version(f"models:/{name}/{version}", dst)
        client.set_model_version_tag(dst, copy.version, "copied_from", origin)
        client.set_model_version_tag(dst, copy.version, "copied_at", _now())
    client.set_registered_model_alias(dst, CHAMPION, copy.version)
    return {"name": dst, "version": str(copy.version), "created": created}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="skinlesion promote", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 promoted/first/forced/kept, 1 refused or error.")
    parser.add_argument("--metric", help="metric to compare (default: params register.gate_metric, "
                                         "else balanced_accuracy)")
    parser.add_argument("--min-delta", type=float, help="required improvement (default: params "
                                                        "register.min_delta, else 0.0)")
    parser.add_argument("--force", action="store_true", help="promote regardless (needs --reason)")
    parser.add_argument("--reason", help="why a --force promotion is made (recorded as a tag)")
    parser.add_argument("--to", help="also copy the champion into this registered model (an environment)")
    parser.add_argument("--model-name", help=f"default: params register.model_name, else {DEFAULT_MODEL_NAME}")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tracking-uri")
    args = parser.parse_args(argv)
    if args.force and not (args.reason and args.reason.strip()):
        parser.error("--force needs --reason TEXT")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    params = read_params(args.params)
    try:
        result = run(metric=args.metric or params.get("gate_metric") or "balanced_accuracy",
                     model_name=args.model_name or params.get("model_name") or DEFAULT_MODEL_NAME,
                     min_delta=args.min_delta if args.min_delta is not None
                     else float(params.get("min_delta", 0.0)),
                     force=args.force, reason=args.reason, to=args.to,
                     tracking_uri=args.tracking_uri, retries=int(params.get("retries", 2)),
                     backoff_s=float(params.get("backoff_s", 2.0)))
    except Exception as err:  # noqa: BLE001 - one clear line for the user
        print(f"skinlesion promote: {err}", file=sys.stderr)
        return 1
    print(f"{result['decision']}: {result['reason']}")
    if result["copied"]:
        c = result["copied"]
        print(f"{'copied' if c['created'] else 'already copied'} to {c['name']} version {c['version']} (@{CHAMPION})")
    print(json.dumps(result, indent=2))
    return 1 if result["decision"] == "refused" else 0


if __name__ == "__main__":
    sys.exit(main())
