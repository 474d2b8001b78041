"""The site shortcut: melanoma ROC-AUC within each source of the test set beside the pooled one.

A model can rank melanoma above nevus on a pooled multi-site test set only because it knows the
site: where one site holds most melanomas and another almost only nevi (HAM10000's
vidir_molemax), a site detector scores a high pooled AUC while telling the two apart no better
than chance inside any one site. The within-source AUC cannot be earned that way, so a pooled
figure well above every within-source figure is the signature of a shortcut.

Two binary tasks, both scored on prob_MEL (the melanoma-vs-rest operating point's score):
`mel_vs_nv` (MEL against NV, on the MEL and NV images only; the hard clinical pair) and
`mel_vs_rest` (MEL against every other image). A source without a positive or without a
negative image for a task gets no AUC, and says which is missing.

The flag, per task: **`shortcut` is true when the pooled AUC exceeds every judged source's own
AUC by more than its interval**, i.e. the pooled figure's 95% interval lies wholly above the
best within-source figure. Only sources with at least MIN_PER_CLASS images of each class of
the task are judged (every source's AUC is reported): HAM10000's vidir_molemax test split
holds 2 melanomas, whose AUC (0.79 [0.63, 0.94] for the CPU-scale default) says nothing about
the model yet would be the "best site". Also reported: gap = pooled - the best judged
within-source AUC, with a 95% interval from one lesion-level bootstrap (metrics.bootstrap)
that recomputes every figure on the same drawn lesions (they share images). The flag does not
require that interval to clear zero: the best site is re-chosen in every resample, so one
small site (14 melanomas in vienna_dias) widens it until it never clears, and the CPU-scale
default, pooled 0.773 against 0.558 / 0.538 / 0.586 within its judged sites, went unflagged
that way. `shortcut` is None when no source is judged or the bootstrap is off
(evaluate.bootstrap 0).

Sources are those split writes into test.csv (labels.sources): the metadata's `source` column,
else the lesion id's prefix (ISIC 2019: BCN, HAM, MSK4). HAM10000's sites are its metadata's
`dataset` column; one line makes it the project's metadata with a `source`, which preprocess
keeps and split passes on (tests/test_site_shortcut.py runs it):

    python -c "import pandas as pd; pd.read_csv('../shared/data/ham10000-200x150/ham10000_metadata.csv').rename(columns={'dataset': 'source'}).to_csv('data/ham_sites.csv', index=False)"

then `--metadata data/ham_sites.csv` to preprocess (or split). 9 HAM10000 lesions have images in
two collections: a grouped split keeps each lesion in one split, and its images count in
their own collections' within-source figures.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from components.common.labels import CLASS_INDEX
from components.evaluation.metrics import _num, bootstrap

MEL, NV = CLASS_INDEX["MEL"], CLASS_INDEX["NV"]
TASKS = {"mel_vs_nv": "MEL vs NV", "mel_vs_rest": "MEL vs rest"}
NEGATIVE_NAME = {"mel_vs_nv": "NV", "mel_vs_rest": "non-MEL"}
MIN_PER_CLASS = 10  # images of each class a source needs to be judged (module docstring)


def task_rows(task: str, y_true: np.ndarray) -> np.ndarray:
    """Which images a task scores (a boolean mask)."""
    return np.isin(y_true, (MEL, NV)) if task == "mel_vs_nv" else np.ones(len(y_true), bool)


def auc(task: str, y_true: np.ndarray, score: np.ndarray) -> float:
    """The task's ROC-AUC of `score`; NaN when a class is absent."""
    rows = task_rows(task, y_true)
    positive = y_true[rows] == MEL
    if not 0 < positive.sum() < len(positive):
        return float("nan")
    return float(roc_auc_score(positive, score[rows]))


def _aucs(y_true, score, source, names, judged: dict) -> dict[str, float]:
    """Pooled, within-source and gap AUCs of every task, flat ("task/pooled", "task/<source>",
    "task/gap": pooled minus the best of the `judged[task]` sources): the one statistic the
    bootstrap redraws."""
    out = {}
    for task in TASKS:
        out[f"{task}/pooled"] = pooled = auc(task, y_true, score)
        within = {s: auc(task, y_true[source == s], score[source == s]) for s in names}
        out.update({f"{task}/{s}": a for s, a in within.items()})
        candidates = [within[s] for s in judged[task]]
        best = np.nanmax(candidates) if np.isfinite(candidates).any() else np.nan
        out[f"{task}/gap"] = pooled - best
    return out


