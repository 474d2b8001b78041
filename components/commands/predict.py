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

Output (`--out`, else stdout): CSV `image,MEL,...,SCC,predicted,melanoma_suspected,
malignant_suspected,ood_score,in_distribution,reason,model_version,error` (the served model's
answer: components/registry/serving.py), one row per input in input order. An unreadable or missing image gets an `error` text (and is reported on stderr);
the other images are still predicted. The images go to the model in requests of at most
`--batch_size` and at most the model's row limit (SKINLESION_SERVING_MAX_ROWS, 256), and each
request's rows are written as soon as it is answered: to `OUT.partial`, renamed to `--out` once
every image is done. A run that stops midway (a full disk, an error, a kill) leaves
`OUT.partial` holding every finished request's rows, a valid CSV; a new run starts over.
Exit status: 0 when every image was predicted, 1 when some were not (the CSV is still
written), 2 for usage errors, a model that does not load, or a run that did not finish.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pandas as pd

from components.common import cli_args, tracking
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
        result = model.predict(pd.DataFrame({"image": [paths[i] for i in present]}),
                               params={"batch_size": batch_size})
        result.index = present
    columns = list(result.columns) if result is not None else ["predicted", "error"]
    blank = pd.DataFrame({c: ([""] * len(missing) if c in ("predicted", "error") else float("nan"))
                          for c in columns}, index=list(missing))
    blank["error"] = list(missing.values())
    table = pd.concat([t for t in (result, blank) if t is not None and len(t)]).sort_index() \
        if paths else pd.DataFrame(columns=columns)
    table.insert(0, "image", paths)
    return table.reset_index(drop=True)


class PredictStopped(RuntimeError):
    """A run that did not finish; the rows done are in `partial` (None: they went to stdout)."""

    def __init__(self, done: int, partial: Path | None, reason: str):
        super().__init__(reason)
        self.done, self.partial = done, partial


def request_rows(model, batch_size: int) -> int:
    """Images per request: at most batch_size and the served model's row limit."""
    from mlflow.exceptions import MlflowException

    from components.registry.serving import MAX_ROWS  # torch and mlflow: not for --help

    try:
        limit = getattr(model.unwrap_python_model(), "max_rows", MAX_ROWS)
    except MlflowException:  # not a python-model pyfunc: the default limit
        limit = MAX_ROWS
    return max(1, min(batch_size, limit))


def write_predictions(model, paths: list[str], out: str | os.PathLike | None,
                      batch_size: int = 32) -> dict:
    """Predict `paths` one request at a time, writing each request's rows as it is answered
    (module docstring). Returns {"n_images", "n_failed", "failed": {path: error}, "out"};
    raises PredictStopped when it cannot finish."""
    rows = request_rows(model, batch_size)
    partial = Path(f"{out}.partial") if out is not None else None
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
    # Unbuffered appends: after a failed write nothing is left in a buffer to land later.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if partial else None
    failed, done, written = {}, 0, 0
    try:
        for start in range(0, max(len(paths), 1), rows):
            table = predict_paths(model, paths[start:start + rows], batch_size)
            text = table.to_csv(index=False, header=start == 0, float_format="%.6f")
            if fd is None:
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                written += _append(fd, text.encode("utf-8"))
            done += len(table)
            failed.update((row.image, row.error) for row in table.itertuples() if row.error)
    except Exception as err:  # noqa: BLE001 - keep the rows done, say why it stopped
        if fd is not None:
            with contextlib.suppress(OSError):  # drop a request's rows cut short (full disk)
                os.ftruncate(fd, written)
        raise PredictStopped(done, partial, str(err).splitlines()[0] if str(err)
                             else type(err).__name__) from err
    finally:
        if fd is not None:
            os.close(fd)
    if partial:
        os.replace(partial, out)
    return {"n_images": len(paths), "n_failed": len(failed), "failed": failed,
            "out": str(out) if out is not None else None}


def _append(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
    return len(data)


def run(model_uri: str, images: list[str], out: str | os.PathLike | None = None, *,
        batch_size: int = 32, tracking_uri: str | None = None) -> dict:
    """Predict `images` (paths) with the model at `model_uri` into `out` (else stdout); see
    write_predictions."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return write_predictions(load(model_uri, tracking_uri), list(images), out, batch_size)


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
        model = load(model_uri, args.tracking_uri)
    except Exception as err:  # noqa: BLE001 - model not found / store unreachable: one line
        print(f"skinlesion predict: cannot load {model_uri}: "
              f"{tracking.scrub(str(err).splitlines()[0])}", file=sys.stderr)
        return 2
    try:
        result = write_predictions(model, paths, args.out, args.batch_size)
    except OSError as err:  # the output cannot be opened (a read-only folder)
        print(f"skinlesion predict: {cli_args.os_error(err)}", file=sys.stderr)
        return 2
    except PredictStopped as err:
        kept = f"; their rows are in {err.partial}" if err.partial else ""
        print(f"skinlesion predict: stopped after {err.done} of {len(paths)} images: "
              f"{tracking.scrub(str(err))}{kept}", file=sys.stderr)
        return 2
    for path, error in result["failed"].items():
        print(f"skinlesion predict: {path}: {error}", file=sys.stderr)
    print(f"predicted {result['n_images'] - result['n_failed']}/{result['n_images']} images"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 1 if result["n_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
