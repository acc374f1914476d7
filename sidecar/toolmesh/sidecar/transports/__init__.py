"""The upstream side of the sidecar: how it reaches the MCP server it fronts.

    base.py        the `Upstream` contract the chain calls, and the answers every bridge gives
    http.py        a Streamable HTTP server, over pooled keep-alive connections
    bridge.py      the Streamable HTTP server a message-channel upstream needs, written once
                   (era dispatch, initialize, session lookup, GET and resume, DELETE, the session cap and sweep)
    stdio.py       a stdio server: process supervision (spawn or attach, initialize, restart) under the bridge
    legacy_sse.py  a 2024-11-05 HTTP+SSE server: its connections under the bridge
    channel.py     the multiplexer: many sessions over one ordered message channel, ids never colliding
    sessions.py    a client session as a bridge keeps it
    stateless.py   serving stateless-era (2026-07-28) requests on a channel
    resumable.py   a session's event log, for clients resuming a stream with Last-Event-ID
"""