def _counts(task: str, y_true: np.ndarray) -> tuple[int, int]:
    scored = y_true[task_rows(task, y_true)]
    return int((scored == MEL).sum()), int((scored != MEL).sum())


def report(y_true, probs, source, groups=None, n: int = 1000, seed: int = 0) -> dict:
    """metrics.json's `cross_site`: per task the pooled and within-source AUCs with 95%
    intervals (lesion-level when `groups` is given), image counts, the best source, the gap
    with its interval and the shortcut flag (module docstring), and `summary`: the Markdown
    lines the MLflow run description and the model card show."""
    y_true = np.asarray(y_true)
    score = np.asarray(probs, dtype=np.float64)[:, MEL]
    source = np.asarray(source, dtype=str)
    names = sorted(set(source))
    judged = {task: [s for s in names if min(_counts(task, y_true[source == s])) >= MIN_PER_CLASS]
              for task in TASKS}
    point = _aucs(y_true, score, source, names, judged)
    ci = bootstrap(lambda r: _aucs(y_true[r], score[r], source[r], names, judged), len(y_true),
                   groups, n=n, seed=seed)
    no_interval = {"low": None, "high": None}
    tasks = {}
    for task in TASKS:
        def figure(where: str, rows: np.ndarray) -> dict:
            n_pos, n_neg = _counts(task, y_true[rows])
            entry = {"auc": _num(point[f"{task}/{where}"]), "n_positive": n_pos,
                     "n_negative": n_neg}
            if entry["auc"] is None:
                entry["no_auc"] = f"no {'MEL' if n_pos == 0 else NEGATIVE_NAME[task]} images"
            else:
                entry["ci95"] = ci.get(f"{task}/{where}", no_interval)
            return entry

        within = {s: {**figure(s, source == s), "judged": s in judged[task]} for s in names}
        scored = {s: w["auc"] for s, w in within.items() if w["auc"] is not None and w["judged"]}
        gap = {"value": _num(point[f"{task}/gap"]), "ci95": ci.get(f"{task}/gap", no_interval)}
        pooled = figure("pooled", np.ones(len(y_true), bool))
        low = (pooled.get("ci95") or no_interval)["low"]
        best = max(scored, key=scored.get) if scored else None
        tasks[task] = {"pooled": pooled, "within": within, "best_source": best, "gap": gap,
                       "shortcut": None if low is None or best is None else low > scored[best]}
    return {"score": "prob_MEL", "tasks": tasks, "summary": summary(tasks)}


def summary(tasks: dict) -> list[str]:
    """One Markdown line per task: pooled and within-source AUCs, the gap, the flag."""
    lines = []
    for task, t in tasks.items():
        parts = [f"pooled {_figure(t['pooled'])}"]
        parts += [f"{s} {_figure(w)}" + ("" if w["judged"] else " (too few to judge)")
                  for s, w in t["within"].items()]
        line = f"- {TASKS[task]} ROC-AUC: " + "; ".join(parts)
        if t["gap"]["value"] is not None:
            line += f"; pooled - best site ({t['best_source']}) {t['gap']['value']:+.3f}" \
                    + _interval(t["gap"]["ci95"])
        line += {True: ": **site shortcut** (pooled above every judged site's own, beyond its "
                       "interval)",
                 False: ": no site shortcut shown", None: ""}[t["shortcut"]]
        lines.append(line)
    return lines


def _figure(f: dict) -> str:
    if f["auc"] is None:
        return f"no AUC ({f['no_auc']})"
    return f"{f['auc']:.3f}{_interval(f['ci95'])} ({f['n_positive']}/{f['n_negative']})"


def _interval(ci: dict) -> str:
    return "" if ci["low"] is None else f" [{ci['low']:.3f}, {ci['high']:.3f}]"
