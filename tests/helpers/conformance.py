"""Run the official MCP conformance suite against a URL and read back every check's status.

Used by tests/conformance (direct vs through the sidecar) and by the benchmark
harness; also a command: `python tests/helpers/conformance.py URL [URL ...]`
prints a per-scenario table and, given two URLs, the checks the second loses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE_DIR = ROOT / "tests" / "conformance"
NODE = SUITE_DIR / "node_modules" / ".bin" / "node"
CONFORMANCE = SUITE_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
SUITE_VERSION = "0.2.0-alpha.11"

# Statuses that are verdicts; INFO entries are the suite's own trace of the exchange.
VERDICTS = ("SUCCESS", "FAILURE", "WARNING", "SKIPPED")
_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")


@dataclass
class SuiteRun:
    """One run of `conformance server` against one URL."""

    url: str
    checks: dict[str, str] = field(default_factory=dict)
    """`scenario/check-id` (with `#n` for the n-th repeat of an id within a scenario) -> status."""
    messages: dict[str, str] = field(default_factory=dict)
    """The suite's error message for every check that did not succeed."""
    returncode: int = 0
    output: str = ""

    def passed(self) -> set[str]:
        return {key for key, status in self.checks.items() if status == "SUCCESS"}

    def totals(self) -> dict[str, int]:
        counts = Counter(self.checks.values())
        return {status: counts.get(status, 0) for status in VERDICTS}

    def scenarios(self) -> dict[str, dict[str, int]]:
        """Per scenario: how many checks ended in each verdict."""
        table: dict[str, Counter] = {}
        for key, status in self.checks.items():
            table.setdefault(key.split("/", 1)[0], Counter())[status] += 1
        return {name: dict(counts) for name, counts in sorted(table.items())}


def suite_installed() -> bool:
    return NODE.exists() and CONFORMANCE.exists()


def read_checks(output_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Statuses and error messages from every `checks.json` the suite wrote under `output_dir`."""
    checks: dict[str, str] = {}
    messages: dict[str, str] = {}
    for checks_file in sorted(output_dir.glob("*/checks.json")):
        match = _RESULT_DIR.match(checks_file.parent.name)
        scenario = match["scenario"] if match else checks_file.parent.name
        seen: Counter = Counter()
        for check in json.loads(checks_file.read_text()):
            status = check.get("status")
            if status not in VERDICTS:
                continue
            seen[check["id"]] += 1
            key = f"{scenario}/{check['id']}" + (f"#{seen[check['id']]}" if seen[check["id"]] > 1 else "")
            checks[key] = status
            if status != "SUCCESS":
                messages[key] = str(check.get("errorMessage") or "")
    return checks, messages


def run_suite(url: str, *, suite: str = "all", scenario: str | None = None, timeout: float = 600,
              output_dir: Path | None = None) -> SuiteRun:
    """Run `conformance server --url URL` (the whole suite, or one scenario) and collect every check."""
    if not suite_installed():
        raise RuntimeError(f"conformance suite not installed in {SUITE_DIR} (run `make node-deps`)")
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        out = Path(output_dir or tmp)
        cmd = [str(NODE), str(CONFORMANCE), "server", "--url", url, "-o", str(out)]
        cmd += ["--scenario", scenario] if scenario else ["--suite", suite]
        # The suite's own telemetry and update checks would reach for the network.
        env = dict(os.environ, NO_UPDATE_NOTIFIER="1", DO_NOT_TRACK="1")
        proc = subprocess.run(cmd, cwd=SUITE_DIR, env=env, capture_output=True, text=True, timeout=timeout)
        checks, messages = read_checks(out)
    return SuiteRun(url=url, checks=checks, messages=messages, returncode=proc.returncode,
                    output=proc.stdout + proc.stderr)


def lost_checks(direct: SuiteRun, proxied: SuiteRun) -> dict[str, str]:
    """Checks that pass directly but not through the proxy -> what the proxied run said about them."""
    return {
        key: f"{proxied.checks.get(key, 'MISSING')}: {proxied.messages.get(key, '')}".strip()
        for key in sorted(direct.passed() - proxied.passed())
    }


def summary(direct: SuiteRun, proxied: SuiteRun | None = None) -> dict:
    """The JSON written to bench/results/conformance.json."""
    result = {
        "suite": f"@modelcontextprotocol/conformance@{SUITE_VERSION} --suite all",
        "direct": {"totals": direct.totals(), "scenarios": direct.scenarios(),
                   "failing": {k: direct.messages.get(k, "") for k, s in sorted(direct.checks.items())
                               if s == "FAILURE"}},
    }
    if proxied is not None:
        lost = lost_checks(direct, proxied)
        kept = len(direct.passed()) - len(lost)
        result["sidecar"] = {"totals": proxied.totals(), "scenarios": proxied.scenarios()}
        result["kept"] = {"passing_direct": len(direct.passed()), "passing_through_sidecar": kept,
                          "fraction": round(kept / max(1, len(direct.passed())), 4), "lost": lost}
    return result


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    runs = [run_suite(url) for url in argv]
    for run in runs:
        print(f"{run.url}: {run.totals()}")
        for name, counts in run.scenarios().items():
            print(f"  {name:48s} {counts}")
    if len(runs) == 2:
        lost = lost_checks(runs[0], runs[1])
        print(f"passing at {runs[0].url} but not at {runs[1].url}: {len(lost)}")
        for key, why in lost.items():
            print(f"  {key}: {why}")
        return 1 if lost else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
