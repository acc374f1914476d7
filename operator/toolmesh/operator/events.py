"""Kubernetes Events on toolmesh's objects for what a person must act on, each posted once rather than per reconcile."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from toolmesh.api.kube import KubeClient, KubeError

log = logging.getLogger("toolmesh.operator")

COMPONENT = "toolmesh-operator"
MESSAGE_LIMIT = 1024
"""Longer messages are cut: events.k8s.io refuses notes over 1 kB, and a person reads the first line anyway."""


def object_ref(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The `involvedObject` naming `obj` (a full body, or a mapping that already is a reference)."""
    meta = obj.get("metadata") or obj
    ref = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta.get("name"),
           "namespace": meta.get("namespace"), "uid": meta.get("uid")}
    return {k: v for k, v in ref.items() if v}


def event_name(ref: Mapping[str, Any], reason: str, message: str) -> str:
    """One name per (object, reason, message): posting the same event twice meets AlreadyExists, not a copy."""
    key = "\0".join(str(ref.get(k, "")) for k in ("kind", "namespace", "name", "uid")) + f"\0{reason}\0{message}"
    return f"{ref.get('name', 'object')[:200]}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_event(ref: Mapping[str, Any], reason: str, message: str, type_: str, when: str) -> dict[str, Any]:
    message = message if len(message) <= MESSAGE_LIMIT else message[:MESSAGE_LIMIT - 1] + "…"
    return {
        "apiVersion": "v1", "kind": "Event",
        # A cluster-scoped object's events live in `default`, as kubectl looks for them there.
        "metadata": {"name": event_name(ref, reason, message), "namespace": ref.get("namespace") or "default"},
        "involvedObject": dict(ref), "reason": reason, "message": message, "type": type_,
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
        "reportingInstance": os.environ.get("POD_NAME") or socket.gethostname(),
        "firstTimestamp": when, "lastTimestamp": when, "count": 1,
    }


def post_event(api: KubeClient, obj_ref: Mapping[str, Any], reason: str, message: str,
               type_: str = "Warning") -> bool:
    """Post a core/v1 Event about `obj_ref` (an object body or an involvedObject reference); never raises.

    True when a new Event was created; False when the same one (object, reason, message) already exists — the
    apiserver keeps Events for its --event-ttl (1 h by default), so a lasting problem is said about once an
    hour — or when the API refused (logged; an Event is never worth failing a reconcile for).
    """
    ref = object_ref(obj_ref)
    event = render_event(ref, reason, message, type_, _now())
    path = f"/api/v1/namespaces/{event['metadata']['namespace']}/events"
    try:
        api.request("POST", path, body=event)
    except KubeError as exc:
        if exc.status != 409:
            log.warning("could not post Event %s on %s %s: %s", reason, ref.get("kind"), ref.get("name"), exc)
        return False
    except Exception as exc:  # noqa: BLE001 - an unreachable API is the reconcile's problem to report, not ours
        log.warning("could not post Event %s on %s %s: %s", reason, ref.get("kind"), ref.get("name"), exc)
        return False
    return True


class EventRecorder:
    """Posts Events, remembering the last ones so a reconcile that finds the same problem makes no API call."""

    def __init__(self, api: KubeClient, *, capacity: int = 4096, quiet_seconds: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.api = api
        self.clock = clock
        self.capacity = capacity
        """How many (object, reason, message) are remembered; the least recently seen is forgotten first."""
        self.quiet_seconds = quiet_seconds
        """For this long after posting, the same event is not even tried again (the API would refuse a copy)."""
        self._seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def post(self, obj_ref: Mapping[str, Any], reason: str, message: str, type_: str = "Warning") -> bool:
        """Like `post_event`, skipped without an API call when this event was posted less than `quiet_seconds` ago."""
        now = self.clock()
        ref = object_ref(obj_ref)
        key = (str(ref.get("uid") or (ref.get("namespace"), ref.get("name"))), reason, message)
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last < self.quiet_seconds:
                self._seen.move_to_end(key)
                return False
            self._seen[key] = now
            self._seen.move_to_end(key)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
        return post_event(self.api, ref, reason, message, type_)
