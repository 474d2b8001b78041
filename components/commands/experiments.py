"""`skinlesion exp`: DVC experiments whose base is always the committed params.yaml.

    skinlesion exp run [--name N] [--params_file params.demo.yaml ...] [-S train.epochs=5 ...]
    skinlesion exp show [--all] [--wide] # params that differ, headline metrics, versions
    skinlesion exp args params.demo.yaml # the `dvc exp run -S ...` flags of a partial file

`exp run` is `dvc exp run --temp`: the experiment runs in a temporary copy of the committed
project (params.yaml at git HEAD plus the changes asked for) and is recorded as a DVC
experiment; the workspace, params.yaml included, is left exactly as it was, so one
experiment's values never leak into the next one or into `skinlesion pipeline compile`. It
refuses when the workspace params.yaml differs from HEAD's (commit it, or `git checkout
params.yaml`), when data/raw.dvc is not committed, and when nothing would change (that is
`dvc repro`). `dvc exp apply NAME` brings an experiment's outputs into the workspace.

A partial params file (params.demo.yaml, params.paper.yaml: params.yaml's layout, only the keys
that change) becomes `-S key=value` flags in DVC's (Hydra's) override grammar; `+key=value`
adds a key params.yaml does not have.
"""
from __future__ import annotations

import json
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import yaml

from components.common import cli_args, outputs
from components.common.config import (PARAMS_FILE, ConfigError, check_params, committed_text,
                                      load_params, read_yaml)
from components.commands import text_table, venv

HEADLINE_FILE = f"outputs/eval/{outputs.HEADLINE_METRICS}"
REGISTRATION_FILE = "outputs/register.json"
SHOWN = ("balanced_accuracy", "accuracy", "f1_macro", "melanoma_sensitivity")
# The closing summary: key, label, the paper's ISIC 2019 figure (for scale) or None.
SUMMARY = (("accuracy", "accuracy", 0.9348), ("balanced_accuracy", "balanced accuracy", None),
           ("precision_macro", "precision (macro)", 0.9324),
           ("recall_macro", "recall (macro)", 0.9070), ("f1_macro", "F1 (macro)", 0.9182),
           ("roc_auc_macro", "ROC-AUC (macro)", None), ("ece", "calibration error", None))
# DVC warns once per output it cannot restore into its temporary copy (the commit's dvc.lock
# has no entry for it, or the cache lacks it); the stages make them: one line says so.
NO_HASH_WARNING = re.compile(r"WARNING: No file hash info found for '(.+)'\. It won't be created\.")
STAGE_MENTION = re.compile(r"(Running stage|Stage) '(\w+)'")
QUIET_NOTE_S = 60  # a stage silent this long gets a line saying it is still running


class ExperimentRefused(RuntimeError):
    """The experiment would not start from the committed project."""


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _has(params: dict, dotted: str) -> bool:
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _text(value) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def dvc_set_params(override_file: str, params_path: str = PARAMS_FILE) -> list[str]:
    """`dvc exp run` flags applying a partial params file over `params_path`."""
    params = load_params(params_path)
    flags = []
    for key, value in _leaves(read_yaml(override_file)):
        flags += ["-S", f"{'' if _has(params, key) else '+'}{key}={_text(value)}"]
    return flags


def _git(root: Path, *args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          check=check).stdout


def environment(root: Path) -> dict[str, str]:
    """The stage commands say `python -m ...`: make that this interpreter; MLflow in the
    project's mlflow.db (an absolute path: the temporary copy must log to the same store);
    an identity for the experiment's commit when git has none."""
    env = venv.with_tools_on_path()
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env["PYTHONUNBUFFERED"] = "1"  # each epoch line reaches the terminal when it is printed
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars, in a log
    if not _git(root, "config", "user.email", check=False).strip():
        for role in ("AUTHOR", "COMMITTER"):
            env.setdefault(f"GIT_{role}_NAME", "skinlesion")
            env.setdefault(f"GIT_{role}_EMAIL", "skinlesion@localhost")
    return env


