"""`skinlesion runs`: a table of recent training runs, to pick one before opening the MLflow UI.

    skinlesion runs [--experiment skin-lesion] [--top 10] [--metric balanced_accuracy]
                    [--sort metric|recent] [--format table|csv|json] [--wide]

One row per run (mlflow.search_runs over the experiment's training runs, i.e. runs with `train.*` params,
newest first, then the best `--top` by the metric unless `--sort recent`): run name, short run id, start time, status, data hash,
split mode, the DVC experiment that ran it, key params (preset, epochs, img_size, seed, batch size, peak lr), the test metric
with its 95% interval, test accuracy / macro F1, the best validation score of the EMA
weights, and the registered version(s) with their aliases (e.g. `skin-lesion-hybrid v3
@champion`). The table fits the terminal (120 columns when piped) by leaving out the
least useful columns; `--wide` shows them all.

Metric sources, first found: `test_<metric>` (the evaluate step), `test_ema_<metric>` (the
training's own test pass), `val_ema_<metric>` (validation).
"""
from __future__ import annotations

import json
import sys

import pandas as pd

from components.common import cli_args, tracking
from components.commands import text_table

# what a narrow terminal loses first (the run's name already says what differs), then the
# validation metric, "started", "f1_macro", the run's name (long, and cut where runs differ:
# run_id and dvc_exp still tell them apart) and "accuracy" (main)
DROP_FIRST = ("data", "status", "bs", "seed", "img", "epochs", "preset", "lr", "split")
KEY_PARAMS = {"preset": "train.preset", "epochs": "train.epochs", "img": "train.img_size",
              "seed": "train.seed", "bs": "train.batch_size", "lr": "train.peak_lr"}


def _first(row: pd.Series, *columns: str):
    for column in columns:
        value = row.get(column)
        if value is not None and not (isinstance(value, float) and pd.isna(value)) and value != "":
            return value
    return None


def registered_versions(client, run_ids: list[str]) -> dict[str, list[str]]:
    """run id -> ["NAME vN @alias,@alias", ...] for every registered version of those runs."""
    if not run_ids:
        return {}
    quoted = ", ".join(f"'{r}'" for r in run_ids)
    try:
        versions = client.search_model_versions(f"run_id IN ({quoted})")
    except Exception:  # noqa: BLE001 - a store without a registry: no versions to show
        return {}
    aliases: dict[str, dict] = {}
    out: dict[str, list[str]] = {}
    for v in sorted(versions, key=lambda v: (v.name, int(v.version))):
        if v.name not in aliases:
            try:
                aliases[v.name] = client.get_registered_model(v.name).aliases or {}
            except Exception:  # noqa: BLE001
                aliases[v.name] = {}
        names = sorted(a for a, ver in aliases[v.name].items() if str(ver) == str(v.version))
        out.setdefault(v.run_id, []).append(
            f"{v.name} v{v.version}" + (" " + ",".join(f"@{a}" for a in names) if names else ""))
    return out


def run(experiment: str = tracking.DEFAULT_EXPERIMENT, top: int = 10,
        metric: str = "balanced_accuracy", sort: str = "metric",
        tracking_uri: str | None = None, max_runs: int = 500) -> pd.DataFrame:
    """The table as a DataFrame (one row per run, columns as printed)."""
    import mlflow

    uri = tracking_uri or tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        raise LookupError(f"no experiment {experiment!r} in {tracking.redact(uri)}")
    found = mlflow.search_runs(experiment_names=[experiment], max_results=max_runs,
                               order_by=["attributes.start_time DESC"])
    columns = ["run", "run_id", "started", "status", "data", "split", "dvc_exp", *KEY_PARAMS,
               metric, f"{metric}_ci95", "accuracy", "f1_macro", f"val_{metric}", "registered"]
    if found.empty:
        return pd.DataFrame(columns=columns)
    if "params.train.preset" in found.columns:  # trainings only: evaluate/register runs of their own have no train params
        found = found[found["params.train.preset"].notna()]
    else:
        found = found.iloc[0:0]
    versions = registered_versions(client, found["run_id"].tolist())
    rows = []
    for _, r in found.iterrows():
        value = _first(r, f"metrics.test_{metric}", f"metrics.test_ema_{metric}")
        low, high = _first(r, f"metrics.test_{metric}_ci_low"), _first(r, f"metrics.test_{metric}_ci_high")
        rows.append({
            "run": _first(r, "tags.mlflow.runName") or "",
            "run_id": r["run_id"][:8],
            "started": r["start_time"].strftime("%Y-%m-%d %H:%M") if pd.notna(r.get("start_time")) else "",
            "status": r.get("status", ""),
            "data": str(_first(r, "tags.data_hash") or "")[:8],
            "split": _first(r, "tags.split_mode", "params.split.mode", "params.split_mode") or "",
            "dvc_exp": _first(r, "tags.dvc_experiment") or "",
            **{k: _first(r, f"params.{p}") or "" for k, p in KEY_PARAMS.items()},
            metric: value,
            f"{metric}_ci95": f"{low:.3f}-{high:.3f}" if low is not None and high is not None else "",
            "accuracy": _first(r, "metrics.test_accuracy", "metrics.test_ema_accuracy"),
            "f1_macro": _first(r, "metrics.test_f1_macro", "metrics.test_ema_macro_f1"),
            f"val_{metric}": _first(r, f"metrics.val_ema_{metric}"),
            "registered": "; ".join(versions.get(r["run_id"], [])),
        })
    table = pd.DataFrame(rows, columns=columns)
    if sort == "metric":
        table = table.sort_values(metric, ascending=False, na_position="last", kind="stable")
    return table.head(top).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="skinlesion runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--metric", default="balanced_accuracy")
    parser.add_argument("--sort", choices=("metric", "recent"), default="metric")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--tracking_uri")
    parser.add_argument("--wide", action="store_true",
                        help="every column, whatever the terminal's width")
    args = parser.parse_args(argv)
    try:
        table = run(args.experiment, args.top, args.metric, args.sort, args.tracking_uri)
    except (LookupError, tracking.TrackingUnreachable) as err:
        print(f"skinlesion runs: {err}", file=sys.stderr)
        return 1
    if args.format == "csv":
        table.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(json.dumps(table.to_dict(orient="records"), indent=2, default=str))
    else:
        drop = [*DROP_FIRST, f"val_{args.metric}", "started", "f1_macro", "run", "accuracy"]
        print(text_table.fit(table, drop, wide=args.wide) if not table.empty else "(no runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
