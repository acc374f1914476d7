"""A real Kubernetes control plane on loopback for tests: etcd, kube-apiserver, controller-manager, scheduler, kwok and a fake Node.

The binaries come from `make cluster-bins` (tests/cluster/build.sh), cached outside the checkout
under a directory named by the hash of the pinned Go modules; `cluster_bin_dir()` computes the
same name. `ControlPlane` starts everything on free 127.0.0.1 ports with freshly generated
certificates and stops it again; tests/cluster/conftest.py wraps it in the `cluster` fixture.

Pods scheduled here are bound to the kwok Node and reported Running, but nothing runs: their
IPs are fake and must never be connected to. Run what a Pod would run on loopback instead.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from helpers import ROOT, free_port

CLUSTER_TESTS = ROOT / "tests" / "cluster"
# The same files, in the same order, as HASH_INPUTS in tests/cluster/build.sh.
HASH_INPUTS = (
    "build.sh",
    "go/etcd/go.mod", "go/etcd/go.sum",
    "go/helm/go.mod", "go/helm/go.sum",
    "go/kubernetes/go.mod", "go/kubernetes/go.sum",
    "go/kwok/go.mod", "go/kwok/go.sum",
)
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok", "helm")

FAKE_NODE = "kwok-node-0"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def cluster_cache_dir() -> Path:
    """Where build.sh puts this checkout's cluster build: `$TOOLMESH_CACHE/cluster-<hash>`.

    The hash is `sha256sum <inputs> | sha256sum`, first 12 hex digits, with the inputs named
    relative to tests/cluster/ — a version bump lands in a fresh directory.
    """
    listing = "".join(
        f"{hashlib.sha256((CLUSTER_TESTS / name).read_bytes()).hexdigest()}  {name}\n" for name in HASH_INPUTS
    )
    digest = hashlib.sha256(listing.encode()).hexdigest()[:12]
    cache_root = Path(os.environ.get("TOOLMESH_CACHE") or Path.home() / ".cache" / "toolmesh")
    return cache_root / f"cluster-{digest}"


def cluster_bin_dir() -> Path:
    """The directory holding etcd, kube-*, kubectl, kwok and helm; fails the test if any is missing."""
    bin_dir = cluster_cache_dir() / "bin"
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    stages = cluster_cache_dir() / "kwok-stages.yaml"
    if missing or not stages.is_file():
        what = ", ".join(missing) if missing else "kwok-stages.yaml"
        pytest.fail(f"cluster binaries missing in {bin_dir} ({what}): run `make cluster-bins` first", pytrace=False)
    return bin_dir


class KubectlError(subprocess.CalledProcessError):
    """A kubectl or helm command that failed; its message carries the command's stderr."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {(self.stderr or '').strip()}"


# --- certificates -------------------------------------------------------------------------

