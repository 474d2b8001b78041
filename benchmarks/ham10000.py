"""Recipe study on real images: how to balance HAM10000's classes (../shared/data).

    python benchmarks/ham10000.py --config benchmarks/ham10000_cpu.yaml --out outputs/ham_study \\
        --no_mlflow --results benchmarks/RESULTS.md                      # CPU: narrow model, 64 px
    python benchmarks/ham10000.py --config benchmarks/ham10000_gpu.yaml --out outputs/ham_gpu \\
        --variants sampler_only,paper --compile --no_mlflow       # GPU: benchmarks/gpu_check.sh
    python benchmarks/ham10000.py --smoke --out /tmp/ham_smoke --no_mlflow   # checks the script

One lesion-grouped 70/15/15 split (seed 0) and the images prepared once at the training size
(the preprocess step), then one training per (variant, seed) in VARIANTS: the same recipe (the
config's `train` section, plus any -S) with only the class balancing changed. Each run's
final EMA model is scored by the evaluate step on the validation split (the choice is made
there: balanced accuracy) and on the test split (reported, never used to choose), with
lesion-level bootstrap intervals.

Resumable: a finished run (its result.json) is skipped, a killed one resumes from its last
checkpoint. `-S train.KEY=VALUE` changes one more setting of the recipe for every run of
the invocation (`train.mixup_alpha=0`); the runs' folders and table rows name it.
`--results FILE` rewrites the study's section of FILE (a Markdown table of every finished run
under --out, each with the command that reproduces it; `--report_only` trains
nothing and only writes it). `--color_constancy shades_of_gray` prepares the images with the
preprocess step's colour constancy. `--smoke` trains a tiny model at 32 px on a few images per
class for one epoch: it checks the script, not the numbers. Images: HAM10000, CC BY-NC-SA
4.0, test use only.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from components import class_weights, evaluate, preprocess, split, train  # noqa: E402
from components.common import cli_args  # noqa: E402
from components.common.atomic import write_json, write_text  # noqa: E402
from components.common.config import (COLOR_CONSTANCY, ConfigError, EvaluateConfig,  # noqa: E402
                                       TrainConfig)
from components.common.images import resize_size  # noqa: E402
from components.training.trainer import EMA_WEIGHTS, LAST  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ham10000-200x150"

# name: (weighted sampler, class-weighted loss, class weight method, logit adjustment tau,
#        share of the epochs before the sampler starts)
VARIANTS = {
    # the paper: inverse-frequency sampler AND inverse-frequency loss weights
    "paper": (True, True, "balanced", 0.0, 0.0),
    "sampler_only": (True, False, "balanced", 0.0, 0.0),
    "loss_only": (False, True, "balanced", 0.0, 0.0),
    "plain": (False, False, "balanced", 0.0, 0.0),            # no balancing: the reference
    # square-root inverse frequency, as loss weights or as the sampler (square-root sampling)
    "sqrt_loss": (False, True, "sqrt", 0.0, 0.0),
    "sqrt_sampler": (True, False, "sqrt", 0.0, 0.0),
    # class-balanced loss, effective number of samples (Cui et al. 2019), plain sampling
    "cb_loss": (False, True, "effective_number", 0.0, 0.0),
    # logit-adjusted loss (Menon et al. 2021), plain sampling, tau = 1 as they recommend
    "logit_adjusted": (False, False, "balanced", 1.0, 0.0),
    # deferred re-sampling (Cao et al. 2019): plain shuffles for the first two thirds of the
    # epochs (features from the natural distribution), the inverse-frequency sampler after
    "deferred_sampler": (True, False, "balanced", 0.0, 2 / 3),
}
SMOKE = dict(preset="tiny", img_size=32, epochs=1, batch_size=8,
             warmup_epochs=0, num_workers=0, gpu_resident="off")
SMOKE_PER_CLASS = {"train": 4, "val": 2, "test": 2}
SECTION = ("<!-- ham10000-study:start -->", "<!-- ham10000-study:end -->")


def variant_overrides(name: str, epochs: int) -> dict:
    sampler, loss, _, tau, defer = VARIANTS[name]
    return dict(weighted_sampler=sampler, class_weighted_loss=loss, logit_adjust_tau=tau,
                defer_sampler_epochs=min(round(defer * epochs), epochs - 1))


def make_splits(data: Path, out: Path, smoke: bool) -> dict[str, Path]:
    """Lesion-grouped split of the labelled images (seed 0); smoke: a few per class.
    Mode folds: the split the recorded study was measured on (7,005 / 1,504 / 1,504 images),
    so that its rows reproduce; the pipeline's default (grouped) came later."""
    paths = {name: out / f"{name}.csv" for name in ("train", "val", "test")}
    if not all(p.is_file() for p in paths.values()):
        split.run(data / "labels.csv", out, metadata=data / "image_info.csv", mode="folds",
                  seed=0)
        if smoke:
            for name, path in paths.items():
                frame = pd.read_csv(path)
                frame.groupby("label").head(SMOKE_PER_CLASS[name]).to_csv(path, index=False)
    return paths


