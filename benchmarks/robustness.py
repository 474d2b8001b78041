"""Robustness study: which recipe switch makes the model learn the lesion, not the site.

    python benchmarks/robustness.py --out outputs/robustness --candidates baseline,class_site \\
        [--seeds 0,1] [--hold_out rosendahl] [--results benchmarks/RESULTS.md] [--no_mlflow]

HAM10000's acquisition sites (the metadata's `dataset` column) differ in device, population
and class mix; a model can score well on a pooled split by recognising the site. Each
candidate is one change of the recipe (CANDIDATES: params.yaml keys; `a+b` combines two),
trained twice with the pipeline's own steps:

- in-site: the recipe study's lesion-grouped split of all four sites (`split.mode: folds`,
  seed 0, 7,005 / 1,504 / 1,504 images), scored on validation (where the choice is made) and
  on test (reported), both with melanoma-vs-nevus ROC-AUC *within* rosendahl and
  vidir_modern, which a site detector cannot earn;
- held out: trained on the other sites, tested on each --hold_out site entire
  (`split.mode: source`, benchmarks/cross_site.py's `held_out`), reported, never used to
  choose.

The choice: the mean within-site melanoma-vs-nevus ROC-AUC on the in-site *validation* split
(rosendahl and vidir_modern), with validation balanced accuracy beside it. `tta` is an
evaluation switch: it scores the baseline's models with flip test-time augmentation.
The scale is the recipe study's CPU one (benchmarks/ham10000_cpu.yaml: narrow model, 64 px,
30 epochs). Resumable: a finished part is skipped, a killed training resumes. Images:
HAM10000, CC BY-NC-SA 4.0, test use only.
"""
from __future__ import annotations

import copy
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from benchmarks.cross_site import held_out, site_figures, with_source  # noqa: E402
from benchmarks.ham10000 import write_section  # noqa: E402
from components import class_weights, evaluate, preprocess, split, train  # noqa: E402
from components.common import cli_args, outputs  # noqa: E402
from components.common.atomic import write_json  # noqa: E402
from components.common.config import (ClassWeightsConfig, ConfigError,  # noqa: E402
                                      EvaluateConfig, PreprocessConfig, SplitConfig,
                                      TrainConfig,
                                      check_params, load_params)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ham10000-200x150"
SITES = ("rosendahl", "vidir_modern")  # the two sites with enough melanomas to judge
SECTION = ("<!-- robustness-study:start -->", "<!-- robustness-study:end -->")

# name: the params it changes (on top of params.yaml + benchmarks/ham10000_cpu.yaml)
CANDIDATES = {
    "baseline": {},
    # colour constancy at preprocess, so at train and serve time (Finlayson & Trezzi 2004;
    # Barata et al. 2015 for dermoscopy)
    "shades_of_gray": {"preprocess": {"color_constancy": "shades_of_gray"}},
    # hue, gamma, blur (Perez et al. 2018; the ISIC 2019 winners, Gessert et al. 2020)
    "strong_photometric": {"train": {"photometric": "strong"}},
    # zoom differs by site and device: crops down to 35% of the area (Perez et al. 2018)
    "wide_crop": {"train": {"crop_scale": [0.35, 1.0]}},
    # the dermoscope's dark circle as a shortcut (Bissoto et al. 2020): half the images cut to one
    "field_of_view": {"train": {"field_of_view": 0.5}},
    # classes and the sites within each class (Sagawa et al. 2020; Idrissi et al. 2022)
    "class_site": {"train": {"sampler_balance": "class_site"}},
    # a wider model of the same layout (1.5x every stage)
    "wider": {"train": {"dims": [48, 96, 144, 192]}},
    # SimCLR on each training split's own images first, standing in for ImageNet weights
    # (Chen et al. 2020; Azizi et al. 2021 on dermatology images)
    "self_supervised": {"train": {"self_supervised_epochs": 40}},
    # flip test-time augmentation of the baseline's models (evaluation only)
    "tta": {"evaluate": {"tta": True}},
}
EVALUATION_ONLY = {"tta"}
IN_SITE_SPLIT = {"split": {"mode": "folds", "seed": 0}}
SMOKE = {"preprocess": {"size": 40}, "split": {"mode": "grouped"},
         "train": {"preset": "tiny", "dims": None, "depths": None, "img_size": 32, "epochs": 1,
                   "batch_size": 16, "warmup_epochs": 0, "num_workers": 0,
                   "gpu_resident": "on"},
         "evaluate": {"bootstrap": 20}}


