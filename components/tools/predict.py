"""`skinlesion predict`: class probabilities and the top class for image files.

    skinlesion predict [--model models:/skin-lesion-hybrid@champion] \
        (FILES... | --dir DIR | --csv CSV [--dir IMAGES]) [--out CSV] [--batch_size 32]

`--model` (default `models:/<register.model_name>@champion`) is any MLflow model URI of the
registered pyfunc model (`models:/NAME@ALIAS`,
`models:/NAME/VERSION`, `runs:/RUN/classifier`, `models:/m-<id>`) or a local model folder.
Preprocessing (sizes, mean/std, class names) comes from the model itself (see
components/registry/serving.py), never from this command's options.

Inputs: FILES, every .jpg/.jpeg/.png in `--dir`, or the `image` column (else the first column)
of `--csv`; a CSV entry is a path (absolute, relative to the current folder or to the CSV's
folder) or, with `--dir`, an image id looked up there as <id>.jpg/.jpeg/.png (the split CSVs'
format).

Output (`--out`, else stdout): CSV `image,MEL,...,SCC,predicted,error`, one row per input in
input order. An unreadable or missing image gets an `error` text (and is reported on stderr);
the other images are still predicted. Exit status: 0 when every image was predicted, 1 when
some were not (the CSV is still written), 2 for usage errors or a model that does not load.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

from components.common import atomic, cli_args, tracking
from components.common.labels import IMAGE_SUFFIXES, find_image
from components.registry.client import CHAMPION, champion_uri


def list_dir(folder: str | os.PathLike) -> list[str]:
    """Every .jpg/.jpeg/.png (any case) directly in `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return [str(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def read_csv_inputs(csv: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> list[str]:
    """Image paths named by a CSV (column `image`, else the first); see the module docstring."""
    csv = Path(csv)
    table = pd.read_csv(csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if table.shape[1] == 0:
        raise ValueError(f"{csv}: no columns")
    column = "image" if "image" in table.columns else table.columns[0]
    paths = []
    for value in table[column].str.strip():
        if images_dir is not None and not Path(value).suffix:
            try:
                paths.append(str(find_image(images_dir, value)))
                continue
            except FileNotFoundError:
                pass
        for candidate in (Path(value), csv.parent / value,
                          *([Path(images_dir) / value] if images_dir is not None else [])):
            if candidate.is_file():
                paths.append(str(candidate))
                break
        else:
            paths.append(value)  # reported as missing, not dropped
    return paths


def load(model_uri: str, tracking_uri: str | None = None):
    """The pyfunc model behind `model_uri` (tracking URI: argument, MLFLOW_TRACKING_URI, or
    sqlite:///mlflow.db in the current folder)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not Path(model_uri).exists():
        uri = tracking_uri or tracking.tracking_uri()
        tracking.check_reachable(uri)
        # models:/ resolves in the registry: the same store, not one an earlier caller set
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    # paths are this local command's own input; a served model never reads them
    return mlflow.pyfunc.load_model(model_uri, model_config={"allow_paths": True})


def predict_paths(model, paths: list[str], batch_size: int = 32) -> pd.DataFrame:
    """Predict every path with a loaded pyfunc model; missing files get an error row."""
    missing = {i: f"no such file: {p}" for i, p in enumerate(paths) if not Path(p).is_file()}
    present = [i for i in range(len(paths)) if i not in missing]
    result = None
    if present:
        # a batch per call: the model refuses more rows than a scoring request may hold
        batches = [present[i:i + batch_size] for i in range(0, len(present), batch_size)]
        result = pd.concat([model.predict(pd.DataFrame({"image": [paths[i] for i in batch]}),
                                          params={"batch_size": batch_size}).set_axis(batch)
                            for batch in batches])
    columns = list(result.columns) if result is not None else ["predicted", "error"]
    blank = pd.DataFrame({c: ([""] * len(missing) if c in ("predicted", "error") else float("nan"))
                          for c in columns}, index=list(missing))
    blank["error"] = list(missing.values())
    table = pd.concat([t for t in (result, blank) if t is not None and len(t)]).sort_index() \
        if paths else pd.DataFrame(columns=columns)
    table.insert(0, "image", paths)
    return table.reset_index(drop=True)


def run(model_uri: str, images: list[str], out: str | os.PathLike | None = None, *,
        batch_size: int = 32, tracking_uri: str | None = None) -> dict:
    """Predict `images` (paths) with the model at `model_uri`; write the CSV to `out` when
    given. Returns {"table": DataFrame, "n_images", "n_failed", "failed": {path: error}, "out"}."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model = load(model_uri, tracking_uri)
    table = predict_paths(model, list(images), batch_size)
    if out is not None:
        atomic.write_text(out, table.to_csv(index=False, float_format="%.6f"))
    failed = {row.image: row.error for row in table.itertuples() if row.error}
    return {"table": table, "n_images": len(table), "n_failed": len(failed), "failed": failed,
            "out": str(out) if out is not None else None}


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(
        prog="skinlesion predict", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 all predicted, 1 some images failed, 2 usage / model not loadable.")
    parser.add_argument("files", nargs="*", help="image files")
    parser.add_argument("--model", help="MLflow model URI or local model folder (default "
                                        f"models:/<register.model_name>@{CHAMPION})")
    parser.add_argument("--dir", help="every .jpg/.jpeg/.png in this folder; with --csv, where ids are looked up")
    parser.add_argument("--csv", help="CSV whose `image` column (else first column) names the images")
    parser.add_argument("--out", help="output CSV (default: stdout)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--tracking_uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    cli_args.add_params_flags(parser)
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.files, args.csv, args.dir and not args.csv)) != 1:
        parser.error("give image FILES, --dir DIR or --csv CSV (exactly one)")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    model_uri = args.model or champion_uri(cli_args.params_paths(args))
    try:
        if args.files:
            paths = list(args.files)
        elif args.csv:
            paths = read_csv_inputs(args.csv, args.dir)
        else:
            paths = list_dir(args.dir)
    except (OSError, ValueError) as err:
        print(f"skinlesion predict: {err}", file=sys.stderr)
        return 2
    try:
        result = run(model_uri, paths, args.out, batch_size=args.batch_size,
                     tracking_uri=args.tracking_uri)
    except Exception as err:  # noqa: BLE001 - model not found / store unreachable: one line
        print(f"skinlesion predict: cannot load {model_uri}: "
              f"{tracking.scrub(str(err).splitlines()[0])}", file=sys.stderr)
        return 2
    for path, error in result["failed"].items():
        print(f"skinlesion predict: {path}: {error}", file=sys.stderr)
    if args.out is None:
        result["table"].to_csv(sys.stdout, index=False, float_format="%.6f")
    print(f"predicted {result['n_images'] - result['n_failed']}/{result['n_images']} images"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 1 if result["n_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
