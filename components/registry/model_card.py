"""What a registered version says about itself: a handful of lineage tags, and a model card.

Tags (strings; what promote and a person filtering versions need, nothing more):

    source_run_id, git_commit, data_hash, split_hash, weights_hash, params_hash
    test_<gate metric> and its 95% interval (test_<gate metric>_ci_low / _ci_high)
    threshold_<decision> (each served flag's threshold, chosen on validation), temperature
    data_source, data_rev (Kubeflow runs: where the raw data came from)

Everything else (all headline metrics with intervals, the preset, input size, split sizes,
intended use and limits) is in the model card, the version's description, and in
`model_card.json` logged into the training run beside the model.
"""
from __future__ import annotations

import hashlib
import json
import re

from components.common import tracking

# metrics.json keys shown in the card (with their ci95 intervals)
CARD_METRICS = ("balanced_accuracy", "accuracy", "f1_macro", "precision_macro", "recall_macro",
                "roc_auc_macro", "top2_accuracy", "ece")
SECRETISH = re.compile(r"pass(word)?|secret|token|credential|access[_-]?key|api[_-]?key", re.I)
PROVENANCE_TAGS = ("data_source", "data_rev")


def params_hash(params: dict[str, str]) -> str:
    """sha256 (first 16 hex) of the run's training params (`train.*`), sorted: equal hashes,
    equal recipes."""
    train = {k: v for k, v in params.items() if k.startswith("train.")} or params
    return hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()[:16]


def clean_tags(tags: dict) -> dict[str, str]:
    """Tags as strings, without anything that looks like a secret: keys naming one are dropped,
    URLs lose their user:password."""
    out = {}
    for key, value in tags.items():
        if value is None or SECRETISH.search(str(key)):
            continue
        text = str(value)
        if "://" in text:
            text = tracking.redact(text)
        out[str(key)] = text[:5000]
    return out


def version_tags(run_id: str | None, run_tags: dict, run_params: dict, metrics: dict,
                 split_report: dict, weights_digest: str, gate_metric: str,
                 extra: dict | None = None) -> dict[str, str]:
    """The tags a registered version carries (all strings; see the module docstring)."""
    extra = extra or {}
    tags = {
        "source_run_id": run_id or "",
        "git_commit": run_tags.get("git_commit") or run_tags.get("mlflow.source.git.commit")
        or tracking.git_commit(),
        # the pipeline's raw-data provenance (a DVC directory hash) wins over the run's own
        "data_hash": extra.get("data_hash") or run_tags.get("data_hash") or "",
        "split_hash": split_report.get("split_hash", ""),
        "weights_hash": weights_digest,
        "params_hash": run_tags.get("params_hash") or (params_hash(run_params) if run_params
                                                       else ""),
        **{k: extra[k] for k in PROVENANCE_TAGS if extra.get(k)},
    }
    if metrics.get(gate_metric) is not None:
        tags[f"test_{gate_metric}"] = f"{float(metrics[gate_metric]):.6f}"
        ci = (metrics.get("ci95") or {}).get(gate_metric) or {}
        tags.update({f"test_{gate_metric}_ci_{end}": f"{float(ci[end]):.6f}"
                     for end in ("low", "high") if ci.get(end) is not None})
    # repr: the exact float the served model compares with, not a rounded one
    tags.update({f"threshold_{name}": repr(float(d["threshold"]))
                 for name, d in (metrics.get("decisions") or {}).items()})
    if cal := metrics.get("calibration"):
        tags["temperature"] = repr(float(cal["temperature"]))
    return clean_tags(tags)


def card_details(model_name: str, version: str | None, tags: dict, metrics: dict,
                 split_report: dict, preprocessing: dict, run_params: dict,
                 n_params: int | None) -> dict:
    """Everything the card shows, as JSON (logged as model_card.json beside the model)."""
    return {
        "model_name": model_name, "version": version, "tags": tags,
        "n_params": n_params, "preprocessing": preprocessing,
        "training": {k.removeprefix("train."): v for k, v in run_params.items()
                     if k.startswith("train.")},
        "split": {k: split_report.get(k) for k in ("mode", "seed", "sizes", "split_hash",
                                                    "test_lesion_leakage")},
        "test_metrics": {k: metrics.get(k) for k in ("n_images", *CARD_METRICS)},
        "test_ci95": {k: (metrics.get("ci95") or {}).get(k) for k in CARD_METRICS},
        "melanoma_operating_point": metrics.get("melanoma_operating_point"),
        "decisions": metrics.get("decisions"), "calibration": metrics.get("calibration"),
        "ood": metrics.get("ood"), "decisions_reason": metrics.get("decisions_reason"),
        "bootstrap": metrics.get("bootstrap"),
        "cross_site": metrics.get("cross_site"),
    }


