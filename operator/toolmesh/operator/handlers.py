"""kopf handlers, each a few lines: read the object, call the reconciler or the webhook's pure decision."""

from __future__ import annotations

from typing import Any

import kopf

from toolmesh.api.server import GROUP, VERSION
from toolmesh.operator.inject import InjectionError
from toolmesh.operator.render import MANAGED_BY
from toolmesh.operator.validation import POLICY_HANDLER_ID, SERVER_HANDLER_ID, policy_refusal, server_refusal
from toolmesh.operator.webhook import HANDLER_ID, injection_for, mutate

SERVERS = (GROUP, VERSION, "mcpservers")
POLICIES = (GROUP, VERSION, "mcptoolpolicies")


@kopf.on.resume(*SERVERS, backoff=2)
@kopf.on.create(*SERVERS, backoff=2)
@kopf.on.update(*SERVERS, backoff=2)
def server_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.server_changed(dict(body))


@kopf.on.event(*SERVERS)
def server_event(type: str | None, name: str, namespace: str, memo: kopf.Memo, logger: kopf.Logger,
                 **_: Any) -> None:
    if type != "DELETED":
        return
    # Owner references make the garbage collector delete the children; here only bookkeeping follows.
    memo.reconciler.forget(namespace, name)
    try:
        memo.reconciler.refresh_policy_statuses(namespace)
    except Exception as exc:  # noqa: BLE001 - the next policy event converges
        logger.warning(f"refreshing policy statuses in {namespace} failed: {exc}")


@kopf.on.event(*POLICIES)
def policy_event(type: str | None, body: kopf.Body, namespace: str, memo: kopf.Memo, logger: kopf.Logger,
                 **_: Any) -> None:
    status = body.get("status") or {}
    if type == "MODIFIED" and status.get("observedGeneration") == body.metadata.get("generation"):
        return  # only our own status write
    try:
        memo.reconciler.reconcile_namespace(namespace)
    except Exception as exc:  # noqa: BLE001 - event handlers are not retried; the next event or resume converges
        logger.error(f"re-rendering namespace {namespace} after a policy change failed: {exc}")


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY)
def deployment_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    try:
        if type == "DELETED":
            memo.reconciler.child_deleted(dict(body))
        else:
            memo.reconciler.deployment_changed(dict(body))
    except Exception as exc:  # noqa: BLE001 - the next Deployment event retries
        logger.warning(f"following Deployment {body.metadata.name} failed: {exc}")


@kopf.on.event("v1", "services", labels=MANAGED_BY)
@kopf.on.event("v1", "configmaps", labels=MANAGED_BY)
@kopf.on.event("v1", "serviceaccounts", labels=MANAGED_BY)
def child_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    if type != "DELETED":
        return
    try:
        memo.reconciler.child_deleted(dict(body))
    except Exception as exc:  # noqa: BLE001 - a resume or the next change converges
        logger.warning(f"restoring {body.get('kind')} {body.metadata.name} failed: {exc}")


def enable_webhook() -> None:
    """Register the admission handlers; only an operator that serves the webhook may have them."""
    kopf.on.mutate("pods", id=HANDLER_ID, operations=["CREATE"])(inject_sidecar)
    kopf.on.validate(*POLICIES, id=POLICY_HANDLER_ID, operations=["CREATE", "UPDATE"])(validate_policy)
    kopf.on.validate(*SERVERS, id=SERVER_HANDLER_ID, operations=["CREATE", "UPDATE"])(validate_server)


async def validate_policy(body: kopf.Body, old: kopf.Body | None, **_: Any) -> None:
    # Async like the injection: a model check is quick and pure, and not worth a thread hop per edit.
    refusal = policy_refusal(dict(body), dict(old) if old is not None else None)
    if refusal:
        raise kopf.AdmissionError(refusal, code=422)


async def validate_server(body: kopf.Body, old: kopf.Body | None, **_: Any) -> None:
    refusal = server_refusal(dict(body), dict(old) if old is not None else None)
    if refusal:
        raise kopf.AdmissionError(refusal, code=422)


async def inject_sidecar(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    # Async on purpose: no blocking work here, and a thread hop per admission would add latency to every pod.
    # The apiserver fills the request's namespace into the object before admission.
    namespace = body.metadata.get("namespace")
    try:
        options = injection_for(dict(body), namespace, image=memo.config.sidecar_image,
                                registry_url=memo.config.registry_url, skipped=memo.skipped_namespaces)
    except InjectionError as exc:
        raise kopf.AdmissionError(str(exc), code=400) from None
    if options is not None:
        patch.fns.append(lambda pod: mutate(pod, options))
