"""What the conformance suite must keep when the fixture server sits behind a bridged transport (stdio, legacy SSE)."""

from __future__ import annotations

from helpers import ROOT
from helpers.conformance import SuiteRun

FIXTURE = ROOT / "tests" / "conformance" / "fixture_server.py"
FIXTURE_OVER_SSE = ROOT / "tests" / "helpers" / "servers" / "fixture_over_sse.py"

EXTENSION_PREFIX = "tasks-"
"""The tasks extension: the SDK fixture does not implement it, so these fail against the server directly too."""
HTTP_ONLY = frozenset({
    "server-sse-polling/server-sse-disconnect-resume",
    "server-sse-multiple-streams/server-sse-streams-functional",
})
"""Checks only the fixture's own HTTP transport can pass. The bridges send the priming event and `retry:` field
and resume streams after Last-Event-ID (tests/integration/test_stdio_resume.py), but:

- disconnect-resume needs the server to close its stream mid-call (`test_reconnection` calls
  `ctx.close_sse_stream()`, SEP-1699 polling): over stdio or legacy SSE that call reaches no HTTP stream, and
  nothing on the wire tells the bridge to close its own, so the answer comes on the open POST stream (the suite
  then reports INFO, no verdict);
- streams-functional reads three concurrent tools/list POSTs as SSE streams: a bridge answers JSON when the
  answer is the first thing to arrive (no SSE cost for quick calls), so again INFO, no verdict."""
BOTH_ERAS = ("server-initialize", "tools-call-sampling", "tools-call-elicitation", "tools-call-with-progress",
             "resources-subscribe", "server-stateless", "input-required-result-multi-round", "caching")
"""Scenarios of both protocol eras that must have run and passed."""


def lost(run: SuiteRun) -> dict[str, str]:
    """Checks that did not pass and are not excused above, with the suite's reason."""
    return {key: f"{status}: {run.messages.get(key, '')}" for key, status in sorted(run.checks.items())
            if status != "SUCCESS" and not key.startswith(EXTENSION_PREFIX) and key not in HTTP_ONLY}


def eras_missing(run: SuiteRun) -> list[str]:
    scenarios = run.scenarios()
    return [name for name in BOTH_ERAS if scenarios.get(name, {}).get("SUCCESS", 0) == 0]
