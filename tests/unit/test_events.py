"""Events: one per (object, reason, message), never an exception, and a reconcile that finds the same problem makes
no API call."""

from __future__ import annotations

from toolmesh.api.kube import KubeError
from toolmesh.operator.events import EventRecorder, event_name, object_ref, post_event

SERVER = {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer",
          "metadata": {"name": "api", "namespace": "team", "uid": "u-1", "resourceVersion": "7"}}


class RecordingApi:
    """POSTs Events like the apiserver: a second one of the same name is 409 AlreadyExists."""

    def __init__(self, refuse: int | None = None):
        self.posted: list[dict] = []
        self.refuse = refuse

    def request(self, method, path, *, body=None, **_):
        if self.refuse:
            raise KubeError(self.refuse, "no")
        if any(e["metadata"]["name"] == body["metadata"]["name"] for e in self.posted):
            raise KubeError(409, "already exists")
        self.posted.append(body)
        return body


def test_an_event_names_the_object_and_is_posted_in_its_namespace():
    api = RecordingApi()
    assert post_event(api, SERVER, "NameConflict", "Service api already exists")
    [event] = api.posted
    assert event["involvedObject"] == {"apiVersion": "toolmesh.io/v1alpha1", "kind": "MCPServer", "name": "api",
                                       "namespace": "team", "uid": "u-1"}
    assert event["metadata"]["namespace"] == "team" and event["type"] == "Warning"
    assert event["reason"] == "NameConflict" and event["count"] == 1


def test_the_same_event_is_not_posted_twice_but_another_message_is():
    api = RecordingApi()
    assert post_event(api, SERVER, "InvalidPolicy", "a") and not post_event(api, SERVER, "InvalidPolicy", "a")
    assert post_event(api, SERVER, "InvalidPolicy", "b")
    assert len(api.posted) == 2
    assert event_name(object_ref(SERVER), "r", "a") != event_name(object_ref(SERVER), "r", "b")


def test_a_refused_event_never_raises():
    assert not post_event(RecordingApi(refuse=403), SERVER, "NameConflict", "x")


def test_the_recorder_makes_no_call_while_quiet_and_tries_again_after():
    now = [0.0]
    api = RecordingApi()
    calls = []
    original = api.request
    api.request = lambda *a, **k: (calls.append(a), original(*a, **k))[1]
    recorder = EventRecorder(api, quiet_seconds=600, clock=lambda: now[0])
    for _ in range(5):
        recorder.post(SERVER, "NameConflict", "x")
    assert len(calls) == 1, "reconciles finding the same problem cost no API call"
    now[0] = 601
    recorder.post(SERVER, "NameConflict", "x")
    assert len(calls) == 2 and len(api.posted) == 1, "after the quiet time the API is asked, and refuses a copy"


def test_the_recorder_forgets_the_oldest_beyond_its_capacity():
    api = RecordingApi()
    recorder = EventRecorder(api, capacity=2, clock=lambda: 0.0)
    for message in ("a", "b", "c"):
        recorder.post(SERVER, "R", message)
    assert len(recorder._seen) == 2