def run_one(name: str, seed: int, cfg: TrainConfig, splits: dict, img_dir: Path,
            out: Path, use_mlflow: bool, beta: float, evaluation: EvaluateConfig,
            color_constancy: str, command: str, changes: dict) -> dict:
    """Train (or resume, or skip) one variant with one seed; evaluate it on val and test."""
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    method = VARIANTS[name][2]
    weights = out / "class_weights.json"
    class_weights.run(splits["train"], weights, method=method, beta=beta)
    resume = out / LAST if (out / LAST).is_file() else None
    data = train.TrainingData.read(splits["train"], img_dir, val_csv=splits["val"],
                                   class_weights=weights)
    summary = train.run(data, out, config=cfg, resume=resume, use_mlflow=use_mlflow,
                        experiment="ham10000-study")
    scores = {}
    for part in ("val", "test"):
        metrics = evaluate.run(out / EMA_WEIGHTS, splits[part], img_dir, out / f"eval_{part}",
                               config=evaluation, use_mlflow=False)
        full = json.loads((out / f"eval_{part}" / "metrics.json").read_text())
        scores[part] = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "f1_macro")}
        scores[part]["ci95"] = {k: full["ci95"][k] for k in scores[part]}
    result = {"variant": name, "seed": seed, "method": method,
              **variant_overrides(name, cfg.epochs),
              "color_constancy": color_constancy, "changes": changes, "epochs": cfg.epochs,
              "train_seconds": summary["seconds"], "command": command, **scores}
    write_json(result_file, result)
    return result


def table(results: list[dict]) -> str:
    """Markdown rows: validation balanced accuracy (the choice), test metrics with 95% CIs."""
    def cell(r, part, key):
        ci = r[part]["ci95"][key]
        return f"{r[part][key]:.3f} ({ci['low']:.2f}-{ci['high']:.2f})"

    lines = ["| variant | seed | epochs | val bal. acc. | test acc. | test bal. acc. | "
             "test macro F1 | command |", "|---|---|---|---|---|---|---|---|"]
    commands = sorted({r.get("command", "") for r in results})
    for r in sorted(results, key=lambda r: (-r["val"]["balanced_accuracy"], r["seed"])):
        cc = r.get("color_constancy", "none")
        extra = [] if cc == "none" else [cc]
        extra += [f"{k}={v}" for k, v in r.get("changes", {}).items()]
        lines.append(f"| {' + '.join([r['variant'], *extra])} | {r['seed']} | "
                     f"{r['epochs']} | "
                     f"{cell(r, 'val', 'balanced_accuracy')} | {cell(r, 'test', 'accuracy')} | "
                     f"{cell(r, 'test', 'balanced_accuracy')} | {cell(r, 'test', 'f1_macro')} | "
                     f"{commands.index(r.get('command', '')) + 1} |")
    lines.append("")
    lines += [f"{i}. `{c}`" for i, c in enumerate(commands, 1)]
    return "\n".join(lines)


def write_section(results_md: Path, body: str, section: tuple[str, str] = SECTION) -> None:
    """Replace a study's marked section of results_md (append it the first time)."""
    text = results_md.read_text() if results_md.is_file() else ""
    block = f"{section[0]}\n{body}\n{section[1]}"
    if section[0] in text:
        head, rest = text.split(section[0], 1)
        text = head + block + rest.split(section[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(results_md, text)


def main(argv: list[str] | None = None) -> int:
    p = cli_args.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--params", "--config", default=str(ROOT / "params.yaml"),
                   help="its train section is the recipe the variants change")
    p.add_argument("--epochs", type=int, help="override the config's epochs")
    cli_args.add_set_flag(p, "one more change of the train section for every run")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--beta", type=float, default=0.999, help="for effective_number weights")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--results", type=Path, help="Markdown file whose study section to rewrite")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script")
    p.add_argument("--color_constancy", choices=COLOR_CONSTANCY, default="none",
                   help="prepare the images with colour constancy (the preprocess step's)")
    p.add_argument("--no_mlflow", dest="mlflow", action="store_false")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: print (and with --results write) the finished runs' table")
    args = p.parse_args(argv)
    command = "python benchmarks/ham10000.py " + shlex.join(argv if argv is not None
                                                             else sys.argv[1:])
    if unknown := set(args.variants.split(",")) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    args.changes = recipe_changes(p, args.set)
    try:  # a bad value or params file stops the study before any work
        base_recipe(args)
    except ConfigError as err:
        p.error(str(err))

    if not args.report_only:
        train_variants(args)
    results = [json.loads(f.read_text()) for f in sorted(args.out.glob("runs/*/result.json"))]
    body = table(results)
    print(body)
    if args.results:
        write_section(args.results, "Every finished run under the study's --out, with the "
                      "command that reproduces it (variants: VARIANTS in "
                      f"benchmarks/ham10000.py). Written by `{command}`.\n\n{body}")
    return 0


