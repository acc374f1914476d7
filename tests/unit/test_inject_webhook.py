"""The webhook's configuration, its decision per pod, and the serving certificate it makes for itself."""

from __future__ import annotations

import base64
import datetime
import ssl

from cryptography import x509

from toolmesh.operator import certs
from toolmesh.operator.webhook import WebhookEndpoint, injection_for, mutate, render_webhook_configuration


def pod(ns_labels=None, **labels):
    return {"metadata": {"name": "p", "labels": labels}, "spec": {"containers": [{"name": "c", "image": "i"}]}}


def test_configuration_selects_labelled_pods_and_labelled_namespaces_but_never_system_ones():
    config = render_webhook_configuration(WebhookEndpoint(url="https://127.0.0.1:7443"), b"CA", "toolmesh-system")
    by_pod, by_namespace = config["webhooks"]
    assert by_pod["objectSelector"] == {"matchLabels": {"toolmesh.io/inject": "true"}}
    assert {"key": "toolmesh.io/inject", "operator": "In", "values": ["true"]} in \
        by_namespace["namespaceSelector"]["matchExpressions"]
    for hook in (by_pod, by_namespace):
        skipped = hook["namespaceSelector"]["matchExpressions"][-1]
        assert skipped["operator"] == "NotIn" and {"kube-system", "toolmesh-system"} <= set(skipped["values"])
        assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
        assert hook["clientConfig"] == {"caBundle": base64.b64encode(b"CA").decode(),
                                        "url": "https://127.0.0.1:7443/inject-pods"}
    in_cluster = WebhookEndpoint(service_name="toolmesh-webhook", service_namespace="toolmesh-system")
    assert in_cluster.client_config(b"x")["service"]["path"] == "/inject-pods"


def test_decision_skips_system_namespaces_opt_outs_and_injected_pods():
    kwargs = dict(image="img", registry_url=None, skipped=["kube-system", "toolmesh-system"])
    assert injection_for(pod(), "team-a", **kwargs) is not None
    assert injection_for(pod(), "kube-system", **kwargs) is None
    assert injection_for(pod(), "toolmesh-system", **kwargs) is None
    assert injection_for(pod(**{"toolmesh.io/inject": "false"}), "team-a", **kwargs) is None
    body = pod()
    mutate(body, injection_for(body, "team-a", **kwargs))
    assert injection_for(body, "team-a", **kwargs) is None, "an injected pod is left as it is"


def test_certificate_serves_loopback_and_is_reused_until_near_expiry(tmp_path):
    cert = certs.generate(["127.0.0.1", "localhost"])
    certfile, keyfile = cert.write(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certfile, keyfile)  # the pair kopf's WebhookServer is given
    leaf = x509.load_pem_x509_certificate(cert.cert)
    ca = x509.load_pem_x509_certificate(cert.ca)
    leaf.verify_directly_issued_by(ca)
    assert certs.still_good(cert, ["127.0.0.1"])
    assert not certs.still_good(cert, ["127.0.0.1", "toolmesh-webhook.toolmesh-system.svc"])
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=340)
    assert not certs.still_good(cert, ["127.0.0.1"], now=later)
    restored = certs.WebhookCert.from_secret(certs.render_secret("s", "ns", cert))
    assert restored == cert