def merged(base: dict, *changes: dict) -> dict:
    out = copy.deepcopy(base)
    for change in changes:
        for section, values in change.items():
            out.setdefault(section, {}).update(copy.deepcopy(values))
    return out


def candidate_changes(name: str) -> dict:
    """`a+b` -> a's and b's changes together."""
    return merged({}, *(CANDIDATES[part] for part in name.split("+")))


def prepare(params: dict, data: dict, out: Path) -> Path:
    """The images prepared with the candidate's preprocess settings (shared by candidates)."""
    cfg = PreprocessConfig.resolve(params)
    prepared = out / f"prepared_{cfg.size}_{cfg.color_constancy}"
    preprocess.run(data["labels"], data["images"], prepared, config=cfg,
                   metadata=data["metadata"])
    return prepared


def in_site(prepared: Path, splits: Path, run: Path, params: dict, sites: list[str],
            use_mlflow: bool, train_dir: Path | None = None) -> dict:
    """Train on the pooled split's train part (unless `train_dir` holds the model already),
    evaluate on val and test; per part the headline metrics and the within-site AUCs."""
    result_file = run / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    images = prepared / outputs.PREPARED_IMAGES
    if train_dir is None:
        train_dir = run / "train"
        class_weights.run(splits / "train.csv", run / "class_weights.json",
                          config=ClassWeightsConfig.resolve(params))
        data = train.TrainingData.read(splits / "train.csv", images, val_csv=splits / "val.csv",
                                       class_weights=run / "class_weights.json")
        train.run(data, train_dir, config=TrainConfig.resolve(params), resume="auto",
                  use_mlflow=use_mlflow, experiment="robustness")
    result = {}
    for part in ("val", "test"):
        evaluate.run(train_dir, splits / f"{part}.csv", images, run / f"eval_{part}",
                     config=EvaluateConfig.resolve(params), use_mlflow=False)
        figures = site_figures(run / f"eval_{part}", splits / f"{part}.csv")
        cross = json.loads((run / f"eval_{part}" / outputs.METRICS).read_text())["cross_site"]
        figures["within_mel_vs_nv"] = {s: cross["tasks"]["mel_vs_nv"]["within"][s]
                                       for s in sites}
        result[part] = figures
    write_json(result_file, result)
    return result


def pooled_splits(prepared: Path, out: Path, params: dict) -> Path:
    """The recipe study's lesion-grouped split (mode folds, seed 0; --smoke: grouped, which
    any size allows), with each image's site."""
    splits = out / "splits_in_site"
    if not (splits / "test.csv").is_file():
        split.run(prepared / outputs.KEPT_LABELS, splits, config=SplitConfig.resolve(params),
                  metadata=prepared / outputs.KEPT_METADATA)
    return splits


def run_candidate(name: str, seed: int, base: dict, data: dict, hold_out: list[str],
                  sites: list[str], out: Path, use_mlflow: bool) -> dict:
    params = merged(base, candidate_changes(name), {"train": {"seed": seed}})
    prepared = prepare(params, data, out)
    splits = pooled_splits(prepare(base, data, out), out, base)
    runs = out / "runs"
    trained_as = "baseline" if name in EVALUATION_ONLY else name
    if trained_as != name and not (runs / f"baseline-s{seed}" / "in_site" / "train").is_dir():
        raise SystemExit(f"{name} scores the baseline's models: run the baseline with seed "
                         f"{seed} first (--candidates baseline,{name})")
    result = {"candidate": name, "seed": seed, "changes": candidate_changes(name),
              "sites": sites,
              "in_site": in_site(prepared, splits, runs / f"{name}-s{seed}" / "in_site", params,
                                 sites, use_mlflow,
                                 train_dir=(runs / f"baseline-s{seed}" / "in_site" / "train"
                                            if trained_as != name else None))}
    for site in hold_out:
        where = runs / f"{trained_as}-s{seed}" / f"held_out_{site}"
        if trained_as == name:
            result[f"held_out_{site}"] = held_out(prepared, site, where, params, use_mlflow)
            continue
        scored = runs / f"{name}-s{seed}" / f"held_out_{site}"  # the baseline's model, rescored
        evaluate.run(where / "train", where / "splits" / "test.csv",
                     prepared / outputs.PREPARED_IMAGES, scored,
                     config=EvaluateConfig.resolve(params), use_mlflow=False)
        result[f"held_out_{site}"] = {"source": site,
                                      **site_figures(scored, where / "splits" / "test.csv")}
    return result


