"""`skinlesion exp`: DVC experiments whose base is always the committed params.yaml.

    skinlesion exp run [--name N] [--params_file params.demo.yaml ...] [-S train.epochs=5 ...]
    skinlesion exp show [--all]          # params that differ, headline metrics, versions
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
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd

from components.common import cli_args, outputs
from components.common.config import (PARAMS_FILE, ConfigError, check_params, committed_text,
                                      load_params, read_yaml)
from components.tools import venv

HEADLINE_FILE = f"outputs/eval/{outputs.HEADLINE_METRICS}"
REGISTRATION_FILE = "outputs/register.json"
SHOWN = ("balanced_accuracy", "accuracy", "f1_macro", "melanoma_sensitivity")


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
    done = subprocess.run(command, cwd=root, env=environment(root), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"dvc exp run failed (exit {done.returncode})")
    if name is None:
        name = next((line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                     if line.startswith("Ran experiment(s):")), "")
    return name


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
    p.add_argument("-S", "--set_param", action="append", default=[], metavar="KEY=VALUE",
                   help="one params.yaml key (as dvc exp run -S)")
    p = sub.add_parser("show", help="the experiments: params that differ, headline metrics "
                                    "with 95%% intervals, registered version")
    p.add_argument("--all", action="store_true", help="experiments of every commit, not HEAD's")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
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
            name = run(root, args.name, args.params_file, args.set_param)
            print(f"experiment {name}: `skinlesion exp show` compares it; params.yaml is "
                  f"unchanged")
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
        print(frame.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
