"""The Kubernetes operator: kopf handlers (thin), pure renderers, admission webhook, certificates."""