def check_committed(root: Path) -> None:
    """Refuse unless params.yaml is HEAD's and data/raw.dvc is committed."""
    workspace = (root / PARAMS_FILE).read_text()
    if workspace != committed_text(root / PARAMS_FILE):
        raise ExperimentRefused(
            f"{root / PARAMS_FILE} differs from the committed one (an applied experiment or an "
            f"edit); experiments start from git HEAD's params.yaml: commit your change, or "
            f"`git checkout {PARAMS_FILE}` (`git diff {PARAMS_FILE}` shows it)")
    if (root / "data/raw.dvc").is_file() and \
            _git(root, "ls-files", "data/raw.dvc").strip() != "data/raw.dvc":
        raise ExperimentRefused("data/raw.dvc is not committed: `git add data/raw.dvc "
                                "data/.gitignore && git commit` first (an experiment runs on "
                                "the committed project)")


def check_overrides(root: Path, params_files: list[str], set_params: list[str]) -> None:
    """The experiment's params (committed + files + -S, the values read as YAML, as Hydra
    mostly does) checked in full before DVC starts: a bad value must not wait for its stage
    while the stages before it run."""
    params = load_params([root / PARAMS_FILE, *params_files])
    for item in set_params:
        if ":" in item.partition("=")[0]:  # dvc's FILE:KEY=VALUE
            file, _, item = item.partition(":")
            if file != PARAMS_FILE:
                continue
        if not item.startswith("~"):  # Hydra's deletion: the step's default
            key, value = cli_args.parse_assignment(item.lstrip("+"))
            cli_args.set_dotted(params, key, value, add=item.startswith("+"))
    check_params(params, ", ".join([PARAMS_FILE, *params_files, *(["-S"] if set_params else [])]))


def run(root: Path, name: str | None = None, params_files: list[str] = (),
        set_params: list[str] = ()) -> str:
    """Run one experiment with `dvc exp run --temp`; returns its name."""
    root = Path(root).resolve()
    check_committed(root)
    check_overrides(root, params_files, set_params)
    flags = [flag for f in params_files for flag in dvc_set_params(f, str(root / PARAMS_FILE))]
    for item in set_params:
        flags += ["-S", item]
    if not flags:
        raise ExperimentRefused("nothing differs from the committed params.yaml: that is "
                                "`dvc repro`, not an experiment")
    command = [venv.tool("dvc"), "exp", "run", "--temp",
               *(["--name", name] if name else []), *flags]
    print("$ " + shlex.join(["dvc", *command[1:]]), flush=True)
    returncode, lines = stream(command, root, environment(root),
                               _stage_count(root / "dvc.yaml"))
    if returncode != 0:
        raise RuntimeError(f"dvc exp run failed (exit {returncode})")
    if name is None:
        name = next((line.split(":", 1)[1].strip() for line in lines
                     if line.startswith("Ran experiment(s):")), "")
    return name


def _stage_count(dvc_yaml: Path) -> int:
    """The stages in the project's dvc.yaml (a DVC file, not a params file: no layout check)."""
    return len((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {})


def stream(command: list[str], root: Path, env: dict, n_stages: int) -> tuple[int, list[str]]:
    """Run `command`, printing its output line by line as it comes: each stage numbered
    ([4/6]), a line each time a stage is quiet for QUIET_NOTE_S, DVC's warnings about the
    outputs it cannot restore folded into one line. Returns the exit status and the lines."""
    proc = subprocess.Popen(command, cwd=root, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, bufsize=1)
    lines: queue.Queue[str | None] = queue.Queue()

    def relay() -> None:  # a thread, so the main loop can notice a quiet stage
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=relay, daemon=True).start()
    seen, uncached, stages, stage, started = [], [], [], None, time.monotonic()
    while True:
        try:
            line = lines.get(timeout=QUIET_NOTE_S)
        except queue.Empty:
            minutes = (time.monotonic() - started) / 60
            print(f"    ... stage {stage or 'setup'} still running ({minutes:.0f} min)",
                  flush=True)
            continue
        if line is None:
            break
        seen.append(line)
        if match := NO_HASH_WARNING.search(line):
            uncached.append(match.group(1))
            continue
        if uncached:
            print(f"(DVC had no version of {len(uncached)} outputs to restore: none in "
                  f"dvc.lock at this commit, or not in the cache; the stages make them)",
                  flush=True)
            uncached = []
        if (match := STAGE_MENTION.search(line)) and match.group(2) not in stages:
            stages.append(match.group(2))
            stage, started = match.group(2), time.monotonic()
            line = f"[{len(stages)}/{n_stages}] {line}"
        print(line, flush=True)
    return proc.wait(), seen


