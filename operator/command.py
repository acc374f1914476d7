"""`toolmesh operator`: watch MCPServers and MCPToolPolicies, and serve the sidecar-injecting admission webhook."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path

from toolmesh.api.errors import UsageError
from toolmesh.operator.render import OperatorConfig

DEFAULT_SIDECAR_IMAGE = OperatorConfig.sidecar_image
DEFAULT_REGISTRY_URL = OperatorConfig.registry_url
TLS_SECRET = "toolmesh-webhook-tls"


class ConfigError(UsageError):
    """The operator cannot start as configured (no cluster reachable, webhook setup refused): exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                        help="watch only this namespace (repeatable; default: all namespaces)")
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
    parser.add_argument("--sidecar-image", default=os.environ.get("TOOLMESH_SIDECAR_IMAGE", DEFAULT_SIDECAR_IMAGE),
                        help=f"image of the sidecar (default {DEFAULT_SIDECAR_IMAGE})")
    parser.add_argument("--registry-url", default=os.environ.get("TOOLMESH_REGISTRY_URL", DEFAULT_REGISTRY_URL),
                        help="registry URL the sidecars report to; empty for none"
                             f" (default {DEFAULT_REGISTRY_URL})")


def run(args: argparse.Namespace) -> int:
    import kopf

    from toolmesh.operator import handlers  # registers the handlers with kopf
    from toolmesh.operator.kube import Kube, KubeError, load_api_client
    from toolmesh.operator.reconcile import Reconciler
    from toolmesh.operator.webhook import skipped_namespaces

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # kopf logs every handler success per object and per admission; keep its warnings and errors only.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = OperatorConfig(sidecar_image=args.sidecar_image, registry_url=args.registry_url or None)
    try:
        kube = Kube(load_api_client(pool_size=16))  # reconciles run side by side in kopf's threads
    except Exception as exc:  # noqa: BLE001 - no kubeconfig and not in a cluster: a configuration problem
        raise ConfigError(f"cannot reach Kubernetes: {exc}") from None

    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="toolmesh.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="toolmesh.io", key="last-handled-configuration")
    settings.persistence.finalizer = "toolmesh.io/finalizer"
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 16
    settings.admission.managed = None  # the operator writes its own MutatingWebhookConfiguration

    memo = kopf.Memo(reconciler=Reconciler(kube=kube, config=config), config=config,
                     skipped_namespaces=skipped_namespaces(args.operator_namespace))
    workdir = Path(tempfile.mkdtemp(prefix="toolmesh-webhook-"))
    try:
        if not args.no_webhook:
            if args.webhook_cert_dir:
                certfile, keyfile = args.webhook_cert_dir / "tls.crt", args.webhook_cert_dir / "tls.key"
                if not (certfile.is_file() and keyfile.is_file()):
                    raise ConfigError(f"--webhook-cert-dir {args.webhook_cert_dir} lacks tls.crt or tls.key")
            else:
                try:
                    certfile, keyfile = setup_webhook(kube, args, workdir)
                except KubeError as exc:
                    raise ConfigError(f"cannot set up the admission webhook: {exc}") from None
            handlers.enable_webhook()
            settings.admission.server = kopf.WebhookServer(
                addr=args.webhook_host, port=args.webhook_port, host=args.webhook_host,
                certfile=str(certfile), pkeyfile=str(keyfile))
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(kopf.operator(
            settings=settings, memo=memo, standalone=True,
            clusterwide=not args.namespace, namespaces=args.namespace,
        ))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def setup_webhook(kube, args: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    """Reuse or make the serving certificate (kept in a Secret), then point the webhook configuration at us."""
    from toolmesh.operator import certs
    from toolmesh.operator.webhook import WebhookEndpoint, render_webhook_configuration

    ns = args.operator_namespace
    hosts = [args.webhook_host, "localhost"]
    if args.webhook_service:
        hosts += [f"{args.webhook_service}.{ns}.svc", f"{args.webhook_service}.{ns}.svc.cluster.local"]
    if kube.get("Namespace", ns) is None:
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    secret = kube.get("Secret", TLS_SECRET, ns)
    cert = certs.WebhookCert.from_secret(secret) if secret else None
    if cert is None or not certs.still_good(cert, hosts):
        cert = certs.generate(hosts)
        kube.apply(certs.render_secret(TLS_SECRET, ns, cert))
    if args.webhook_service:
        endpoint = WebhookEndpoint(service_name=args.webhook_service, service_namespace=ns)
    else:
        endpoint = WebhookEndpoint(url=f"https://{args.webhook_host}:{args.webhook_port}")
    kube.apply(render_webhook_configuration(endpoint, cert.ca, ns, failure_policy=args.failure_policy))
    return cert.write(workdir)
