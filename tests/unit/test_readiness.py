"""Readiness changes only after consecutive failed probes, and turns ready again at the first success."""

from __future__ import annotations

from toolmesh.sidecar.front.app import FAILURES_BEFORE_NOT_READY, Readiness
from toolmesh.sidecar.telemetry import Telemetry


class ScriptedUpstream:
    def __init__(self, answers: list[bool]):
        self.answers = list(answers)

    async def probe(self) -> bool:
        return self.answers.pop(0)


async def test_one_or_two_lost_probes_do_not_change_readiness():
    assert FAILURES_BEFORE_NOT_READY == 3
    upstream = ScriptedUpstream([True, False, False, True, False, False, False, True])
    readiness = Readiness(upstream, Telemetry("srv", environ={}), interval=5, window=15)
    seen = []
    for _ in range(8):
        await readiness.probe_once()
        seen.append(readiness.ready)
    assert seen == [True, True, True, True, True, True, False, True]
    assert readiness.last_error == ""
