"""Check a `skinlesion pipeline run-local` run's outputs, as tests/test_pipeline_local.py does
(run inside the image by image/test.sh, with the image's own packages).

    python3 /image/check_pipeline.py --root KFP_ROOT --raw DATA_RAW --mlflow URI

Every task folder; each step's output where the next step reads it; the raw data's DVC hash
in every artifact's metadata; evaluate's KFP metrics; the registered model version with alias
`challenger` carrying the data hash. Prints a summary; exits 1 naming the first failed check.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

TASKS = ["materialise-data", "preprocess", "split", "class-weights", "train", "evaluate", "register"]


def dir_md5(root: Path) -> str:
    """DVC 3's directory hash (written here again so the check does not lean on the code it checks)."""
    entries = sorted(({"md5": hashlib.md5(p.read_bytes()).hexdigest(),
                       "relpath": p.relative_to(root).as_posix()}
                      for p in root.rglob("*") if p.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--raw", required=True, type=Path)
    ap.add_argument("--mlflow", required=True)
    args = ap.parse_args(argv)

    (run_dir,) = [p for p in args.root.iterdir() if p.name.startswith("skin-lesion-")]
    out = lambda task: json.loads((run_dir / task / "executor_output.json").read_text())  # noqa: E731

    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == sorted(TASKS), \
        f"task folders {sorted(p.name for p in run_dir.iterdir())}"
    assert (run_dir / "materialise-data/raw/labels.csv").is_file()
    assert (run_dir / "preprocess/prepared/manifest.csv").is_file()
    assert {p.name for p in (run_dir / "split/splits").iterdir()} >= {
        "train.csv", "val.csv", "test.csv", "split_report.json"}
    assert json.loads((run_dir / "class-weights/weights").read_text())["classes"][0] == "MEL"
    assert (run_dir / "train/model/ema_weights.pt").is_file()
    summary = json.loads((run_dir / "train/model/training_summary.json").read_text())
    assert summary["completed"], summary
    metrics = json.loads((run_dir / "evaluate/evaluation/metrics.json").read_text())
    assert metrics["n_images"] > 0

    data_hash = dir_md5(args.raw)
    assert out("materialise-data")["parameterValues"]["Output"] == data_hash
    for task in TASKS:
        for name, artifacts in out(task)["artifacts"].items():
            for artifact in artifacts["artifacts"]:
                assert artifact["metadata"]["data_hash"] == data_hash, f"{task}.{name}"
                assert artifact["metadata"]["data_source"] == str(args.raw.resolve()), f"{task}.{name}"

    evaluate = out("evaluate")
    scalars = evaluate["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert abs(scalars["balanced_accuracy"] - metrics["balanced_accuracy"]) < 1e-9
    matrix = evaluate["artifacts"]["classification"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert len(matrix["rows"]) == 8
    assert sum(sum(row["row"]) for row in matrix["rows"]) == metrics["n_images"]

    from mlflow import MlflowClient

    registration = json.loads((run_dir / "register/registration").read_text())
    assert registration["alias"] == "challenger"
    version = MlflowClient(args.mlflow).get_model_version_by_alias(registration["name"], "challenger")
    assert str(version.version) == registration["version"]
    assert out("register")["parameterValues"]["Output"] == registration["version"]
    assert version.tags["data_hash"] == data_hash

    print(json.dumps({
        "tasks": len(TASKS), "epochs": summary["epochs"], "data_hash": data_hash,
        "test_images": metrics["n_images"],
        **{k: round(metrics[k], 3) for k in ("accuracy", "balanced_accuracy", "f1_macro") if k in metrics},
        "registered": f"{registration['name']} v{registration['version']} @challenger",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
