"""Metrics of an evaluation run and the files that carry them: JSON, Markdown, the Table-1 row.

Accuracy and ASR are over the images the server answered; errors are counted apart
(``correct + wrong + errors = images`` and ``hit + miss + errors = images`` hold in
every row, and the report checks it). Intervals are 95% Wilson score intervals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bdserve.scoring import asr_baseline as scoring_asr_baseline
from bdserve.scoring import attack_hits, clean_correct
from bdserve.serve.evaluation.runner import RunResult, SetResult
from bdserve.serve.evaluation.stats import percentiles, rate


def _errors(s: SetResult) -> dict:
    return dict(s.errors.most_common())


def clean_metrics(s: SetResult, num_classes: int) -> dict:
    ok = s.answered
    correct, n = clean_correct(s.preds, s.labels, ok)
    wrong = n - correct
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (s.labels[ok], s.preds[ok]), 1)
    return {"images": len(s.labels), "correct": correct, "wrong": wrong, "errors": s.n_errors,
            "accuracy": rate(correct, correct + wrong), "error_reasons": _errors(s), "confusion": cm.tolist()}


def triggered_metrics(s: SetResult, target: int) -> dict:
    hit, n = attack_hits(s.preds, target, s.answered)
    miss = n - hit
    return {"images": len(s.labels), "hit": hit, "miss": miss, "errors": s.n_errors,
            "asr": rate(hit, hit + miss), "error_reasons": _errors(s)}


def asr_baseline(clean: SetResult, target: int) -> dict:
    """How often clean non-target images already land on the target: the rate an ASR is read against."""
    return rate(*scoring_asr_baseline(clean.preds, clean.labels, target, clean.answered))


def detection_metrics(clean: SetResult | None, trig: SetResult | None) -> dict | None:
    """Suspected-trigger flag: detection rate on triggered images, false alarms on clean ones."""
    if (clean is None or clean.suspected is None) and (trig is None or trig.suspected is None):
        return None
    out = {}
    for key, s in (("detection_rate", trig), ("false_alarm_rate", clean)):
        if s is not None and s.suspected is not None:
            ok = s.answered
            out[key] = rate(int(s.suspected[ok].sum()), int(ok.sum()))
    return out


def defense_row(run: RunResult, num_classes: int, target: int | None) -> dict:
    clean, trig = run.sets.get("clean"), run.sets.get("triggered")
    all_sets = list(run.sets.values())
    lat = [t for s in all_sets for t in s.latencies_s]
    applied = sorted({d for s in all_sets for d in s.applied})
    row = {
        "defense": run.defense if run.defense is not None else (applied[0] if len(applied) == 1 else "server default"),
        "asked": run.defense,
        "applied": applied,
        "images": run.images,
        "errors": sum(s.n_errors for s in all_sets),
        "requests": sum(s.requests for s in all_sets),
        "retries": sum(s.retries for s in all_sets),
        "seconds": run.seconds,
        "throughput_images_per_s": run.images / run.seconds if run.seconds > 0 else None,
        "latency_ms": percentiles(lat),
    }
    if clean is not None:
        row["clean"] = clean_metrics(clean, num_classes)
    if trig is not None and target is not None:
        row["triggered"] = triggered_metrics(trig, target)
        if clean is not None:
            row["triggered"]["baseline"] = asr_baseline(clean, target)
    det = detection_metrics(clean, trig)
    if det is not None:
        row["detection"] = det
    check_counts(row)
    return row


def check_counts(row: dict) -> None:
    """No image silently dropped: every image is correct/wrong (hit/miss) or an error."""
    c, t = row.get("clean"), row.get("triggered")
    if c is not None and c["correct"] + c["wrong"] + c["errors"] != c["images"]:
        raise AssertionError(f"clean counts do not add up: {c}")
    if t is not None and t["hit"] + t["miss"] + t["errors"] != t["images"]:
        raise AssertionError(f"triggered counts do not add up: {t}")


# ----------------------------------------------------------------------------- text


def pct(r: dict | None, ci: bool = True) -> str:
    if r is None or r.get("rate") is None:
        return "-"
    s = f"{100 * r['rate']:.1f}"
    if ci and r.get("ci95"):
        s += f" [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"
    return s


def table1_row(model: str, rows: list[dict]) -> str:
    """The paper's Table 1 for one model: clean accuracy and ASR (%) under each defense."""
    head = "| model | " + " | ".join(f"{r['defense']} clean | {r['defense']} ASR" for r in rows) + " |"
    rule = "|---|" + "---:|---:|" * len(rows)
    cells = []
    for r in rows:
        cells.append(pct((r.get("clean") or {}).get("accuracy"), ci=False))
        cells.append(pct((r.get("triggered") or {}).get("asr"), ci=False))
    return "\n".join([head, rule, f"| {model} | " + " | ".join(cells) + " |"])


def markdown(report: dict) -> str:
    rows = report["rows"]
    detect = any("detection" in r for r in rows)
    lines = [f"# Evaluation of `{report['model']}` through {report['endpoint']}", "",
             f"{report['transport']} transport; data {report['data']}; "
             f"{report['clean_images']} clean and {report['triggered_images']} triggered images per defense "
             f"(limit {report['limit']}, seed {report['seed']}); batch {report['batch_size']}, "
             f"{report['concurrency']} in flight. Accuracy and ASR are over answered images, errors apart; "
             "brackets are 95% Wilson intervals. ASR baseline: clean non-target images already predicted "
             "as the target, the rate an ASR is read against.", ""]
    if report.get("partial"):
        lines += [f"**Partial report: the run was {report['partial']}.** Images without an answer are counted "
                  "as errors; defenses after the stop are missing.", ""]
    head = ["defense", "clean acc %", "ASR %", "ASR baseline %", "images", "errors", "retries", "img/s", "p50/p95/p99 ms"]
    if detect:
        head += ["detected %", "false alarms %"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lat = r["latency_ms"]
        lat_s = "/".join("-" if lat[k] is None else f"{lat[k]:.0f}" for k in ("p50", "p95", "p99"))
        tp = r["throughput_images_per_s"]
        trig = r.get("triggered") or {}
        cells = [r["defense"], pct((r.get("clean") or {}).get("accuracy")), pct(trig.get("asr")),
                 pct(trig.get("baseline")), str(r["images"]), str(r["errors"]), str(r["retries"]), "-" if tp is None else f"{tp:.0f}", lat_s]
        if detect:
            d = r.get("detection") or {}
            cells += [pct(d.get("detection_rate")), pct(d.get("false_alarm_rate"))]
        lines.append("| " + " | ".join(cells) + " |")
    reasons = {}
    for r in rows:
        for part in ("clean", "triggered"):
            for msg, n in ((r.get(part) or {}).get("error_reasons") or {}).items():
                reasons[f"{r['defense']} / {part}: {msg}"] = n
    if reasons:
        lines += ["", "## Errors", ""] + [f"- {n} images: {msg}" for msg, n in reasons.items()]
    lines += ["", "## Table 1 row", "", report["table1_row"], ""]
    if report.get("detection"):
        from bdserve.serve.evaluation.detection import markdown_rows

        lines += ["## Trigger detection (eval --detect)", "",
                  "Scores as served (margins over the calibrated thresholds: flagged above 0). AUROC with a 95% "
                  "bootstrap interval; TPR at 1% and 5% false-alarm rate on these clean images; false-alarm and "
                  "detection rates at the calibrated threshold. ROC curves: roc.png.", ""]
        lines += markdown_rows(report["detection"]["rows"]) + [""]
    return "\n".join(lines)


def write(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown(report))
    return paths
