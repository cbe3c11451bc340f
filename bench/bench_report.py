"""The serving benchmark's report: the machine, the side-by-side table, the verdicts against the
targets, and the Markdown written beside the JSON."""

from __future__ import annotations

import os
import platform

from loadgen import LoadResult

TARGETS = {
    "bdserve_vs_torchserve_min_ratio": 3.0,
    "defense_max_cost": 0.02,
    "serving_max_overhead": 0.15,
}


def fmt_table(rows: list[LoadResult]) -> str:
    head = "| server | clients | ok | errors | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r.name} | {r.clients} | {r.ok} | {r.errors} | {r.throughput:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
        f"{'-' if r.mean_batch is None else f'{r.mean_batch:.1f}'} |\n"
        for r in rows
    )
    return head + body


def fmt_row(r: LoadResult) -> str:
    extra = f", errors e.g. {r.error_samples[0]}" if r.error_samples else ""
    return (f"  {r.name:32s} {r.throughput:8.0f} req/s  p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms  "
            f"ok {r.ok} errors {r.errors}{extra}")


def machine() -> dict:
    import onnxruntime
    import torch

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.is_available()}
    try:
        from ts.version import __version__ as tsv

        info["torchserve"] = tsv
    except ImportError:
        info["torchserve"] = None
    try:
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def render_markdown(result: dict, runs: list[LoadResult], inproc: dict) -> str:
    s, m, ld = result["summary"], result["machine"], result["load"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        "# Serving benchmark",
        "",
        f"{result['date']} · `{result['command'].strip()}`",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m['cpus']} CPUs (shared), CUDA: {m['cuda']}; torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, TorchServe {m['torchserve']}.",
        f"Model: {result['model']['name']}, architecture {result['model']['architecture']} ({result['model']['dir']}), "
        f"input {result['model']['input_shape']}, "
        f"{result['model']['classes']} classes, defense `{result['model']['defense']}`.",
        f"Load: {ld['clients']} closed-loop clients, {ld['payload']}, at most {ld['requests_per_run']} requests or "
        f"{ld['duration_cap_s']:.0f} s per run, loopback; bdserve max batch {ld['max_batch_size']}, queue delay "
        f"{ld['max_queue_delay_ms']} ms; TorchServe batchSize {ld['max_batch_size']}, maxBatchDelay "
        f"{int(ld['max_queue_delay_ms'])} ms, workers {ld['torchserve_workers']} (the best is compared). "
        f"OMP_NUM_THREADS: {ld['omp_num_threads'] or 'unset (torch uses every core)'}.",
        "",
        "## Served, side by side",
        "",
        fmt_table(runs),
        "## In-process (no serving), images/s",
        "",
        "| batch | ORT session.run | pipeline predict, defended | pipeline predict, no defense | defense cost | decode + predict, defended |",
        "|---|---|---|---|---|---|",
    ]
    for b, row in inproc.items():
        lines.append(f"| {b} | {row['ort_session_run']:.0f} | {row['pipeline_predict_defended']:.0f} | "
                     f"{row['pipeline_predict_undefended']:.0f} | {pct(row['defense_cost'])} | "
                     f"{row['pipeline_decode_predict_defended']:.0f} |")
    ratio = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    lines += [
        "",
        "## Against the targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| bdserve ≥ 3× TorchServe throughput ({s['torchserve_compared']}) | HTTP {ratio(s['bdserve_http_vs_torchserve'])}, gRPC "
        f"{ratio(s['bdserve_grpc_vs_torchserve'])} | {_yn(result['met']['bdserve >= 3x TorchServe'])} |",
        f"| defense costs ≤ 2% of throughput at batch ≥ 32 (pipeline) | "
        + ", ".join(f"batch {b}: {pct(c)}" for b, c in s["pipeline_defense_cost"].items())
        + f" | {_yn(result['met']['defense <= 2% at batch >= 32 (pipeline)'])} |",
        f"| defense costs ≤ 2% of throughput (served, HTTP) | {pct(s['served_defense_cost'])} | "
        f"{_yn(result['met']['defense <= 2% (served)'])} |",
        f"| serving overhead ≤ 15% vs in-process ONNX Runtime (batch {ld['max_batch_size']}) | "
        f"{pct(s['serving_overhead_vs_ort'])} | {_yn(result['met']['serving overhead <= 15% vs in-process ORT'])} |",
        f"| serving overhead ≤ 15% vs in-process pipeline incl. decode (batch {ld['max_batch_size']}) | "
        f"{pct(s['serving_overhead_vs_pipeline'])} | {_yn(result['met']['serving overhead <= 15% vs in-process pipeline'])} |",
        "",
    ]
    return "\n".join(lines)


def _yn(v) -> str:
    return "n/a" if v is None else ("yes" if v else "**no**")
