"""`toolmesh operator`: watch MCPServers and MCPToolPolicies, and serve the sidecar-injecting admission webhook."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolmesh.api.errors import UsageError
from toolmesh.operator.inject import StateStore
from toolmesh.operator.render import MANAGED_BY, OperatorConfig

DEFAULT_SIDECAR_IMAGE = OperatorConfig.sidecar_image
DEFAULT_REGISTRY_URL = OperatorConfig.registry_url
TLS_SECRET = "toolmesh-webhook-tls"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
DRY_RUN = (("dryRun", "All"),)
KUBE_CONNECTIONS = 16
"""Requests to the API the reconciler makes at once (servers of a namespace reconcile side by side)."""
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def namespace_selector(text: str) -> dict[str, str]:
    """`key=value[,key=value...]`: the labels a namespace must carry for the operator to serve it."""
    selector: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not LABEL_KEY.match(key) or not LABEL_VALUE.match(value) or len(value) > 63:
            raise argparse.ArgumentTypeError(f"{part!r} is not a label key=value")
        selector[key] = value
    if not selector:
        raise argparse.ArgumentTypeError("an empty selector would select every namespace: leave the option out")
    return selector


def secret_ref(text: str) -> tuple[str, str]:
    """`name[:key]`: a Secret and its key (default `password`)."""
    name, _, key = text.partition(":")
    if not LABEL_VALUE.match(name) or not name or len(name) > 253 or not LABEL_VALUE.match(key or "password"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Secret name[:key]")
    return name, key or "password"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                        help="watch only this namespace (repeatable; default: every namespace but kube-system,"
                             " kube-public, kube-node-lease and the operator's own)")
    parser.add_argument("--namespace-selector", type=namespace_selector, metavar="KEY=VALUE[,...]",
                        help="watch and inject only in namespaces carrying these labels (never the system ones"
                             " nor the operator's own), following labels as they change")
    parser.add_argument("--operator-namespace", default=os.environ.get("POD_NAMESPACE", "toolmesh-system"),
                        help="where the webhook certificate Secret lives; never injected (default: $POD_NAMESPACE"
                             " or toolmesh-system)")
    parser.add_argument("--webhook-port", type=int, default=7443, help="webhook HTTPS port (default 7443)")
    parser.add_argument("--webhook-host", default="127.0.0.1",
                        help="address the webhook listens on and the apiserver calls (default 127.0.0.1)")
    parser.add_argument("--webhook-service", metavar="NAME",
                        help="in a cluster: the Service in the operator namespace that fronts the webhook"
                             " (default: the apiserver calls https://HOST:PORT directly)")
    parser.add_argument("--no-webhook", action="store_true", help="run without the admission webhook")
    parser.add_argument("--webhook-cert-dir", type=Path, metavar="DIR",
                        help="serve the certificate in DIR (tls.crt, tls.key), e.g. cert-manager's, and leave the"
                             " webhook configuration and its caBundle to whoever installed them (default: the"
                             " operator makes its own certificate and writes the configuration)")
    parser.add_argument("--failure-policy", choices=("Fail", "Ignore"), default="Fail",
                        help="what the apiserver does with a labelled pod when the webhook is down (default Fail:"
                             " no pod starts without its policy)")
    parser.add_argument("--validation-failure-policy", choices=("Fail", "Ignore"), default="Ignore",
                        help="what the apiserver does with an MCPToolPolicy or MCPServer edit when the webhook is down"
                             " (default Ignore: the edit is stored unchecked and, if invalid, the policy's last"
                             " accepted generation stays in force; Fail refuses every edit until the operator is back)")
    parser.add_argument("--sidecar-image", default=os.environ.get("TOOLMESH_SIDECAR_IMAGE", DEFAULT_SIDECAR_IMAGE),
                        help=f"image of the sidecar (default {DEFAULT_SIDECAR_IMAGE})")
    parser.add_argument("--state-redis-url", metavar="URL", default=os.environ.get("TOOLMESH_STATE_REDIS_URL") or None,
                        help="a Redis-protocol server (redis://, rediss:// for TLS) every sidecar shares rate limits,"
                             " quotas and conversation budgets through; without a password in it"
                             " (default: $TOOLMESH_STATE_REDIS_URL, else each sidecar keeps its own)")
    parser.add_argument("--state-redis-secret", metavar="NAME[:KEY]", type=secret_ref,
                        help="the Secret, in each served namespace, holding that server's password under KEY"
                             " (default key: password); sidecars read it through a secretKeyRef")
    parser.add_argument("--registry-url", default=os.environ.get("TOOLMESH_REGISTRY_URL", DEFAULT_REGISTRY_URL),
                        help="registry URL the sidecars report to; empty for none"
                             f" (default {DEFAULT_REGISTRY_URL})")


def run(args: argparse.Namespace) -> int:
    import kopf

    from toolmesh.operator import handlers  # registers the handlers with kopf
    from toolmesh.operator.kube import AsyncKube, Kube, KubeError, load_api_client
    from toolmesh.operator.reconcile import Reconciler
    from toolmesh.operator.webhook import skipped_namespaces

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # kopf logs every handler success per object and per admission; keep its warnings and errors only.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    state = None
    if args.state_redis_url:
        if not args.state_redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise UsageError("--state-redis-url must be redis://, rediss:// or unix://")
        if "@" in args.state_redis_url.partition("://")[2].partition("/")[0]:
            raise UsageError("--state-redis-url must not hold credentials: every pod spec would show them;"
                             " name a Secret with --state-redis-secret")
        name, key = args.state_redis_secret or (None, "password")
        state = StateStore(args.state_redis_url, name, key)
    elif args.state_redis_secret:
        raise UsageError("--state-redis-secret needs --state-redis-url")
    config = OperatorConfig(sidecar_image=args.sidecar_image, registry_url=args.registry_url or None, state=state)
    try:
        kube = Kube(load_api_client(pool_size=KUBE_CONNECTIONS))
    except Exception as exc:  # noqa: BLE001 - no kubeconfig and not in a cluster: a configuration problem
        raise UsageError(f"cannot reach Kubernetes: {exc}") from None

    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="toolmesh.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="toolmesh.io", key="last-handled-configuration")
    settings.persistence.finalizer = "toolmesh.io/finalizer"
    settings.posting.level = logging.WARNING
    settings.admission.managed = None  # the operator writes its own webhook configurations

    if args.namespace and args.namespace_selector:
        raise UsageError("--namespace and --namespace-selector exclude each other")
    skipped = skipped_namespaces(args.operator_namespace)
    # The handlers are async; the reconciler's requests run in one thread per pooled connection.
    requests = AsyncKube(kube, workers=KUBE_CONNECTIONS)
    memo = kopf.Memo(reconciler=Reconciler(kube=requests, config=config), config=config,
                     skipped_namespaces=frozenset(skipped))
    workdir = Path(tempfile.mkdtemp(prefix="toolmesh-webhook-"))
    setup: WebhookSetup | None = None
    try:
        if not args.no_webhook:
            if args.webhook_cert_dir:
                certfile, keyfile = args.webhook_cert_dir / "tls.crt", args.webhook_cert_dir / "tls.key"
                if not (certfile.is_file() and keyfile.is_file()):
                    raise UsageError(f"--webhook-cert-dir {args.webhook_cert_dir} lacks tls.crt or tls.key")
            else:
                try:
                    setup = setup_webhook(kube, args, workdir)
                except KubeError as exc:
                    raise UsageError(f"cannot set up the admission webhook: {exc}") from None
                certfile, keyfile = setup.certfile, setup.keyfile
            handlers.enable_webhook()
            settings.admission.server = kopf.WebhookServer(
                addr=args.webhook_host, port=args.webhook_port, host=args.webhook_host,
                certfile=str(certfile), pkeyfile=str(keyfile))
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(run_kopf(kopf, kube, args, settings, memo, skipped))
    finally:
        requests.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if setup is not None and not args.webhook_service:
            # Outside the cluster the operator is a passing guest: what it set up goes with it.
            try:
                setup.undo(kube, args.operator_namespace)
            except KubeError as exc:
                logging.getLogger("toolmesh.operator").warning("could not undo the webhook set-up: %s", exc)
    return 0


async def run_kopf(kopf, kube, args: argparse.Namespace, settings, memo, skipped: list[str]) -> None:
    """kopf, watching the namespaces the operator serves.

    The system namespaces and the operator's own are never reconciled: an operator allowed everywhere must still
    not create workloads in kube-system. Serving every other namespace, it watches cluster-wide (one watch per
    kind, whatever the number of namespaces) and the handlers' `served` filter leaves the skipped ones alone.
    `--namespace` names them exactly; `--namespace-selector` follows namespace labels through kopf's insights.

    Watching namespace by namespace when every namespace is served would also stall: kopf holds every handler
    until each namespace's indexes are listed, and a namespace deleted while its first listing is under way
    leaves that hold in place for good (reproduced by tests/cluster/test_operator_namespace_churn.py).
    """
    if args.namespace:
        await kopf.operator(settings=settings, memo=memo, standalone=True, namespaces=args.namespace)
        return
    if not args.namespace_selector:
        await kopf.operator(settings=settings, memo=memo, standalone=True, clusterwide=True)
        return
    # kopf has no namespace label selector; its insights (the namespaces it watches) are ours to feed. Its own
    # namespace observer, given a pattern nothing matches, only drops namespaces that are deleted.
    from kopf._cogs.structs.references import Insights

    insights = Insights()
    follower = asyncio.create_task(follow_selected_namespaces(kube, args.namespace_selector, set(skipped), insights))
    try:
        await kopf.operator(settings=settings, memo=memo, standalone=True, insights=insights,
                            namespaces=[re.compile(r"(?!)")])
    finally:
        follower.cancel()


async def follow_selected_namespaces(kube, selector: Mapping[str, str], skipped: set[str], insights) -> None:
    """Keep `insights.namespaces` equal to the namespaces carrying `selector`'s labels (minus the skipped ones)."""
    from kubernetes import client, watch

    loop = asyncio.get_running_loop()
    label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    core = client.CoreV1Api(kube.api)
    log = logging.getLogger("toolmesh.operator")
    selected: set[str] = set()

    async def publish(names: set[str]) -> None:
        async with insights.revised:
            insights.namespaces.difference_update(selected - names)
            insights.namespaces.update(names)
            insights.revised.notify_all()
        if names != selected:
            log.info("serving namespaces labelled %s: %s", label_selector, ", ".join(sorted(names)) or "none")
        selected.clear()
        selected.update(names)

    stop = threading.Event()

    def follow() -> None:
        # A blocking list-then-watch in a thread; each change is handed to the loop as the full set of names.
        while not stop.is_set():
            try:
                listed = core.list_namespace(label_selector=label_selector)
                names = {n.metadata.name for n in listed.items if n.metadata.name not in skipped}
                asyncio.run_coroutine_threadsafe(publish(set(names)), loop).result()
                stream = watch.Watch().stream(core.list_namespace, label_selector=label_selector,
                                              resource_version=listed.metadata.resource_version, timeout_seconds=60)
                for event in stream:
                    if stop.is_set():
                        return
                    name = event["object"].metadata.name
                    if name in skipped:
                        continue
                    if event["type"] == "DELETED":
                        names.discard(name)
                    else:
                        names.add(name)
                    asyncio.run_coroutine_threadsafe(publish(set(names)), loop).result()
            except Exception as exc:  # noqa: BLE001 - list again after a failed watch (410 Gone, network)
                if stop.is_set():
                    return
                log.warning("following labelled namespaces failed, listing again: %s", exc)
                stop.wait(2)

    thread = threading.Thread(target=follow, name="namespace-selector", daemon=True)
    thread.start()
    try:
        await asyncio.Event().wait()
    finally:
        stop.set()


