"""State shared by every replica of one server: the rate-limit buckets first.

    base.py         the `SharedStore` contract the stages call, and how a stage decides when the store fails
    local.py        in-process (one replica, `toolmesh up`): the embedded default
    redis_store.py  a Redis-protocol server (Redis 7, Valkey): one atomic script per call, one round trip

A store is chosen once per process (`--state-redis-url`); stages never know which one they talk to.
"""