def model_card(model_name: str, run_id: str | None, run_name: str, tags: dict, metrics: dict,
               split_report: dict, preprocessing: dict, n_params: int | None) -> str:
    """The version description: a short model card in Markdown."""
    cfg = preprocessing.get("model_config", {})
    mode = split_report.get("mode", "unknown")
    sizes = split_report.get("sizes") or {}
    mode_text = {
        "grouped": "lesion-grouped (no lesion in two splits)",
        "paper": "image-level stratified, as in the paper (images of one lesion can be in train "
                 f"and test: {100 * float(split_report.get('test_lesion_leakage') or 0):.0f}% of "
                 "test images here), so the scores overstate performance on new lesions",
    }.get(mode, mode)
    boot = metrics.get("bootstrap") or {}
    lines = [
        f"# {model_name}: hybrid ConvNeXtV2 + separable self-attention (EMA weights)",
        "",
        f"Ozdemir & Pacal, Sci Rep 2025, 15:4938. Preset `{cfg.get('preset', '?')}`"
        + (f", {n_params / 1e6:.2f}M parameters" if n_params else "")
        + f", input {preprocessing.get('img_size')} px, classes {', '.join(preprocessing.get('classes', []))}.",
        f"Training run `{run_name}` ({run_id or 'not tracked'}), git {tags.get('git_commit', '?')[:12]}, "
        f"params hash {tags.get('params_hash') or '?'}.",
        "",
        "## Data",
        f"- data hash: `{tags.get('data_hash') or '?'}`",
        f"- split: {mode_text}; split hash `{split_report.get('split_hash', '?')[:16]}`"
        + (f"; sizes train {sizes.get('train')}, val {sizes.get('val')}, test {sizes.get('test')}" if sizes else ""),
        "",
        f"## Test metrics ({metrics.get('n_images', '?')} images; 95% bootstrap intervals"
        + (f" over {boot.get('unit')}s, {boot.get('resamples')} resamples" if boot else "") + ")",
        "",
        "| metric | value | 95% interval |",
        "|---|---|---|",
    ]
    for name in CARD_METRICS:
        if metrics.get(name) is None:
            continue
        ci = (metrics.get("ci95") or {}).get(name) or {}
        interval = f"{ci['low']:.4f} - {ci['high']:.4f}" if ci.get("low") is not None and ci.get("high") is not None else "-"
        lines.append(f"| {name} | {float(metrics[name]):.4f} | {interval} |")
    lines += decision_lines(metrics)
    if cross_site := metrics.get("cross_site"):
        # evaluate wrote these lines (evaluation/sites.py); a flagged site shortcut means the
        # pooled figures above overstate what the model tells apart inside one clinic
        lines += ["", "## Cross-site (melanoma ROC-AUC pooled and within each test source; "
                      "(melanoma/other images))", "", *cross_site["summary"]]
    lines += [
        "",
        "## Input",
        f"RGB image; short side resized to {preprocessing.get('prepare_size')} (as the preprocess step did"
        + ("" if preprocessing.get("color_constancy", "none") == "none" else
           f", then {preprocessing['color_constancy']} colour constancy") + "), "
        f"then to {preprocessing.get('resize_size')} and centre-cropped to {preprocessing.get('img_size')}, "
        f"normalised with mean {preprocessing.get('mean')} and std {preprocessing.get('std')}. "
        "pyfunc input: DataFrame column `image` of bytes or base64 (file paths only where "
        "`skinlesion predict` allows them, locally); output: one (calibrated) probability column "
        "per class, `predicted`, `melanoma_suspected`, `malignant_suspected`, `ood_score`, "
        "`in_distribution`, `reason`, `model_version`, `error`.",
        "",
        "## Intended use",
        "Research and teaching: comparing training recipes and MLOps practice on dermoscopy "
        "images of the eight ISIC 2019 classes.",
        "",
        "## Limits",
        "- A research model, **not a medical device**: not validated clinically, not for diagnosis, "
        "triage or any decision about a patient.",
        "- Trained on ISIC-style dermoscopy images (mostly lighter skin types, referral-centre "
        "cases); other devices, clinical photographs and populations are untested.",
        "- Always answers one of the eight classes: an image of anything else (or not a lesion) "
        "still gets one, with `in_distribution` false when its OOD score says so (no decision "
        "flags then); probabilities can be miscalibrated"
        + (f" (ECE {float(metrics['ece']):.3f} on test)." if metrics.get("ece") is not None else "."),
    ]
    return "\n".join(lines) + "\n"


def decision_lines(metrics: dict) -> list[str]:
    """The served flags' thresholds (chosen on validation) and their test rates, the
    calibration and the OOD check, as card lines."""
    if not metrics.get("decisions"):
        return ["", f"## Decisions\n{metrics.get('decisions_reason') or 'none fitted'}."]
    lines = ["", "## Decisions (threshold chosen on validation, applied unchanged on test)", "",
             "| flag | target on validation | threshold | test sensitivity | test specificity |",
             "|---|---|---|---|---|"]
    for name, d in metrics["decisions"].items():
        rates = []
        for rate in ("sensitivity", "specificity"):
            ci = (d.get("ci95") or {}).get(rate) or {}
            rates.append("-" if d.get(rate) is None else f"{d[rate]:.3f}" + (
                f" ({ci['low']:.3f} - {ci['high']:.3f})" if ci.get("low") is not None
                and ci.get("high") is not None else ""))
        lines.append(f"| {name} | {d['target']} >= {d['value']} | {d['threshold']!r} | "
                     f"{rates[0]} | {rates[1]} |")
    if cal := metrics.get("calibration"):
        lines.append(f"\nTemperature {cal['temperature']:.3f} (fitted on validation): test ECE "
                     f"{cal['before']['ece']:.3f} -> {cal['after']['ece']:.3f}, NLL "
                     f"{cal['before']['nll']:.3f} -> {cal['after']['nll']:.3f}.")
    if ood := metrics.get("ood"):
        lines.append(f"OOD (energy score): AUROC {ood['auroc']:.3f} of the test split against "
                     f"{ood['n_out']} non-dermoscopy images; {100 * ood['in_passed']:.0f}% of "
                     f"test images and {100 * ood['out_passed']:.0f}% of those pass.")
    return lines
