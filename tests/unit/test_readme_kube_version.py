"""The README's advice on `--kube-version` is what the built helm does with the chart."""

from __future__ import annotations

import re

from helpers import ROOT
from helpers.chart import CHART, helm

README = (ROOT / "README.md").read_text()


def advised_version() -> str:
    found = re.search(r"`helm template`[\s\S]{0,200}?`--kube-version (\d+\.\d+\.\d+)` or newer", README, re.S)
    assert found, "the README says which --kube-version `helm template` needs"
    return found.group(1)


def test_helm_template_accepts_the_advised_version_and_refuses_the_one_before(tmp_path):
    version = advised_version()
    major, minor, _ = map(int, version.split("."))
    assert helm("template", "t", str(CHART), "--kube-version", version, home=tmp_path).returncode == 0
    older = helm("template", "t", str(CHART), "--kube-version", f"{major}.{minor - 1}.99", check=False, home=tmp_path)
    assert older.returncode != 0 and "kubeVersion" in older.stderr
    # Without the flag helm assumes an old version and refuses the chart, which is why the README says so.
    assert helm("template", "t", str(CHART), check=False, home=tmp_path).returncode != 0


def test_helm_install_takes_no_kube_version_as_the_readme_says(tmp_path):
    assert "`helm install --dry-run` has no such flag" in README
    result = helm("install", "t", str(CHART), "--dry-run", "--kube-version", advised_version(), check=False,
                  home=tmp_path)
    assert result.returncode != 0 and "unknown flag: --kube-version" in result.stderr
