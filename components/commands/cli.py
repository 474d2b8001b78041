"""`skinlesion <step> ...`: one console command whose subcommands are the pipeline steps.

Each subcommand hands its arguments to that module's `main(argv)`, so `skinlesion split ...`
and `python -m components.split ...` are the same program.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    # the pipeline's steps (components/)
    "preprocess": ("components.preprocess", "resize every labelled image once, with a manifest"),
    "split": ("components.split", "lesion-grouped (or paper) train/val/test split with a report"),
    "class_weights": ("components.class_weights", "class weights and priors from the train split"),
    "train": ("components.train", "train the model (checkpoints, MLflow run, EMA model)"),
    "evaluate": ("components.evaluate", "score a model on the test split: metrics, intervals, figures"),
    "register": ("components.register", "register the trained EMA model in MLflow (alias challenger)"),
    # running them together
    "demo": ("components.commands.demo", "the whole pipeline on a synthetic dataset with dvc (make demo)"),
    "exp": ("components.commands.experiments", "DVC experiments on the committed params.yaml"),
    "pipeline": ("pipeline.cli", "compile, submit or run the Kubeflow pipeline"),
    # the registered model
    "promote": ("components.commands.promote", "move alias champion to the challenger through a metric gate"),
    "calibrate": ("components.commands.calibrate",
                  "fit temperature, decision and OOD thresholds on validation for a training folder"),
    "predict": ("components.commands.predict", "class probabilities for image files with a registered model"),
    "serve": ("components.commands.serve", "the registered model behind an HTTP scoring server"),
    "runs": ("components.commands.runs", "table of recent training runs with metrics and registered versions"),
    "tracking-server": ("components.commands.tracking_server",
                        "MLflow's server and UI on the project's store (mlflow.db, mlartifacts/)"),
    # data and model helpers
    "data": ("components.commands.data", "what changed between two data versions (data diff A B)"),
    "synth": ("components.commands.synth", "write a synthetic ISIC-format dataset (images, labels, metadata)"),
    "info": ("components.commands.model_info", "build the model and print its parameter report"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: skinlesion <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`skinlesion <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"skinlesion: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