def recipe_changes(parser, items: list[str]) -> dict:
    """-S train.KEY=VALUE items -> {KEY: VALUE}, checked against TrainConfig's keys. The
    variants' own keys, the seed and the epochs have their own flags (--variants, --seeds,
    --epochs): an -S would be overridden by them, or named twice."""
    own = {*variant_overrides("paper", 1), "seed", "epochs"}
    changes = {}
    for item in items:
        try:
            key, value = cli_args.parse_assignment(item)
        except ConfigError as err:
            parser.error(str(err))
        section, _, leaf = key.rpartition(".")
        if section != "train" or leaf not in TrainConfig().as_dict():
            parser.error(f"-S {item!r}: expected train.KEY=VALUE with a key of params.yaml's "
                         "train section")
        if leaf in own:
            parser.error(f"-S {item!r}: {leaf} is set by --variants, --seeds or --epochs")
        changes[leaf] = value
    return changes


def base_recipe(args) -> TrainConfig:
    """The recipe the variants change: the params file's train section, --smoke's and the
    flags' settings, the -S changes."""
    flags = {"epochs": args.epochs, "compile": args.compile or None}
    return TrainConfig.resolve(args.params, **{**(SMOKE if args.smoke else {}),
                                               **{k: v for k, v in flags.items() if v},
                                               **args.changes})


def row_command(args, name: str, seed: int) -> str:
    """The command that reproduces one (variant, seed) run of this invocation."""
    argv = ["--config", args.params, "--data", str(args.data), "--out", str(args.out)]
    argv += ["--smoke"] if args.smoke else []
    argv += ["--variants", name, "--seeds", str(seed)]
    argv += ["--epochs", str(args.epochs)] if args.epochs else []
    argv += [a for item in args.set for a in ("-S", item)]
    argv += ["--color_constancy", args.color_constancy] if args.color_constancy != "none" else []
    argv += ["--compile"] if args.compile else []
    argv += [] if args.mlflow else ["--no_mlflow"]
    return "python benchmarks/ham10000.py " + shlex.join(argv)


def train_variants(args) -> None:
    """Train and score every (variant, seed) not finished yet."""
    splits = make_splits(args.data, args.out / "splits", args.smoke)
    base = base_recipe(args)
    # Prepared once at the training size, so that an epoch is bound by the model, not by JPEG
    # decoding (with the resident input path, decoded once more into memory).
    cc = args.color_constancy
    img_dir = args.out / f"prepared_{resize_size(base.img_size)}{'' if cc == 'none' else '_' + cc}"
    preprocess.run(args.data / "labels.csv", args.data / "images", img_dir,
                   size=resize_size(base.img_size), color_constancy=cc)
    img_dir = img_dir / "images"

    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.variants.split(","):
            cfg = TrainConfig.from_dict({**base.as_dict(), "seed": seed,
                                         **variant_overrides(name, base.epochs)})
            changed = "".join(f"-{k}{v}" for k, v in args.changes.items())
            run_dir = f"{name}{'' if cc == 'none' else '-' + cc}{changed}-e{cfg.epochs}-s{seed}"
            r = run_one(name, seed, cfg, splits, img_dir, args.out / "runs" / run_dir,
                        args.mlflow and not args.smoke, args.beta,
                        EvaluateConfig(bootstrap=50 if args.smoke else 1000), cc,
                        row_command(args, name, seed), args.changes)
            print(f"{name} seed {seed}: val bal acc {r['val']['balanced_accuracy']:.3f}, test acc "
                  f"{r['test']['accuracy']:.3f} bal acc {r['test']['balanced_accuracy']:.3f}",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
