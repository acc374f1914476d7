"""Runs the cluster build's helm against charts/toolmesh: template, lint, and the kube version the chart needs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from helpers import ROOT

CHART = ROOT / "charts" / "toolmesh"
GOLDEN = ROOT / "tests" / "golden" / "chart"
KUBE_VERSION = "1.36.0"
"""What `helm template` assumes offline (its own default, 1.20, is older than the chart's kubeVersion)."""


def helm_binary() -> Path:
    from helpers.kube import cluster_bin_dir

    return cluster_bin_dir() / "helm"


def helm(*args: str, check: bool = True, home: Path | None = None) -> subprocess.CompletedProcess:
    env = None
    if home is not None:
        env = {"HOME": str(home), "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
               "HELM_DATA_HOME": str(home / "data"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def template(*args: str, release: str = "toolmesh", namespace: str = "toolmesh-system",
             check: bool = True) -> subprocess.CompletedProcess:
    """`helm template RELEASE charts/toolmesh -n NAMESPACE --kube-version ...` plus `args` (-f, --set)."""
    return helm("template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *args,
                check=check)


def objects(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
