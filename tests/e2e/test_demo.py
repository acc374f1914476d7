"""`make demo`'s script end to end: toolmesh up on the quickstart, real calls through the gateway, a clean stop."""

from __future__ import annotations

import os
import re
import subprocess

from helpers import ROOT, free_port, port_open


def test_the_demo_shows_tool_results_through_the_gateway_and_stops_cleanly():
    port = free_port()
    env = dict(os.environ, TOOLMESH_DEMO_PORT=str(port))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"^everything\s+streamable-http\s+ready\s+13\s", out, re.M), out
    assert re.search(r"^time\s+stdio\s+ready\s+2\s", out, re.M), out
    assert '"timezone": "Europe/Paris"' in out and '"day_of_week"' in out
    assert out.count("The sum of 2 and 3 is 5.") == 2
    # The clock is never cached (a cached time would be up to a minute old); the pure sum is, and the
    # second call is a hit at the everything sidecar.
    assert "time: no cache lookups" in out, out
    assert re.search(r'toolmesh_cache_lookups_total\{tool="get-sum",result="miss"\} \d', out), out
    assert 'toolmesh_cache_lookups_total{tool="get-sum",result="hit"} 1' in out, out
    # The example workflow (examples/workflows/quickstart.json): three tasks side by side, then the one that waits.
    assert re.search(r"^workflow wf-\S+ succeeded$", out, re.M), out
    for task, server in [("paris", "time"), ("tokyo", "time"), ("sum", "everything"), ("report", "everything")]:
        assert f"- {task}: succeeded on {server}" in out
    assert "==> stopped" in out
    # Nothing keeps running: the gateway and every sidecar are gone.
    sidecars = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)/metrics\s*$", out, re.M)]
    assert len(sidecars) == 2
    for p in [port, *sidecars]:
        assert not port_open(p), f"port {p} still open after the demo"