def experiments(root: Path, all_commits: bool = False) -> list[dict]:
    """Every experiment of HEAD (or of all commits) from `dvc exp show --json`:
    {name, rev, params (flat dict), headline (dict)}; the baseline first."""
    command = [venv.tool("dvc"), "exp", "show", "--json",
               *(["--all-commits"] if all_commits else [])]
    shown = json.loads(subprocess.run(command, cwd=root, env=environment(root), text=True,
                                      capture_output=True, check=True).stdout)
    rows = []
    for commit in shown:
        if commit["rev"] == "workspace":
            continue
        found = [(commit.get("name") or commit["rev"][:7], commit["data"])]
        for exp in commit.get("experiments") or []:
            found += [(rev.get("name") or rev["rev"][:7], rev["data"]) for rev in exp["revs"]]
        for name, data in found:
            params = (data.get("params") or {}).get(PARAMS_FILE, {}).get("data") or {}
            metrics = (data.get("metrics") or {}).get(HEADLINE_FILE, {}).get("data") or {}
            rows.append({"name": name, "rev": data["rev"], "params": dict(_leaves(params)),
                         "headline": metrics})
    return rows


def table(root: Path, rows: list[dict]) -> pd.DataFrame:
    """One row per experiment: the params that differ anywhere, the headline metrics with
    their intervals, and the model version it registered."""
    keys = sorted({k for r in rows for k, v in r["params"].items()
                   if any(o["params"].get(k) != v for o in rows)})
    out = []
    for r in rows:
        line = {"experiment": r["name"], **{k: r["params"].get(k) for k in keys}}
        for metric in SHOWN:
            value = r["headline"].get(metric)
            low, high = (r["headline"].get(f"{metric}_ci_{e}") for e in ("low", "high"))
            line[metric] = "" if value is None else (
                f"{value:.3f} [{low:.2f}, {high:.2f}]" if low is not None else f"{value:.3f}")
        line["registered"] = _registered(root, r["rev"])
        out.append(line)
    return pd.DataFrame(out)


def results(root: Path, name: str) -> dict:
    """An experiment's test metrics (metrics.json) and registration (register.json), read
    from its commit."""
    row = next((r for r in experiments(root) if r["name"] == name), None)
    if row is None:
        raise RuntimeError(f"`dvc exp show` lists no experiment {name!r}")
    show = lambda rel: json.loads(_git(root, "show", f"{row['rev']}:{rel}"))  # noqa: E731
    return {"metrics": show(f"outputs/eval/{outputs.METRICS}"),
            "registration": show(REGISTRATION_FILE)}


