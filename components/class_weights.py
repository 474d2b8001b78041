"""class_weights step: per-class weights and priors from the train split, for the recipe's
class balancing (params.yaml `class_weights`; the methods: components/training/balance.py).

The JSON lists classes, counts, priors (n_c / n, for the logit-adjusted loss) and weights in
CLASSES order; training indexes them with the integer labels, for the loss and/or the sampler.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from components.common import atomic, cli_args
from components.common.config import ClassWeightsConfig, ConfigError
from components.common.labels import CLASSES, LabelError, read_labels
from components.training.balance import weights_for_counts


def run(train: str | os.PathLike, out: str | os.PathLike, *,
        config: ClassWeightsConfig | None = None, **settings) -> dict:
    """Write {classes, counts, priors, weights, method} for the train CSV to `out`; return it.

    config (or settings method=, beta=): params.yaml's `class_weights` section.
    """
    cfg = config or ClassWeightsConfig.from_dict(settings)
    method, beta = cfg.method, cfg.beta
    labels = read_labels(train)["label"].to_numpy()
    counts = np.bincount(labels, minlength=len(CLASSES))
    absent = [name for name, n in zip(CLASSES, counts) if n == 0]
    if absent:
        # A zero count has no finite weight or log prior; training could never learn the class.
        raise LabelError(train, None, f"no training image of class {', '.join(absent)}")
    weights = weights_for_counts(counts, method, beta)
    result = {
        "classes": list(CLASSES),
        "counts": counts.tolist(),
        "priors": [round(float(n / counts.sum()), 8) for n in counts],
        "weights": [round(float(w), 6) for w in weights],
        "method": method,
        **({"beta": beta} if method == "effective_number" else {}),
        "train": str(Path(train)),
    }
    atomic.write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.ArgumentParser(prog="python -m components.class_weights",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="train split CSV")
    parser.add_argument("--out", required=True, help="output JSON path")
    cli_args.add_params_flags(parser)
    cli_args.add_config_flags(parser, ClassWeightsConfig)
    args = parser.parse_args(argv)
    try:
        cfg = ClassWeightsConfig.resolve(cli_args.params_paths(args),
                                         **cli_args.config_flags(args, ClassWeightsConfig))
        result = run(args.train, args.out, config=cfg)
    except (ConfigError, LabelError) as err:
        print(f"class_weights: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a read-only or full output folder
        print(f"class_weights: {cli_args.os_error(err)}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
