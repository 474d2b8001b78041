"""Leave-one-source-out: train on every source but one, test on that one, for each source.

    python benchmarks/cross_site.py --labels data/raw/labels.csv --images data/raw/images \\
        --metadata data/raw/metadata.csv --out outputs/loso [--sources BCN,HAM,MSK4] \\
        [--source_column dataset] \\
        [--params params.yaml] [--params_file params.demo.yaml] \
        [-S preprocess.color_constancy=shades_of_gray]

The pipeline's own steps, once per held-out source: preprocess (once, shared), split with
`mode: source` and `test_sources: [S]` (val is a lesion-grouped share of the other sources),
class_weights, train, evaluate. An image's source is its metadata's `source` column (or the
column --source_column names: HAM10000's acquisition sites are its `dataset` column), else its
lesion id's prefix (ISIC 2019: BCN, HAM, MSK4), else "unknown". A lesion imaged at two sites
(9 on HAM10000) is left out of every split (split.py says why). Prints and writes
(results.json, results.md) per held-out source: test images, balanced accuracy (over the
classes present there), macro ROC-AUC, melanoma-vs-rest and melanoma-vs-nevus ROC-AUC with
95% lesion-level intervals, and melanoma sensitivity at the threshold training chose on its
validation split (site_figures). Resumable: a finished source is skipped. A model that scores well on its
own split and poorly here does not carry across sites; colour constancy is the usual remedy.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from components import class_weights, evaluate, preprocess, split, train  # noqa: E402
from components.common import cli_args, outputs  # noqa: E402
from components.common.atomic import write_json, write_text  # noqa: E402
from components.common.config import (ClassWeightsConfig, ConfigError,  # noqa: E402
                                      EvaluateConfig, PreprocessConfig, SplitConfig,
                                      TrainConfig, check_params, load_params)
from components.common.labels import (CLASS_INDEX, CLASSES, read_labels,  # noqa: E402
                                      sources)
from components.evaluation import sites  # noqa: E402
from components.evaluation.metrics import HEADLINE_SHOWN as SHOWN  # noqa: E402


def held_out(prepared: Path, source: str, out: Path, params: dict, use_mlflow: bool) -> dict:
    """Split with `source` as the test set, train, evaluate; returns the evaluation's metrics."""
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    splits = out / "splits"
    split.run(prepared / outputs.KEPT_LABELS, splits,
              config=SplitConfig.resolve(params, mode="source", test_sources=[source]),
              metadata=prepared / outputs.KEPT_METADATA)
    class_weights.run(splits / "train.csv", out / "class_weights.json",
                      config=ClassWeightsConfig.resolve(params))
    data = train.TrainingData.read(splits / "train.csv", prepared / outputs.PREPARED_IMAGES,
                                   val_csv=splits / "val.csv",
                                   class_weights=out / "class_weights.json")
    train.run(data, out / "train", config=TrainConfig.resolve(params), resume="auto",
              use_mlflow=use_mlflow, experiment="cross-site")
    evaluate.run(out / "train", splits / "test.csv", prepared / outputs.PREPARED_IMAGES,
                 out / "eval", config=EvaluateConfig.resolve(params), use_mlflow=use_mlflow)
    result = {"source": source, **site_figures(out / "eval", splits / "test.csv")}
    write_json(result_file, result)
    return result


