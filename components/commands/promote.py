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
  its run's `test_<metric>` metric); a tag that none of the values its run logged for that
  metric agrees with (edited) gives way to the run's; a side without it: refused;
- otherwise the paired rule (commands/paired.py): both versions scored on the same images,
  the challenger's test split (`--split_dir`, default data/splits, checked against its
  split_hash; images from `--img_dir`), less every image whose lesion was in the champion's
  train or val data when the champion was tested on another split (register recorded them;
  without that record: refused); promoted when the lesion-level paired bootstrap interval
  of challenger minus champion lies above `--min_delta` (below -min_delta for ece:
  config.GATE_METRICS, which the register gate reads too), else kept. The comparison is
  printed and recorded on both versions (tag paired_vs_v<other>);
- a shared split whose test CSVs are not at hand (`--split_dir` missing or another split):
  the recorded metrics, promoted when better by more than `--min_delta`.

`--force --reason TEXT` promotes regardless (a human override) and records tags on the version:
forced=true, force_reason, forced_at (UTC), forced_by ($USER). Every promotion records
promoted_at, promoted_from (the previous champion's version), promotion_metric and the values;
the replaced champion gets replaced_by and keeps alias `previous-champion`.

`--to NAME` then copies the champion into the registered model NAME (one per environment, e.g.
skin-lesion-hybrid-staging) with MlflowClient.copy_model_version, sets alias `champion` there,
and does nothing new when that exact version was copied before (tag `copied_from`).

Promotions of one registered model are serialised by a lock in the registry
(registry/lock.py). A promote that finds it taken changes nothing and reports that it lost
("busy"); a lock whose promote is gone (killed on this host, or older than 10 minutes) is
broken, and a promote retrying after an outage takes its own lock back.
`--break_lock --reason TEXT` breaks the lock by hand (recorded on the registered model's tag
promotion_lock_broken) and changes nothing else.

Exit status: 0 promoted / first / forced / kept; 1 refused, busy or an error.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import uuid

from components.common import cli_args, outputs, tracking
from components.commands.paired import Refused, TestImages, compare
from components.common.config import GATE_METRICS, RegisterConfig, lower_is_better
from components.evaluation.metrics import paired_gate
from components.registry import lock
from components.registry.client import (CHALLENGER, CHAMPION, PREVIOUS, by_alias, check_name,
                                        client_for, versions, with_retries)

log = logging.getLogger(__name__)

HISTORY_TAG = "champion_history"   # on the registered model: versions that were champion


def recorded_metric(client, version, metric: str) -> float | None:
    """The metric a version recorded: its tag test_<metric>, unless its run logged that
    metric and never this value (the tag was edited); then, or without a tag, the run's."""
    key = f"test_{metric}"
    value = _number(version.tags.get(key))
    logged = []
    if version.run_id:
        try:
            logged = [m.value for m in client.get_metric_history(version.run_id, key)]
        except Exception:  # noqa: BLE001 - a deleted run: the metric is just unknown
            logged = []
    if logged and (value is None or not any(math.isclose(value, x, abs_tol=5e-7) for x in logged)):
        if value is not None:
            log.warning("%s v%s: tag %s=%s is no value its run %s logged; using the run's %s",
                        version.name, version.version, key, value, version.run_id, logged[-1])
        value = _number(logged[-1])
    return value


def _number(value) -> float | None:
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


def run(metric: str | None = None, model_name: str | None = None,
        min_delta: float | None = None, force: bool = False, reason: str | None = None,
        to: str | None = None, tracking_uri: str | None = None,
        config: RegisterConfig | None = None, split_dir=None, img_dir=None) -> dict:
    """Compare `challenger` with `champion` of `model_name` on `metric`; move `champion` when
    the challenger is better by more than `min_delta` (or when `force`, which needs `reason`).
    Unset arguments come from `config` (params.yaml's `register` section).

    Returns {"decision": "first"|"promoted"|"forced"|"kept"|"refused", "reason", "metric",
    "challenger": version|None, "champion": the champion's version after the decision,
    "previous_champion", "challenger_value", "champion_value", "delta", "copied": {"name",
    "version", "created"} or None}. Raises lock.Busy when another promote holds the lock.
    """
    cfg = config or RegisterConfig()
    metric = (metric or cfg.gate_metric).removeprefix("test_")
    if metric not in GATE_METRICS:
        raise ValueError(f"--metric {metric[:100]!r}: must be one of {sorted(GATE_METRICS)}")
    name = check_name(model_name or cfg.model_name)
    to = to and check_name(to, "--to")
    min_delta = cfg.min_delta if min_delta is None else min_delta
    if not (math.isfinite(min_delta) and min_delta >= 0):
        raise ValueError(f"--min_delta {min_delta}: must be a finite number >= 0")
    if force and not (reason and reason.strip()):
        raise ValueError("--force needs --reason TEXT (it is recorded with the promotion)")
    images = TestImages.of_project(split_dir, img_dir)
    client, uri = client_for(tracking_uri)
    token = uuid.uuid4().hex  # this promote's: its retries take back the lock it left

    def attempt():
        tracking.check_reachable(uri)
        with lock.held(client, name, token):
            return _promote(client, metric, name, min_delta, force, reason, to, images)

    return with_retries(attempt, uri, cfg.retries, cfg.backoff_s)


def break_lock(reason: str, model_name: str | None = None, tracking_uri: str | None = None,
               config: RegisterConfig | None = None) -> list[str]:
    """`--break_lock`: break the promotion lock of the model by hand; returns who held it."""
    cfg = config or RegisterConfig()
    if not (reason and reason.strip()):
        raise ValueError("--break_lock needs --reason TEXT (it is recorded on the model)")
    name = check_name(model_name or cfg.model_name)
    client, uri = client_for(tracking_uri)
    return with_retries(lambda: lock.break_lock(client, name, reason.strip()), uri,
                        cfg.retries, cfg.backoff_s)


def _promote(client, metric, name, min_delta, force, reason, to, images) -> dict:
    challenger = by_alias(client, name, CHALLENGER)
    champion = by_alias(client, name, CHAMPION)
    result = {"model_name": name, "metric": metric, "min_delta": min_delta,
              "challenger": str(challenger.version) if challenger else None,
              "champion": str(champion.version) if champion else None,
              "previous_champion": None, "challenger_value": None, "champion_value": None,
              "delta": None, "paired": None, "copied": None}

    def done(decision: str, why: str) -> dict:
        result.update(decision=decision, reason=why)
        if challenger is not None:
            client.set_model_version_tag(name, str(challenger.version), "promotion_decision",
                                         f"{decision} at {lock.now()}: {why}"[:5000])
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
        stamp = lock.now()
        for key, value in (("forced", "true"), ("force_reason", reason.strip()),
                           ("forced_at", stamp), ("forced_by", lock.user())):
            client.set_model_version_tag(name, str(challenger.version), key, value[:5000])
        return done("forced", f"forced by {lock.user()}: {reason.strip()}")

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
    same = ch_split == cp_split
    try:
        paired = compare(client, name, challenger, champion, metric, images, ch_split, same)
    except Refused as err:
        if not same:
            return done("refused", f"evaluated on different test splits: challenger "
                                   f"v{challenger.version} split_hash {ch_split[:16]}, champion "
                                   f"v{champion.version} split_hash {cp_split[:16]}, and {err} "
                                   f"(or --force --reason)")
        log.warning("plain comparison of the recorded metrics: %s", err)
        return _plain(client, name, challenger, champion, metric, min_delta, result, done)
    result.update(paired=paired, delta=paired["difference"])
    text = comparison_text(paired, challenger, champion)
    for version, other in ((challenger, champion), (champion, challenger)):
        client.set_model_version_tag(name, str(version.version), f"paired_vs_v{other.version}",
                                     json.dumps(paired, separators=(",", ":"))[:5000])
    if paired_gate(paired, min_delta):
        _move_champion(client, name, challenger, champion, metric, result)
        return done("promoted", f"{text}: clears {min_delta}")
    return done("kept", f"{text}: does not clear {min_delta}")


def comparison_text(p: dict, challenger, champion) -> str:
    """One line: the images, both scores, the difference and its interval, the leftover."""
    return (f"{p['metric']} on the same {p['n_images']} test images ({p['n_lesions']} lesions; "
            f"{p['n_left_out']} of the challenger's {p['n_test']} left out, in the champion's "
            f"train/val data): challenger v{challenger.version} {p['challenger']:.4f} vs "
            f"champion v{champion.version} {p['champion']:.4f}, difference "
            f"{p['difference']:+.4f}, 95% paired interval [{_fmt(p['low'])}, {_fmt(p['high'])}]")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def _plain(client, name, challenger, champion, metric, min_delta, result, done) -> dict:
    """The recorded metrics compared, for a shared split whose test images are not at hand."""
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
    stamp = lock.now()
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
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
            raise  # a filter the server cannot read must not look like "no copy yet"
        found = []
    created = not found
    if found:
        copy = min(found, key=lambda v: int(v.version))
    else:
        copy = client.copy_model_version(f"models:/{name}/{version}", dst)
        client.set_model_version_tag(dst, copy.version, "copied_from", origin)
        client.set_model_version_tag(dst, copy.version, "copied_at", lock.now())
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
    parser.add_argument("--break_lock", action="store_true",
                        help="break the promotion lock by hand (needs --reason); changes nothing "
                             "else")
    parser.add_argument("--reason", help="why --force or --break_lock (recorded)")
    parser.add_argument("--to", help="also copy the champion into this registered model "
                                     "(an environment, e.g. skin-lesion-hybrid-prod)")
    parser.add_argument("--model_name", help="default: register.model_name")
    parser.add_argument("--split_dir", help="the challenger's split folder (its test.csv; "
                                            f"default: {outputs.SPLITS_DIR})")
    parser.add_argument("--img_dir", help="the prepared images (default: "
                                          f"{outputs.PREPARED_DIR}/{outputs.PREPARED_IMAGES})")
    cli_args.add_params_flags(parser)
    parser.add_argument("--tracking_uri")
    args = parser.parse_args(argv)
    if (args.force or args.break_lock) and not (args.reason and args.reason.strip()):
        parser.error(f"--{'force' if args.force else 'break_lock'} needs --reason TEXT")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = RegisterConfig.resolve(cli_args.params_paths(args))
        if args.break_lock:
            holders = break_lock(args.reason, args.model_name, args.tracking_uri, cfg)
            print(f"broke the promotion lock held by {', '.join(holders)}" if holders
                  else "no promotion lock was held")
            return 0
        result = run(args.metric, args.model_name, args.min_delta, args.force, args.reason,
                     args.to, args.tracking_uri, cfg, args.split_dir, args.img_dir)
    except lock.Busy as err:
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