HELM_MANAGED = ("app.kubernetes.io/managed-by", "Helm")


def _ours(obj: Mapping[str, Any] | None) -> bool:
    """An object this operator created itself (not the chart's): it may replace it whole and remove it."""
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return labels.get(MANAGED_BY_LABEL) == MANAGED_BY[MANAGED_BY_LABEL]


@dataclass
class WebhookSetup:
    """What `setup_webhook` changed, so that an operator outside the cluster can undo it when it stops."""

    certfile: Path
    keyfile: Path
    created_configurations: list[str] = field(default_factory=list)
    """Kinds of the webhook configurations that are ours (no chart installed them): removed at exit."""
    saved_client_configs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """The chart's client configs we replaced (kind -> webhook name -> clientConfig): put back at exit."""
    created_secret: bool = False
    """The certificate Secret is ours: removed at exit."""
    saved_secret_data: dict[str, str] | None = None
    """The chart's Secret data we replaced: put back at exit."""

    def undo(self, kube, namespace: str) -> None:
        """Leave the cluster as this operator found it: a later `helm install`, or the chart's own operator scaled
        back up, finds its objects as they were, and no webhook points at a port nobody listens on."""
        from toolmesh.operator.kube import object_path
        from toolmesh.operator.webhook import restore_patch

        for configuration in served_configurations():
            config_path = object_path(configuration.kind, configuration.name)
            saved = self.saved_client_configs.get(configuration.kind)
            if configuration.kind in self.created_configurations:
                kube.request("DELETE", config_path, missing_ok=True)
            elif saved:
                existing = kube.get(configuration.kind, configuration.name)
                if existing is not None:
                    kube.request("PATCH", config_path, body=restore_patch(existing, saved),
                                 content_type="application/json-patch+json")
        secret_path = object_path("Secret", TLS_SECRET, namespace)
        if self.created_secret:
            kube.request("DELETE", secret_path, missing_ok=True)
        elif self.saved_secret_data is not None:
            kube.request("PATCH", secret_path, body={"data": self.saved_secret_data},
                         content_type="application/merge-patch+json", missing_ok=True)