def summary(result: dict) -> str:
    """The closing lines of a run: the test metrics with their intervals, the melanoma
    operating point, and the registered version (or why none)."""
    metrics, ci = result["metrics"], result["metrics"].get("ci95", {})
    lines = [f"Test metrics of the EMA model ({metrics.get('n_images')} images, "
             "95% bootstrap intervals; the paper's ISIC 2019 figures for scale):",
             f"  {'metric':<20}{'value':>8}   {'95% interval':<17}{'paper':>7}"]
    for key, label, paper in SUMMARY:
        if (value := metrics.get(key)) is None:
            continue
        low_high = ci.get(key)
        interval = f"[{low_high['low']:.3f}, {low_high['high']:.3f}]" if low_high else ""
        lines.append(f"  {label:<20}{value:>8.3f}   {interval:<17}"
                     f"{'' if paper is None else f'{paper:.3f}':>7}")
    if point := metrics.get("melanoma_operating_point"):
        lines.append(operating_point_line(point))
    reg = result["registration"]
    if reg.get("version"):
        lines.append(f"Registered: {reg['name']} version {reg['version']}, "
                     f"alias {reg.get('alias')} (run {reg.get('run_id')})")
    else:
        lines.append(f"Not registered: {reg.get('skipped', reg)}")
    return "\n".join(lines)


def operating_point_line(point: dict) -> str:
    """The melanoma-versus-rest operating point in words. Its threshold is the lowest melanoma
    probability that keeps the target specificity, so a test set whose melanomas all score
    above every other image gives sensitivity and specificity 1 at a threshold near 1."""
    line = (f"  melanoma vs rest: sensitivity {point['sensitivity']:.3f} at specificity "
            f"{point['specificity']:.3f} (target >= {point['target_specificity']:.2f}; "
            f"threshold {point['threshold']:.4g} on the MEL probability")
    if point["sensitivity"] == point["specificity"] == 1.0:
        line += (f"; all {point['n_positive']} melanomas score above all "
                 f"{point['n_negative']} other images")
    return line + ")"


def _registered(root: Path, rev: str) -> str:
    text = _git(root, "show", f"{rev}:{REGISTRATION_FILE}", check=False)
    if not text:
        return ""
    result = json.loads(text)
    if not result.get("version"):
        return "gated out"
    return f"{result['name']} v{result['version']}" + (f" @{result['alias']}"
                                                         if result.get("alias") else "")


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="skinlesion exp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=cli_args.ArgumentParser)
    p = sub.add_parser("run", help="dvc exp run --temp on the committed params.yaml")
    p.add_argument("--name", "-n", help="experiment name (default: DVC's)")
    p.add_argument("--params_file", action="append", default=[], metavar="FILE",
                   help="partial params file to apply (repeatable), e.g. params.demo.yaml")
    cli_args.add_set_flag(p, "one params.yaml key, as dvc exp run -S takes it")
    p = sub.add_parser("show", help="the experiments: params that differ, headline metrics "
                                    "with 95%% intervals, registered version")
    p.add_argument("--all", action="store_true", help="experiments of every commit, not HEAD's")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--wide", action="store_true",
                   help="every column, whatever the terminal's width")
    p = sub.add_parser("args", help="`dvc exp run` -S flags that apply a partial params file")
    p.add_argument("file", help="partial params file, e.g. params.demo.yaml")
    p.add_argument("--params", default=PARAMS_FILE, help="the base params file")
    args = parser.parse_args(argv)
    root = Path.cwd()
    if args.command == "args":
        print(shlex.join(dvc_set_params(args.file, args.params)))
        return 0
    try:
        if args.command == "run":
            name = run(root, args.name, args.params_file, args.set)
            print(f"\n{summary(results(root, name))}\nexperiment {name}: `skinlesion exp show` "
                  f"compares it; params.yaml is unchanged", flush=True)
            return 0
        frame = table(root, experiments(root, args.all))
    except (ExperimentRefused, ConfigError, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"skinlesion exp: {err}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(frame.to_json(orient="records", indent=2))
    elif args.format == "csv":
        frame.to_csv(sys.stdout, index=False)
    else:
        params = [c for c in frame.columns if c not in ("experiment", *SHOWN, "registered")]
        # a narrow terminal keeps the name, two of the params that differ, balanced accuracy
        # and the registered version longest
        drop = [*reversed(params[2:]), "melanoma_sensitivity", "f1_macro",
                *reversed(params[:2]), "accuracy"]
        print(text_table.fit(frame, drop, wide=args.wide))
    return 0


if __name__ == "__main__":
    sys.exit(main())
