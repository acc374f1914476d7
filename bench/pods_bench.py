"""The real-node tier's figures: image build and size, node start, `helm install` to the first gateway call, and
each fault's recovery, measured by running tests/pods (which asserts the behaviour) and collecting its timings.

    bench/.venv/bin/python bench/pods_bench.py        (root; `make cluster-bins` first; bench/run.sh --pods)

Writes bench/results/pods.json and bench/results/pods.png.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

FAULTS = {  # figure -> label, in the order the tier meets them
    "helm_install_seconds": "helm install --wait",
    "examples_ready_and_healthy_seconds": "examples Ready+Healthy",
    "helm_install_to_first_gateway_call_seconds": "install -> first gateway call",
    "injected_pod_ready_seconds": "labelled pod injected, Ready",
    "policy_edit_to_sidecar_seconds": "policy edit -> running sidecar",
    "server_container_kill_to_tools_back_seconds": "server container killed -> tools back",
    "sidecar_kill_to_tools_back_seconds": "sidecar killed -> tools back",
    "silent_sidecar_to_tools_gone_seconds": "silent sidecar -> tools gone",
    "sidecar_back_to_tools_back_seconds": "sidecar back -> tools back",
    "registry_pod_replaced_seconds": "registry pod deleted -> replaced",
    "operator_roll_seconds": "operator rolled",
    "helm_upgrade_seconds": "helm upgrade --wait",
}


def build_seconds() -> dict[str, int]:
    """Cold build seconds of the node binaries, as tests/pods/build.sh recorded them."""
    cache = Path(os.environ.get("TOOLMESH_CACHE") or Path.home() / ".cache" / "toolmesh")
    found: dict[str, int] = {}
    for times in sorted(cache.glob("pods-*/build-seconds.txt")):
        for line in times.read_text().splitlines():
            name, seconds = line.split()
            found[name] = int(seconds)
    return found


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        timings_file = Path(tmp) / "timings.json"
        env = dict(os.environ, TOOLMESH_PODS_TIMINGS=str(timings_file))
        started = time.monotonic()
        run = subprocess.run([str(ROOT / ".venv" / "bin" / "pytest"), "tests/pods", "-q", "-p", "no:cacheprovider"],
                             cwd=ROOT, env=env)
        tier_seconds = time.monotonic() - started
        if run.returncode != 0 or not timings_file.exists():
            print("the real-node tier failed: no figures written", file=sys.stderr)
            return 1
        timings = json.loads(timings_file.read_text())
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": [f"{x:.2f}" for x in os.getloadavg()]},
        "tier_seconds": round(tier_seconds, 1),
        "node_binaries_cold_build_seconds": build_seconds(),
        **timings,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pods.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, RESULTS / "pods.png")
    print(json.dumps(doc, indent=2))
    return 0


def plot(doc: dict, target: Path) -> None:
    names = [n for n in FAULTS if n in doc]
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.barh([FAULTS[n] for n in names], [doc[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(doc[n], i, f" {doc[n]:.1f}s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.grid(axis="x", alpha=0.3)
    image = doc.get("images", {})
    ax.set_title(f"toolmesh on a real node — {doc['date']}, {doc['machine']['cpus']} CPUs; tier {doc['tier_seconds']:.0f}s; "
                 f"image {image.get('toolmesh_bytes', 0) / 1e6:.0f} MB built in {image.get('toolmesh_build_seconds', '?')}s",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    print(f"==> wrote {target}")


if __name__ == "__main__":
    sys.exit(main())
