"""Plain-dict requests to the Kubernetes API with the official client, as the operator and the registry make them."""

from __future__ import annotations

import json
import os
from typing import Any

from kubernetes import client, config

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class KubeError(Exception):
    """The API answered with an error status; `status` says which (404: gone, 409: conflict, 5xx: retry)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def load_api_client(pool_size: int | None = None) -> client.ApiClient:
    """An API client from the in-cluster service account, else from the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(SERVICE_ACCOUNT_TOKEN):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(client_configuration=configuration)
    if pool_size is not None:
        configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


class KubeClient:
    """JSON in and out of API paths (blocking: async callers run it in a thread)."""

    def __init__(self, api: client.ApiClient, *, timeout: float = 30.0):
        self.api = api
        self.timeout = timeout

    def request(self, method: str, path: str, *, body: Any = None, query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json", missing_ok: bool = False) -> Any:
        """The decoded answer; KubeError for an error status, except 404 with `missing_ok`, which gives None."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, body, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"])
        response = self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=self.timeout)
        data = response.read()
        if missing_ok and response.status == 404:
            return None
        if not 200 <= response.status < 300:
            try:
                message = json.loads(data).get("message", "")
            except (ValueError, AttributeError):
                message = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
            raise KubeError(response.status, message)
        return json.loads(data) if data else None
