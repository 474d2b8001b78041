"""`skinlesion promote`: move the `champion` alias to the `challenger` through a metric gate.

    skinlesion promote --metric balanced_accuracy [--min_delta 0.0] [--force --reason TEXT] \
        [--to NAME] [--model_name skin-lesion-hybrid]

Decision, from the versions behind the two aliases of the registered model:

- no challenger: refused;
- no champion ever (the registered model's tag `champion_history` is unset): the challenger
  becomes champion ("first");
- a champion existed but its alias or version is gone (deleted): the gate stays on; the
  challenger is compared with the best remaining version on the same test split, and refused
  when there is none (a deleted champion never lets an untested model through; `--force`);
- challenger already champion: kept;
- each side's metric is what its version recorded at registration (tag `test_<metric>`, else
  its run's `test_<metric>` metric); a side without it: refused;
- different test splits (tag `split_hash`, else the run's tag) or an unknown split: refused,
  naming both hashes: scores on different test sets do not compare;
- otherwise promoted when the challenger is better by more than `--min_delta` (higher is better,
  except for ece/loss-like metrics), else kept.

`--force --reason TEXT` promotes regardless (a human override) and records tags on the version:
forced=true, force_reason, forced_at (UTC), forced_by ($USER). Every promotion records
promoted_at, promoted_from (the previous champion's version), promotion_metric and the values;
the replaced champion gets replaced_by and keeps alias `previous-champion`.

`--to NAME` then copies the champion into the registered model NAME (one per environment, e.g.
skin-lesion-hybrid-staging) with MlflowClient.copy_model_version, sets alias `champion` there,
and does nothing new when that exact version was copied before (tag `copied_from`).

Promotions of one registered model are serialised: each holds a lock for its duration, a
registered model named `<name>.promotion-lock` that the tracking server creates atomically
(its database refuses a second one). A promote that finds it taken changes nothing and
reports that it lost ("busy"); a lock older than LOCK_STALE_S (a killed promote) is broken.

Exit status: 0 promoted / first / forced / kept; 1 refused, busy or an error.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import socket
import sys
import time
from datetime import datetime, timezone

from components.common import cli_args, tracking
from components.common.config import RegisterConfig
from components.registry.client import (CHALLENGER, CHAMPION, PREVIOUS, by_alias, client_for,
                                        versions, with_retries)

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("ece", "loss", "log_loss", "brier", "nll")
HISTORY_TAG = "champion_history"   # on the registered model: versions that were champion
LOCK_SUFFIX, LOCK_STALE_S = ".promotion-lock", 600


class PromotionBusy(RuntimeError):
    """Another promote of the same registered model holds the lock."""


def lower_is_better(metric: str) -> bool:
    return any(metric == m or metric.endswith(f"_{m}") for m in LOWER_IS_BETTER)


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


def run(metric: str | None = None, model_name: str | None = None,
        min_delta: float | None = None, force: bool = False, reason: str | None = None,
        to: str | None = None, tracking_uri: str | None = None,
        config: RegisterConfig | None = None) -> dict:
    """Compare `challenger` with `champion` of `model_name` on `metric`; move `champion` when
    the challenger is better by more than `min_delta` (or when `force`, which needs `reason`).
    Unset arguments come from `config` (params.yaml's `register` section).

    Returns {"decision": "first"|"promoted"|"forced"|"kept"|"refused", "reason", "metric",
    "challenger": version|None, "champion": the champion's version after the decision,
    "previous_champion", "challenger_value", "champion_value", "delta", "copied": {"name",
    "version", "created"} or None}. Raises PromotionBusy when another promote holds the lock.
    """
    cfg = config or RegisterConfig()
    metric = metric or cfg.gate_metric
    name = model_name or cfg.model_name
    min_delta = cfg.min_delta if min_delta is None else min_delta
    if force and not (reason and reason.strip()):
        raise ValueError("--force needs --reason TEXT (it is recorded with the promotion)")
    client, uri = client_for(tracking_uri)

    def attempt():
        tracking.check_reachable(uri)
        with promotion_lock(client, name):
            return _promote(client, metric, name, min_delta, force, reason, to)

    return with_retries(attempt, uri, cfg.retries, cfg.backoff_s)


@contextlib.contextmanager
def promotion_lock(client, name: str):
    """Hold `<name>.promotion-lock` (see the module docstring) while promoting."""
    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    for _ in range(2):  # a second try after breaking a stale lock
        try:
            client.create_registered_model(lock, tags={"holder": _holder(),
                                                       "since": str(time.time())},
                                           description=f"held while promoting {name}")
            break
        except MlflowException as err:
            if "ALREADY_EXISTS" not in str(err.error_code):
                raise
            held = client.get_registered_model(lock)
            since = float(held.tags.get("since") or 0)
            if time.time() - since < LOCK_STALE_S:
                raise PromotionBusy(f"another promote of {name} is running ({held.tags.get('holder')}"
                                    f", for {time.time() - since:.0f} s); nothing was changed") from None
            log.warning("breaking the stale promotion lock of %s (%s)", name, held.tags)
            client.delete_registered_model(lock)
    else:
        raise PromotionBusy(f"could not take the promotion lock of {name}")
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _holder() -> str:
    return f"{_user()}@{socket.gethostname()} pid {os.getpid()}"


def _promote(client, metric, name, min_delta, force, reason, to) -> dict:
    challenger = by_alias(client, name, CHALLENGER)
    champion = by_alias(client, name, CHAMPION)
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
        history = client.get_registered_model(name).tags.get(HISTORY_TAG)
        if not history:
            _move_champion(client, name, challenger, None, metric, result)
            return done("first", f"no @{CHAMPION} yet: version {challenger.version} becomes "
                                 f"champion")
        champion = _best_remaining(client, name, challenger, metric)
        if champion is None:
            return done("refused", f"the @{CHAMPION} (versions {history}) is gone and no other "
                                   f"version on the challenger's test split has test_{metric}: "
                                   f"nothing to compare with (re-register the champion, or "
                                   f"--force --reason)")
        result["champion"] = str(champion.version)
        result["champion_value"] = recorded_metric(client, champion, metric)

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


def _best_remaining(client, name, challenger, metric):
    """The best other live version on the challenger's test split, by recorded `metric`."""
    split = split_hash(client, challenger)
    scored = [(recorded_metric(client, v, metric), v) for v in versions(client, name)
              if str(v.version) != str(challenger.version) and split
              and split_hash(client, v) == split]
    scored = [(value, v) for value, v in scored if value is not None]
    if not scored:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(scored, key=lambda item: item[0])[1]


def _move_champion(client, name, challenger, champion, metric, result) -> None:
    client.set_registered_model_alias(name, CHAMPION, str(challenger.version))
    history = client.get_registered_model(name).tags.get(HISTORY_TAG)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(
        filter(None, [history, str(challenger.version)]))[-5000:])
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
    parser = cli_args.ArgumentParser(prog="skinlesion promote",
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 promoted/first/forced/kept, 1 "
                                            "refused, busy or error.")
    parser.add_argument("--metric", help="metric to compare (default: register.gate_metric)")
    parser.add_argument("--min_delta", type=float,
                        help="required improvement (default: register.min_delta)")
    parser.add_argument("--force", action="store_true", help="promote regardless (needs --reason)")
    parser.add_argument("--reason", help="why a --force promotion is made (recorded as a tag)")
    parser.add_argument("--to", help="also copy the champion into this registered model "
                                     "(an environment, e.g. skin-lesion-hybrid-prod)")
    parser.add_argument("--model_name", help="default: register.model_name")
    cli_args.add_params_flags(parser)
    parser.add_argument("--tracking_uri")
    args = parser.parse_args(argv)
    if args.force and not (args.reason and args.reason.strip()):
        parser.error("--force needs --reason TEXT")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = RegisterConfig.resolve(cli_args.params_paths(args))
        result = run(args.metric, args.model_name, args.min_delta, args.force, args.reason,
                     args.to, args.tracking_uri, cfg)
    except PromotionBusy as err:
        print(f"skinlesion promote: lost: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - one clear line for the user (ConfigError too)
        print(f"skinlesion promote: {tracking.scrub(str(err))}", file=sys.stderr)
        return 1
    print(f"{result['decision']}: {result['reason']}")
    if result["copied"]:
        c = result["copied"]
        print(f"{'copied' if c['created'] else 'already copied'} to {c['name']} version "
              f"{c['version']} (@{CHAMPION})")
    print(json.dumps(result, indent=2))
    return 1 if result["decision"] == "refused" else 0


if __name__ == "__main__":
    sys.exit(main())