def site_figures(eval_dir: Path, test_csv: Path) -> dict:
    """What the study reports of one evaluation: balanced accuracy (over the classes present)
    and macro ROC-AUC with their intervals, melanoma-vs-rest and melanoma-vs-nevus ROC-AUC with
    lesion-level intervals, and melanoma sensitivity/specificity at the threshold chosen on
    validation (calibration.json), else at the test-chosen operating point, labelled."""
    metrics = json.loads((eval_dir / outputs.METRICS).read_text())
    predictions = pd.read_csv(eval_dir / "predictions.csv")
    lesions = read_labels(test_csv).set_index("image").reindex(predictions["image"])
    y = predictions["true"].map(CLASS_INDEX).to_numpy()
    probs = predictions[[f"prob_{c}" for c in CLASSES]].to_numpy()
    groups = lesions["lesion_id"].to_numpy() if "lesion_id" in lesions.columns else None
    pooled = sites.report(y, probs, np.zeros(len(y), dtype=str), groups)["tasks"]
    decision = (metrics.get("decisions") or {}).get("melanoma_suspected")
    point = decision or metrics["melanoma_operating_point"]
    return {"n_images": metrics["n_images"],
            **{k: metrics[k] for k in SHOWN}, "ci95": {k: metrics["ci95"][k] for k in SHOWN},
            **{task: {k: pooled[task]["pooled"].get(k) for k in ("auc", "ci95")}
               for task in ("mel_vs_rest", "mel_vs_nv")},
            "melanoma": {"chosen_on": "validation" if decision else "test",
                         **{k: point.get(k) for k in ("threshold", "sensitivity", "specificity",
                                                      "ci95")}}}


def with_source(metadata: str, column: str, out: Path) -> None:
    """A copy of `metadata` whose `source` column is `column`'s values."""
    table = pd.read_csv(metadata, dtype=str, keep_default_na=False)
    if column not in table.columns:
        raise SystemExit(f"{metadata}: no column {column!r} (it has {', '.join(table.columns)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, table.assign(source=table[column]).to_csv(index=False))


def table(results: list[dict]) -> str:
    def cell(value, ci) -> str:
        return "-" if value is None else (f"{value:.3f} ({ci['low']:.2f}-{ci['high']:.2f})"
                                          if ci and ci.get("low") is not None else f"{value:.3f}")

    lines = ["| held-out source | test images | balanced accuracy | macro ROC-AUC | MEL vs rest "
             "ROC-AUC | MEL vs NV ROC-AUC | MEL sensitivity at spec (threshold chosen on) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        mel = r["melanoma"]
        sens = cell(mel["sensitivity"], (mel.get("ci95") or {}).get("sensitivity"))
        lines.append(" | ".join([
            f"| {r['source']}", str(r["n_images"]),
            cell(r["balanced_accuracy"], r["ci95"]["balanced_accuracy"]),
            cell(r["roc_auc_macro"], r["ci95"]["roc_auc_macro"]),
            cell(r["mel_vs_rest"]["auc"], r["mel_vs_rest"]["ci95"]),
            cell(r["mel_vs_nv"]["auc"], r["mel_vs_nv"]["ci95"]),
            f"{sens} at {mel['specificity']:.2f} ({mel['chosen_on']}) |"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli_args.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--metadata", required=True, help="with lesion_id (and optionally source)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sources", help="comma-separated sources to hold out (default: every one)")
    p.add_argument("--source_column", help="the metadata column naming each image's site, "
                                           "when it is not `source` (HAM10000: dataset)")
    p.add_argument("--no_mlflow", dest="mlflow", action="store_false")
    cli_args.add_params_flags(p)
    cli_args.add_set_flag(p, "one key of the params files")
    args = p.parse_args(argv)
    try:  # a bad value stops the study before any work
        params = load_params(cli_args.params_paths(args))
        for item in args.set:
            cli_args.set_dotted(params, *cli_args.parse_assignment(item), add=True)
        check_params(params, ", ".join(cli_args.params_paths(args)) + " and -S")
    except ConfigError as err:
        p.error(str(err))
    metadata = args.metadata
    if args.source_column:
        metadata = args.out / "metadata_with_source.csv"
        with_source(args.metadata, args.source_column, metadata)
    prepared = args.out / "prepared"
    preprocess.run(args.labels, args.images, prepared, config=PreprocessConfig.resolve(params),
                   metadata=metadata)
    found = sources(read_labels(prepared / outputs.KEPT_LABELS,
                                metadata=prepared / outputs.KEPT_METADATA))
    names = args.sources.split(",") if args.sources else sorted(set(found))
    print(f"sources: {pd.Series(found).value_counts().to_dict()}; holding out {names}", flush=True)
    results = [held_out(prepared, name, args.out / f"test_{name}", params, args.mlflow)
               for name in names]
    body = table(results)
    write_json(args.out / "results.json", results)
    write_text(args.out / "results.md", body + "\n")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
