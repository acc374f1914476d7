"""The CLI contract: subcommands exist and bad usage exits 2."""

import subprocess
import sys

import pytest

from toolmesh.cli import COMMANDS, main


def test_every_contract_command_is_listed():
    assert set(COMMANDS) == {"up", "sidecar", "registry", "operator", "crds", "tools", "call"}


def test_unknown_command_is_bad_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_reports_version():
    out = subprocess.run([sys.executable, "-m", "toolmesh", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("toolmesh ")