def served_configurations() -> tuple:
    """The webhook configurations the operator serves: sidecar injection, and policy validation."""
    from toolmesh.operator.validation import VALIDATION
    from toolmesh.operator.webhook import INJECTION

    return (INJECTION, VALIDATION)


def setup_webhook(kube, args: argparse.Namespace, workdir: Path) -> WebhookSetup:
    """Reuse or make the serving certificate (kept in a Secret), then point the webhook configurations at us.

    Only what the operator owns is written: the caBundle, and the client config (a URL for an operator outside the
    cluster, the Service inside it); the chart's timeoutSeconds, failurePolicy and selectors stay. A configuration
    nobody installed is written whole (and is the operator's). The changes to the configurations are tried with a
    dry run first, so a configuration the API refuses leaves the Secret alone.
    """
    from toolmesh.operator import certs
    from toolmesh.operator.kube import object_path
    from toolmesh.operator.validation import VALIDATION, render_validating_configuration
    from toolmesh.operator.webhook import WebhookEndpoint, client_config_patch, render_webhook_configuration

    ns = args.operator_namespace
    hosts = [args.webhook_host, "localhost"]
    if args.webhook_service:
        hosts += [f"{args.webhook_service}.{ns}.svc", f"{args.webhook_service}.{ns}.svc.cluster.local"]
    if kube.get("Namespace", ns) is None:
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    secret = kube.get("Secret", TLS_SECRET, ns)
    cert = certs.WebhookCert.from_secret(secret) if secret else None
    fresh = cert is None or not certs.still_good(cert, hosts)
    if fresh:
        cert = certs.generate(hosts)
    if args.webhook_service:
        endpoint = WebhookEndpoint(service_name=args.webhook_service, service_namespace=ns)
    else:
        endpoint = WebhookEndpoint(url=f"https://{args.webhook_host}:{args.webhook_port}")

    def render(kind: str) -> dict[str, Any]:
        if kind == VALIDATION.kind:
            return render_validating_configuration(
                endpoint, cert.ca, ns, failure_policy=args.validation_failure_policy,
                namespace_selector=args.namespace_selector, namespaces=args.namespace)
        return render_webhook_configuration(endpoint, cert.ca, ns, failure_policy=args.failure_policy,
                                            namespace_selector=args.namespace_selector)

    setup = WebhookSetup(*cert.write(workdir))
    writes = []
    for configuration in served_configurations():
        config_path = object_path(configuration.kind, configuration.name)
        existing = kube.get(configuration.kind, configuration.name)
        if existing is None or _ours(existing):
            body, content_type = render(configuration.kind), "application/apply-patch+yaml"
            query = [("fieldManager", "toolmesh"), ("force", "true")]
            setup.created_configurations.append(configuration.kind)
        else:
            body, content_type, query = client_config_patch(existing, endpoint, cert.ca, configuration), \
                "application/json-patch+json", []
            if not body:
                raise UsageError(f"the {configuration.kind} {configuration.name} has none of toolmesh's webhooks")
            replaced = {op["value"] for op in body if op["op"] == "test"}
            setup.saved_client_configs[configuration.kind] = {
                h["name"]: h["clientConfig"] for h in existing["webhooks"] if h["name"] in replaced}
        writes.append((config_path, body, content_type, query))

    def write_configurations(dry_run: bool) -> None:
        for config_path, body, content_type, query in writes:
            kube.request("PATCH", config_path, body=body, content_type=content_type,
                         query=[*query, *DRY_RUN * dry_run])

    write_configurations(dry_run=True)
    if fresh:
        if secret is None:
            kube.request("POST", object_path("Secret", None, ns), body=certs.render_secret(TLS_SECRET, ns, cert))
            setup.created_secret = True
        else:
            # Only the data: the chart's labels (Helm's ownership) and the Secret's immutable type stay.
            kube.request("PATCH", object_path("Secret", TLS_SECRET, ns), body={"data": cert.secret_data()},
                         content_type="application/merge-patch+json")
            setup.created_secret = _ours(secret)
            if not setup.created_secret:
                setup.saved_secret_data = dict(secret.get("data") or {})
    else:
        setup.created_secret = _ours(secret)
    write_configurations(dry_run=False)
    return setup
