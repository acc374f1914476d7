"""Plot bench/results/sidecar.json: added latency, throughput, CPU per call and memory per proxy (runs in bench/.venv)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def main(source: Path, target: Path) -> None:
    doc = json.loads(source.read_text())
    results = {name: r for name, r in doc["targets"].items() if "c1" in r}
    names = list(results)
    x = range(len(names))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))

    ax = axes[0][0]
    width = 0.4
    ax.bar([i - width / 2 for i in x], [results[n]["c1"]["p50_ms"] for n in names], width, label="p50")
    ax.bar([i + width / 2 for i in x], [results[n]["c1"]["p99_ms"] for n in names], width, label="p99")
    ax.set_yscale("log")
    ax.set_title("tools/call latency at concurrency 1 (ms, log)")
    ax.legend()

    ax = axes[0][1]
    ax.bar([i - width / 2 for i in x], [results[n]["c16"]["rps"] for n in names], width, label="16 connections")
    ax.bar([i + width / 2 for i in x], [results[n]["c64"]["rps"] for n in names], width, label="64 connections")
    ax.set_yscale("log")
    ax.set_title("throughput (calls/s, log)")
    ax.legend()

    ax = axes[1][0]
    ax.bar(list(x), [results[n]["c16"]["cpu_ms_per_call"] or 0 for n in names], color="tab:green")
    ax.set_yscale("log")
    ax.set_title("CPU per call at 16 connections (ms, log; direct = upstream's own)")

    ax = axes[1][1]
    ax.bar([i - width / 2 for i in x], [results[n]["rss_idle_mb"] for n in names], width, label="idle")
    ax.bar([i + width / 2 for i in x], [results[n].get("rss_load_mb", 0) for n in names], width, label="under load")
    ax.set_title("resident memory (MB)")
    ax.legend()

    for row in axes:
        for ax in row:
            ax.set_xticks(list(x))
            ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    machine = doc.get("machine", {})
    fig.suptitle(f"toolmesh sidecar vs other MCP proxies — {doc.get('date', '')}, {machine.get('cpus')} CPUs, "
                 f"{doc.get('mode', '')} run, load average at start {' '.join(machine.get('loadavg_at_start', []))}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    print(f"==> wrote {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
