"""kopf handlers, each a few lines: read the object, call the reconciler or the webhook's pure decision."""

from __future__ import annotations

from typing import Any

import kopf

from toolmesh.api.server import GROUP, VERSION
from toolmesh.operator.inject import InjectionError
from toolmesh.operator.kube import KubeError
from toolmesh.operator.reconcile import Known, KnownPolicy, KnownServer
from toolmesh.operator.render import MANAGED_BY
from toolmesh.operator.validation import POLICY_HANDLER_ID, SERVER_HANDLER_ID, policy_refusal, server_refusal
from toolmesh.operator.webhook import HANDLER_ID, injection_for, mutate

SERVERS = (GROUP, VERSION, "mcpservers")
POLICIES = (GROUP, VERSION, "mcptoolpolicies")


def served(namespace: str | None, memo: kopf.Memo, **_: Any) -> bool:
    """Whether the operator serves this namespace: never the system ones nor its own (it may watch cluster-wide)."""
    return namespace not in memo.skipped_namespaces


@kopf.index(*POLICIES, when=served)
async def known_policies(namespace: str, body: kopf.Body, **_: Any) -> dict[str, KnownPolicy]:
    # Async, as every handler here: kopf would run a plain function in a thread for each event.
    return {namespace: KnownPolicy.from_body(dict(body))}


@kopf.index(*SERVERS, when=served)
async def known_servers(namespace: str, name: str, labels: kopf.Labels, **_: Any) -> dict[str, KnownServer]:
    return {namespace: KnownServer(name=name, labels=dict(labels))}


def known(kwargs: dict[str, Any]) -> Known:
    """The operator's in-memory view, from the indexes kopf hands every handler."""
    return Known(policies=kwargs["known_policies"], servers=kwargs["known_servers"])


@kopf.on.resume(*SERVERS, backoff=2, when=served)
@kopf.on.create(*SERVERS, backoff=2, when=served)
@kopf.on.update(*SERVERS, backoff=2, when=served)
async def server_changed(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    try:
        blocked = await memo.reconciler.server_changed(dict(body), known(kwargs))
    except KubeError as exc:
        raise kopf.TemporaryError(f"the API refused a write, trying again: {exc}", delay=2) from exc
    if blocked is not None and blocked.reason == "InvalidSpec":
        # Said in the status and an Event; only an edit of the spec can help, and an edit calls this handler again.
        raise kopf.PermanentError(f"the spec cannot be rendered: {blocked.message}")


@kopf.on.event(*SERVERS, when=served)
async def server_event(type: str | None, name: str, namespace: str, memo: kopf.Memo, logger: kopf.Logger,
                       **kwargs: Any) -> None:
    if type != "DELETED":
        return
    # Owner references make the garbage collector delete the children; here only bookkeeping follows.
    memo.reconciler.forget(namespace, name)
    try:
        await memo.reconciler.refresh_policy_statuses(namespace, known(kwargs))
    except Exception as exc:  # noqa: BLE001 - kopf does not retry event handlers: the reconciler does, later
        logger.warning(f"refreshing policy statuses in {namespace} failed, trying later: {exc}")
        memo.reconciler.refresh_policy_statuses_later(namespace, known(kwargs))


@kopf.on.event(*POLICIES, when=served)
async def policy_event(type: str | None, body: kopf.Body, name: str, namespace: str, memo: kopf.Memo,
                       logger: kopf.Logger, **kwargs: Any) -> None:
    status = body.get("status") or {}
    if type == "MODIFIED" and status.get("observedGeneration") == body.metadata.get("generation"):
        return  # only our own status write
    if type == "DELETED":
        memo.reconciler.policy_deleted(namespace, name)
    try:
        await memo.reconciler.reconcile_namespace(namespace, known(kwargs))
    except Exception as exc:  # noqa: BLE001 - servers it could not reconcile are looked at again; statuses too
        logger.error(f"writing policy statuses in {namespace} after a policy change failed, trying later: {exc}")
        memo.reconciler.refresh_policy_statuses_later(namespace, known(kwargs))


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY, when=served)
async def deployment_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger,
                           **kwargs: Any) -> None:
    if type == "DELETED":
        await child_deleted(body, memo, logger, known(kwargs))
        return
    try:
        await memo.reconciler.deployment_changed(dict(body))
    except Exception as exc:  # noqa: BLE001 - an event handler: the reconciler retries
        logger.warning(f"following Deployment {body.metadata.name} failed, reconciling its server later: {exc}")
        look_again_at_owner(body, memo, known(kwargs))


@kopf.on.event("v1", "services", labels=MANAGED_BY, when=served)
@kopf.on.event("v1", "configmaps", labels=MANAGED_BY, when=served)
@kopf.on.event("v1", "serviceaccounts", labels=MANAGED_BY, when=served)
async def child_event(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger,
                      **kwargs: Any) -> None:
    if type == "DELETED":
        await child_deleted(body, memo, logger, known(kwargs))


async def child_deleted(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, view: Known) -> None:
    try:
        await memo.reconciler.child_deleted(dict(body), view)
    except Exception as exc:  # noqa: BLE001 - an event handler: the reconciler retries
        logger.warning(f"restoring {body.get('kind')} {body.metadata.name} failed, trying later: {exc}")
        look_again_at_owner(body, memo, view)


def look_again_at_owner(child: kopf.Body, memo: kopf.Memo, view: Known) -> None:
    owner = next((o for o in child.metadata.get("ownerReferences") or [] if o.get("kind") == "MCPServer"), None)
    if owner is not None:
        memo.reconciler.look_again(child.metadata.namespace, owner["name"], view)


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
                                registry_url=memo.config.registry_url, skipped=memo.skipped_namespaces,
                                state=memo.config.state)
    except InjectionError as exc:
        raise kopf.AdmissionError(str(exc), code=400) from None
    if options is not None:
        patch.fns.append(lambda pod: mutate(pod, options))