def selection_score(r: dict) -> float:
    """The choice: mean within-site MEL-vs-NV ROC-AUC on the in-site validation split."""
    within = r["in_site"]["val"]["within_mel_vs_nv"]
    aucs = [within[s]["auc"] for s in r["sites"]]
    return float("nan") if None in aucs else sum(aucs) / len(aucs)


def table(results: list[dict], hold_out: list[str]) -> str:
    def cell(value, ci=None) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" ({ci['low']:.2f}-{ci['high']:.2f})"
                                 if ci and ci.get("low") is not None else "")

    head = ["candidate", "seed", "val: within-site MEL vs NV, mean (the choice)", "val bal. acc.",
            "test bal. acc.", "test acc.",
            *(f"test MEL vs NV within {s}" for s in results[0]["sites"])]
    for site in hold_out:
        head += [f"held out {site}: bal. acc.", "MEL vs rest", "MEL vs NV"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=lambda r: (-selection_score(r), r["seed"])):
        val, test = r["in_site"]["val"], r["in_site"]["test"]
        row = [r["candidate"], str(r["seed"]), cell(selection_score(r)),
               cell(val["balanced_accuracy"], val["ci95"]["balanced_accuracy"]),
               cell(test["balanced_accuracy"], test["ci95"]["balanced_accuracy"]),
               cell(test["accuracy"], test["ci95"]["accuracy"]),
               *(cell(test["within_mel_vs_nv"][s]["auc"], test["within_mel_vs_nv"][s].get("ci95"))
                 for s in r["sites"])]
        for site in hold_out:
            h = r.get(f"held_out_{site}")
            row += (["-"] * 3 if h is None else
                    [cell(h["balanced_accuracy"], h["ci95"]["balanced_accuracy"]),
                     cell(h["mel_vs_rest"]["auc"], h["mel_vs_rest"]["ci95"]),
                     cell(h["mel_vs_nv"]["auc"], h["mel_vs_nv"]["ci95"])])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli_args.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA,
                   help="labels.csv, images/ and ham10000_metadata.csv (with `dataset`)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--candidates", default="baseline",
                   help=f"comma-separated; each one of {', '.join(CANDIDATES)} or a+b")
    p.add_argument("--seeds", default="0")
    p.add_argument("--hold_out", default="rosendahl", help="comma-separated sites ('' : none)")
    p.add_argument("--results", type=Path, help="Markdown file whose study section to rewrite")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--smoke", action="store_true", help="a tiny model, one epoch: checks the "
                                                        "script, not the numbers")
    p.add_argument("--sites", default=",".join(SITES),
                   help="the sites whose within-site MEL-vs-NV AUC makes the choice")
    p.add_argument("--params", default=str(ROOT / "params.yaml"), help="the recipe")
    p.add_argument("--scale", default=str(ROOT / "benchmarks" / "ham10000_cpu.yaml"),
                   help="params merged over it: the study's scale")
    p.add_argument("--no_mlflow", dest="mlflow", action="store_false")
    args = p.parse_args(argv)
    names = args.candidates.split(",")
    if unknown := {part for n in names for part in n.split("+")} - set(CANDIDATES):
        p.error(f"unknown candidates {sorted(unknown)}; known: {', '.join(CANDIDATES)}")
    hold_out = [s for s in args.hold_out.split(",") if s]
    sites = args.sites.split(",")
    try:  # a bad value stops the study before any work
        base = merged(load_params([args.params, args.scale]), {"preprocess": {"size": 73}},
                      IN_SITE_SPLIT, SMOKE if args.smoke else {})
        for name in names:
            check_params(merged(base, candidate_changes(name)), f"candidate {name}")
    except ConfigError as err:
        p.error(str(err))

    if not args.report_only:
        data = {"labels": args.data / "labels.csv", "images": args.data / "images",
                "metadata": args.out / "metadata_with_source.csv"}
        with_source(args.data / "ham10000_metadata.csv", "dataset", data["metadata"])
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:
                result_file = args.out / "results" / f"{name}-s{seed}.json"
                result = run_candidate(name, seed, base, data, hold_out, sites, args.out,
                                       args.mlflow)
                write_json(result_file, result)
                print(f"{name} seed {seed}: choice {selection_score(result):.3f}", flush=True)
    results = [json.loads(f.read_text()) for f in sorted((args.out / "results").glob("*.json"))]
    body = table(results, hold_out)
    print(body)
    if args.results:
        command = "python benchmarks/robustness.py " + shlex.join(argv if argv is not None
                                                                   else sys.argv[1:])
        write_section(args.results, f"Written by `{command}`.\n\n{body}", SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
