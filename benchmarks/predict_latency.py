"""Inference speed of the registered (pyfunc) model: single-image latency and batch throughput.

    python benchmarks/predict_latency.py [--preset paper] [--img-size 224] [--device cpu|cuda]
        [--batch-size 32] [--n-batch 64] [--repeats 20] [--results benchmarks/RESULTS.md]

Builds the model with random weights (speed does not depend on them), saves it exactly as the
register step logs it (components/registry/serving.py + safetensors + preprocessing.json), loads it
with `mlflow.pyfunc.load_model`, and times:

- single image, end to end: `predict(DataFrame([path]))` on one JPEG (decode, EXIF, resize
  to the prepare size, crop, normalise, forward, softmax), median and p90 over --repeats;
- single image, forward only: the network on one preprocessed tensor;
- batch, end to end: `predict` on --n-batch JPEGs with params batch_size;
- batch, forward only: images/s of the network on a (batch, 3, H, W) tensor.

Two JPEG sizes: 600x450 (HAM10000's originals) and 1024x1024 (a typical ISIC 2019 image).
With --results, the table replaces this script's own section of RESULTS.md (between its
markers) and leaves everything else in the file as it is.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from components.registry import pyfunc, serving  # noqa: E402
from components.common.labels import CLASSES  # noqa: E402
from components.training.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from model import PRESETS, HybridConvNeXtV2  # noqa: E402

START, END = "<!-- predict_latency:start -->", "<!-- predict_latency:end -->"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, repeats: int, device: str) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def _jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[str]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize(size, Image.Resampling.BILINEAR)
        path = folder / f"img{size[0]}_{i}.jpg"
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


def _row(what: str, jpeg: str, single: list[float], batch: list[float], n: int) -> dict:
    # min = the least disturbed try (a shared machine); median and p90 = what a caller sees
    return {"what": what, "jpeg": jpeg, "single_ms_min": 1000 * min(single),
            "single_ms_median": 1000 * statistics.median(single),
            "single_ms_p90": 1000 * float(np.percentile(single, 90)),
            "batch_img_s_best": n / min(batch), "batch_img_s_median": n / statistics.median(batch)}


def bench(preset: str, img_size: int, device: str, batch_size: int, n_batch: int,
          repeats: int) -> dict:
    os.environ["SKINLESION_DEVICE"] = device
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    net = HybridConvNeXtV2(num_classes=len(CLASSES), preset=preset).eval()
    meta = {"model_config": net.config, "classes": list(CLASSES), "img_size": img_size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    results = {"preset": preset, "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
               "img_size": img_size, "device": device, "batch_size": batch_size, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        artifacts = serving.write_artifacts(net.state_dict(), meta, tmp / "staging")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pyfunc.save_model(str(tmp / "model"), **pyfunc.pyfunc_kwargs(artifacts, list(CLASSES)))
        model = mlflow.pyfunc.load_model(str(tmp / "model"), model_config={"allow_paths": True})
        inner = model.unwrap_python_model()

        x1 = torch.randn(1, 3, img_size, img_size)
        xb = torch.randn(batch_size, 3, img_size, img_size)
        for _ in range(3):
            inner.outputs_tensor(x1)
        fwd1 = _time(lambda: inner.outputs_tensor(x1), repeats, device)
        inner.outputs_tensor(xb)
        fwdb = _time(lambda: inner.outputs_tensor(xb), max(3, repeats // 4), device)
        results["rows"].append(_row("forward only", "-", fwd1, fwdb, batch_size))
        for size in ((600, 450), (1024, 1024)):
            paths = _jpegs(tmp, n_batch, size)
            one = pd.DataFrame({"image": paths[:1]})
            many = pd.DataFrame({"image": paths})
            for _ in range(2):
                model.predict(one)
            e2e1 = _time(lambda: model.predict(one), repeats, device)
            model.predict(many.head(batch_size), params={"batch_size": batch_size})
            e2eb = _time(lambda: model.predict(many, params={"batch_size": batch_size}), 3, device)
            results["rows"].append(_row("end to end (pyfunc predict)", f"{size[0]}x{size[1]}",
                                        e2e1, e2eb, n_batch))
    return results


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def markdown(r: dict, command: str) -> str:
    lines = [
        START,
        "## Inference: registered pyfunc model (benchmarks/predict_latency.py)",
        "",
        f"`{command}` on {machine(r['device'])}; preset `{r['preset']}` ({r['params_m']:.2f}M params), "
        f"input {r['img_size']} px, fp32, batch {r['batch_size']}, torch {torch.__version__}; "
        f"load average before/after {r['load'][0]:.1f}/{r['load'][1]:.1f} (other work on the "
        "machine inflates the p90 and lowers throughput).",
        "",
        "| path | JPEG | single image ms: min / median / p90 | batch img/s: best / median |",
        "|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['what']} | {row['jpeg']} | {row['single_ms_min']:.0f} / "
                     f"{row['single_ms_median']:.0f} / {row['single_ms_p90']:.0f} | "
                     f"{row['batch_img_s_best']:.1f} / {row['batch_img_s_median']:.1f} |")
    lines += ["", "End to end = `model.predict(DataFrame of paths)`: JPEG decode (Pillow draft for big "
              "JPEGs), resize to the prepare size, crop, normalise, forward, softmax, DataFrame out. "
              "GPU: not measured in this session (no GPU lent); rerun with `--device cuda` and add "
              "the rows.", END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace this script's section of `path` (between its markers), or append it."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                        help="tiny: the 4-block test model (a smoke test)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--results", help="RESULTS.md to update (this script's section only)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    r = bench(args.preset, args.img_size, args.device, args.batch_size, args.n_batch,
              args.repeats)
    r["load"] = (load_before, os.getloadavg()[0])
    command = "python benchmarks/predict_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(r, command.strip())
    print(section)
    if args.results:
        write_section(Path(args.results), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
