"""tessera-sim: --version, softhsm init never losing an SO PIN, swtpm keeping its port."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from simulator.cli import main


def test_version_names_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out == f"tessera-sim {version('tessera')}\n"
    assert captured.err == ""