def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def issue_cert(ca_cert: Path, ca_key: Path, common_name: str, *, organization: str | None = None,
               dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), client: bool = False, server: bool = False,
               out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Sign a leaf certificate with the cluster CA; returns (cert path, key path) as `stem.crt`, `stem.key`.

    Webhook servers use this with `server=True, ips=("127.0.0.1",)` and the CA as their caBundle.
    """
    import ipaddress

    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organization))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
    )
    usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(signer, hashes.SHA256())
    cert_path, key_path = out_dir / f"{stem}.crt", out_dir / f"{stem}.key"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path


def _make_ca(out_dir: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name("toolmesh-test-ca")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_cert(out_dir / "ca.crt", cert)
    _write_key(out_dir / "ca.key", key)
    return out_dir / "ca.crt", out_dir / "ca.key"


def _make_service_account_keys(out_dir: Path) -> tuple[Path, Path]:
    # RS256 is what every token consumer accepts; the apiserver signs ServiceAccount tokens with it.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(out_dir / "sa.key", key)
    (out_dir / "sa.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return out_dir / "sa.key", out_dir / "sa.pub"


# --- processes ------------------------------------------------------------------------------

def _die_with_parent() -> None:
    # If the test run is killed outright, the control plane must not outlive it.
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL: a graceful shutdown may hang on a dead dependency."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=timeout)


@dataclass
class ControlPlane:
    """A running cluster. What tests use:

    - `kubeconfig`: path of an admin (system:masters) kubeconfig; `env` sets KUBECONFIG and PATH
      (kubectl, helm) for subprocesses such as an operator under test.
    - `server`: the apiserver URL, `https://127.0.0.1:<port>`.
    - `bin_dir`: etcd, kube-*, kubectl, kwok, helm.
    - `ca_cert`, `ca_key`: the cluster CA (PEM paths); `issue_cert(...)` signs webhook serving certs
      with it, and `ca_bundle()` is the base64 caBundle for webhook configurations.
    - `kubectl(*args, input=None, check=True)`, `helm(...)`: run against this cluster.
    - `api_client()`: a `kubernetes.client.ApiClient` configured for this cluster.
    - `token_for(namespace, sa, audience)`: a projected ServiceAccount token (creates the SA if missing).
    - `node`: name of the fake Node every Pod is scheduled on.
    """

    bin_dir: Path
    workdir: Path
    server: str = ""
    node: str = FAKE_NODE
    start_seconds: float = 0.0
    _processes: list[_Process] = field(default_factory=list)

    # -- paths --
    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def ca_cert(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.workdir / "pki" / "ca.key"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses that talk to this cluster (KUBECONFIG, PATH with kubectl/helm, helm dirs)."""
        home = self.workdir / "home"
        return dict(
            os.environ,
            KUBECONFIG=str(self.kubeconfig),
            PATH=f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            HELM_CACHE_HOME=str(home / "helm-cache"),
            HELM_CONFIG_HOME=str(home / "helm-config"),
            HELM_DATA_HOME=str(home / "helm-data"),
            KUBECACHEDIR=str(home / "kube-cache"),
        )

    def ca_bundle(self) -> str:
        """The CA certificate, base64-encoded, as webhook `clientConfig.caBundle` wants it."""
        return base64.b64encode(self.ca_cert.read_bytes()).decode()

    def issue_cert(self, common_name: str, *, stem: str, out_dir: Path | None = None, **kwargs) -> tuple[Path, Path]:
        """Sign a certificate with the cluster CA (see module-level `issue_cert`); written under the cluster workdir by default."""
        return issue_cert(self.ca_cert, self.ca_key, common_name, out_dir=out_dir or self.workdir / "pki",
                          stem=stem, **kwargs)

    # -- clients --
    def _run(self, binary: str, extra: list[str], args: tuple, input: str | None, check: bool,
             timeout: float) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / binary), *extra, *map(str, args)]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def kubectl(self, *args, input: str | None = None, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster; text stdout/stderr captured. Raises `KubectlError` on failure when `check`."""
        return self._run("kubectl", ["--kubeconfig", str(self.kubeconfig)], args, input, check, timeout)

    def helm(self, *args, input: str | None = None, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run helm against this cluster (its caches live in the cluster workdir)."""
        return self._run("helm", ["--kubeconfig", str(self.kubeconfig)], args, input, check, timeout)

    def kubectl_json(self, *args) -> dict:
        """`kubectl <args> -o json`, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def api_client(self):
        """A fresh `kubernetes.client.ApiClient` for this cluster (close it, or use it as a context manager)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def token_for(self, namespace: str, sa: str, audience: str, duration: str = "1h") -> str:
        """A ServiceAccount token for `audience` from the TokenRequest API; the ServiceAccount is created if missing."""
        if self.kubectl("get", "serviceaccount", sa, "-n", namespace, check=False).returncode != 0:
            self.kubectl("create", "serviceaccount", sa, "-n", namespace)
        return self.kubectl("create", "token", sa, "-n", namespace, "--audience", audience,
                            "--duration", duration).stdout.strip()

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        """Poll `predicate` until truthy; on timeout fail with the tail of every control-plane log."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                value = predicate()
                if value:
                    return value
            except Exception as exc:  # noqa: BLE001 - not checkable yet
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))

    # -- lifecycle --
    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"--- {p.name} ({p.log}) ---\n{p.tail(lines)}" for p in self._processes)

    def _check_alive(self) -> None:
        for p in self._processes:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}; its log: {p.log}")

    def _spawn(self, name: str, args: list[str]) -> _Process:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.logs_dir / f"{name}.log"
        env = dict(os.environ, HOME=str(self.workdir / "home"))
        with open(log, "wb") as out:
            popen = subprocess.Popen([str(self.bin_dir / args[0]), *args[1:]], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=self.workdir, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        proc = _Process(name, popen, log)
        self._processes.append(proc)
        return proc

    def _https_get(self, path: str) -> tuple[int, str]:
        pki = self.workdir / "pki"
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        host, port = self.server.removeprefix("https://").rsplit(":", 1)
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=2)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    def start(self) -> None:
        """Generate certificates, start every component, and return once the cluster can run Pods."""
        started = time.monotonic()
        pki = self.workdir / "pki"
        pki.mkdir(parents=True)
        (self.workdir / "home").mkdir()
        ca_cert, ca_key = _make_ca(pki)
        serving_cert, serving_key = issue_cert(ca_cert, ca_key, "kube-apiserver", dns=("localhost", "kubernetes"),
                                               ips=("127.0.0.1",), server=True, out_dir=pki, stem="apiserver")
        admin_cert, admin_key = issue_cert(ca_cert, ca_key, "admin", organization="system:masters", client=True,
                                           out_dir=pki, stem="admin")
        sa_key, sa_pub = _make_service_account_keys(pki)

        etcd_port, etcd_peer_port, api_port = free_port(), free_port(), free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        self._spawn("etcd", [
            "etcd", "--name=toolmesh-test", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}", f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
            f"--initial-cluster=toolmesh-test=http://127.0.0.1:{etcd_peer_port}",
            "--unsafe-no-fsync", "--log-level=warn",
        ])
        self._spawn("kube-apiserver", [
            "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--tls-cert-file={serving_cert}", f"--tls-private-key-file={serving_key}", f"--client-ca-file={ca_cert}",
            "--service-account-issuer=https://kubernetes.default.svc", f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}", "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.96.0.0/16", "--endpoint-reconciler-type=none",  # room for hundreds of Services
            "--enable-priority-and-fairness=false", "--profiling=false", f"--cert-dir={pki}",
            "--allow-privileged=true",
            # On by default; named so that webhook tests do not depend on the default set.
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
        ])
        self._write_kubeconfig(ca_cert, admin_cert, admin_key)
        self.wait_for(lambda: self._https_get("/readyz") == (200, "ok"), timeout=START_TIMEOUT,
                      what="kube-apiserver /readyz")

        kubeconfig = str(self.kubeconfig)
        self._spawn("kube-controller-manager", [
            "kube-controller-manager", f"--kubeconfig={kubeconfig}", f"--service-account-private-key-file={sa_key}",
            f"--root-ca-file={ca_cert}", "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false",
            "--use-service-account-credentials=false", "--profiling=false",
        ])
        self._spawn("kube-scheduler", [
            "kube-scheduler", f"--kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", "--secure-port=0",
            "--leader-elect=false", "--profiling=false",
        ])
        self._spawn("kwok", [
            "kwok", f"--kubeconfig={kubeconfig}", f"--config={self.bin_dir.parent / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            # The stages renew the Node's Lease only when kwok manages leases; without one the node
            # lifecycle controller marks the Node NotReady every grace period and flips Pods to not Ready.
            "--server-address=127.0.0.1:0", "--node-lease-duration-seconds=40",
        ])
        self.kubectl("apply", "-f", "-", input=json.dumps(self._fake_node()))
        self.wait_for(self.node_ready, timeout=START_TIMEOUT, what=f"Node {self.node} Ready")
        # The ServiceAccount controller is what makes Pods admissible in a namespace.
        self.wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
                      timeout=START_TIMEOUT, what="the default ServiceAccount")
        self.start_seconds = time.monotonic() - started

    def _fake_node(self) -> dict:
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": self.node,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                           "kubernetes.io/arch": "amd64", "type": "kwok"},
            },
            "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        }

    def node_ready(self) -> bool:
        """Whether the fake Node reports Ready (kwok keeps it so while it renews the Node Lease)."""
        node = self.kubectl_json("get", "node", self.node)
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))

    def _write_kubeconfig(self, ca_cert: Path, admin_cert: Path, admin_key: Path) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "toolmesh-test",
            "clusters": [{"name": "toolmesh-test", "cluster": {"server": self.server, "certificate-authority": str(ca_cert)}}],
            "users": [{"name": "admin", "user": {"client-certificate": str(admin_cert), "client-key": str(admin_key)}}],
            "contexts": [{"name": "toolmesh-test", "context": {"cluster": "toolmesh-test", "user": "admin",
                                                             "namespace": "default"}}],
        }
        # JSON is YAML; every client (kubectl, helm, kopf, the Python client) reads it.
        self.kubeconfig.write_text(json.dumps(config, indent=2))

    def stop(self) -> None:
        """Stop in reverse start order: the apiserver before etcd, SIGKILL after a deadline."""
        for proc in reversed(self._processes):
            proc.stop()


def start_control_plane(workdir: Path | None = None, attempts: int = 3) -> ControlPlane:
    """Start a control plane in `workdir` (a fresh temp dir by default); on failure everything started is stopped.

    Ports are picked free but only taken when each component binds them, so a concurrent test run
    can grab one first: an "address already in use" start is retried in a fresh subdirectory.
    """
    bin_dir = cluster_bin_dir()
    base = workdir or Path(tempfile.mkdtemp(prefix="toolmesh-cluster-"))
    for attempt in range(1, attempts + 1):
        plane = ControlPlane(bin_dir=bin_dir, workdir=base if attempt == 1 else base / f"attempt-{attempt}")
        try:
            plane.start()
            return plane
        except Exception as exc:
            plane.stop()
            tails = plane.log_tails()
            if "address already in use" in tails and attempt < attempts:
                continue
            raise RuntimeError(f"the control plane did not start: {exc}\nlogs in {plane.logs_dir}\n{tails}") from exc
        except BaseException:
            plane.stop()
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")
