"""`skinlesion info`: build a preset, print its parameter report and time a forward pass."""
from __future__ import annotations

import json
import time

import torch

from components.common import cli_args
from model import PRESETS, HybridConvNeXtV2


def run(preset: str = "paper", num_classes: int = 8, img_size: int = 224, batch_size: int = 2) -> dict:
    model = HybridConvNeXtV2(num_classes=num_classes, preset=preset).eval()
    x = torch.randn(batch_size, 3, img_size, img_size)
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(x)
        seconds = time.perf_counter() - start
    return {"preset": preset, "parameters": model.count_parameters(),
            "output_shape": list(logits.shape), "forward_seconds": round(seconds, 3),
            "config": model.config}


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="skinlesion info", description=__doc__)
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--num_classes", type=int, default=8)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run(args.preset, args.num_classes, args.img_size)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"HybridConvNeXtV2 preset={report['preset']}  (paper: 21.92M parameters)")
    for part, count in report["parameters"].items():
        print(f"  {part:<10} {count:>12,}")
    print(f"forward {report['output_shape']} in {report['forward_seconds']} s on CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
