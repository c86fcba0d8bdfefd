"""`tessera-agent install-service`: the agent's systemd files from an installed wheel.

The wheel is built here (``pip wheel --no-deps``, as tests/test_packaging.py does) and
installed with ``--no-index`` into a fresh venv that sees the base interpreter's
site-packages (cryptography, the only core dependency; no tessera there), so nothing is
downloaded and nothing resolves to the checkout. Its ``tessera-agent install-service
--root DIR`` writes the unit, sysusers.d and tmpfiles.d files under DIR; the commands it
prints then make the account and the state directory there, and systemd's own
``verify`` / ``security`` accept the written unit. Refusals (an edited file, a --root
that is not a directory, a path that cannot be written) are one line, exit 1, and leave
every file as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from device.cli import main
from tests.test_packaging import _run

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ROOT / "device" / "deploy"
UNIT = "etc/systemd/system/tessera-agent.service"
#: package file (device/deploy/...) -> where install-service writes it under --root
FILES = {
    "sysusers.d/tessera.conf": "usr/lib/sysusers.d/tessera.conf",
    "tmpfiles.d/tessera.conf": "usr/lib/tmpfiles.d/tessera.conf",
    "tessera-agent.service": UNIT,
}
HEADER = re.compile(r"# Written by tessera-agent install-service \(tessera 0\.1\.0\), sha256 "
                    r"of the lines below: ([0-9a-f]{64})\.\n")


def expected(name: str, agent: Path) -> str:
    """The package file as install-service writes it, without its header line."""
    body = (PACKAGED / name).read_text()
    if name.endswith(".service"):
        body = body.replace("ExecStart=/opt/tessera/venv/bin/tessera-agent ",
                            f"ExecStart={agent} ")
    return body


def check_written(root: Path, agent: Path) -> None:
    for name, where in FILES.items():
        path = root / where
        assert path.stat().st_mode & 0o7777 == 0o644, path
        header, _, body = path.read_text().partition("\n")
        match = HEADER.fullmatch(header + "\n")
        assert match, header
        assert body == expected(name, agent), path
        assert match.group(1) == hashlib.sha256(body.encode()).hexdigest()
        assert path.parent.stat().st_mode & 0o7777 == 0o755, path.parent


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Every entry under ``root``: mode, mtime and content (a symlink's target)."""
    out: dict[str, tuple[int, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data: bytes | str = (os.readlink(path) if path.is_symlink() else
                             path.read_bytes() if path.is_file() else "")
        out[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, data)
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("install-service")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", top / "dist", ROOT,
         cwd=top)
    (wheel,) = (top / "dist").glob("tessera-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"device/deploy/{name}" for name in FILES} <= names
    _run(sys.executable, "-m", "venv", "--system-site-packages", top / "venv", cwd=top)
    _run(top / "venv" / "bin" / "python", "-m", "pip", "install", "-q", "--no-index",
         wheel, cwd=top)
    return top / "venv"


def test_installed_wheel_writes_the_files_and_systemd_accepts_them(
        venv: Path, tmp_path: Path) -> None:
    agent = venv / "bin" / "tessera-agent"
    # the package files are in the venv, identical to the checkout's (the only copy)
    site = Path(_run(venv / "bin" / "python", "-c", "import device, os; "
                     "print(os.path.dirname(device.__file__))", cwd=tmp_path).stdout.strip())
    assert site.is_relative_to(venv)
    for name in FILES:
        assert (site / "deploy" / name).read_bytes() == (PACKAGED / name).read_bytes()

    root = tmp_path / "root"
    root.mkdir()
    done = _run(agent, "install-service", "--root", root, cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert lines[:4] == [*(f"{root / where}: written" for where in FILES.values()),
                         "next, as root:"]
    steps = [line.strip() for line in lines[4:]]
    assert steps == [f"systemd-sysusers --root={root} tessera.conf",
                     f"systemd-tmpfiles --root={root} --create tessera.conf",
                     f"systemctl --root={root} enable tessera-agent"]
    assert done.stderr == ""
    # ExecStart= names this venv's tessera-agent, nothing points into the checkout
    check_written(root, agent)
    assert str(ROOT) not in (root / UNIT).read_text()

    # the same again: nothing rewritten
    before = snapshot(root)
    again = _run(agent, "install-service", "--root", root, cwd=tmp_path)
    assert again.stdout.splitlines()[:3] == [f"{root / w}: unchanged" for w in FILES.values()]
    assert snapshot(root) == before

    # the printed commands make the account, its state directory and the enablement
    for step in steps:
        ran = subprocess.run(shlex.split(step), capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, f"{step}: {ran.stderr}"
    users = {line.split(":")[0]: line.split(":")
             for line in (root / "etc" / "passwd").read_text().splitlines()}
    assert users["tessera"][5] == "/var/lib/tessera"
    state = (root / "var" / "lib" / "tessera").stat()
    assert (state.st_mode & 0o7777, state.st_uid) == (0o700, int(users["tessera"][2]))
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    assert os.readlink(wants / "tessera-agent.service") == "/" + UNIT

    # systemd's parser and its exposure rating accept the written unit
    verify = subprocess.run(["systemd-analyze", "verify", str(root / UNIT)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert "Unknown key" not in verify.stderr and "Unknown section" not in verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                               str(root / UNIT)], capture_output=True, text=True, timeout=60)
    last = security.stdout.strip().splitlines()[-1]
    assert "Overall exposure level for tessera-agent.service:" in last, security.stdout
    assert float(last.split(":")[1].split()[0]) <= 2.0, last


def test_an_edited_file_is_refused_and_nothing_is_written_without_force(
        venv: Path, tmp_path: Path) -> None:
    agent = venv / "bin" / "tessera-agent"
    root = tmp_path / "root"
    root.mkdir()
    _run(agent, "install-service", "--root", root, cwd=tmp_path)
    unit = root / UNIT
    unit.write_text(unit.read_text().replace("RestartSec=5", "RestartSec=7"))
    (root / FILES["tmpfiles.d/tessera.conf"]).unlink()  # would be written: must not be
    before = snapshot(root)
    for extra in ([], ["--dry-run"]):
        done = _run(agent, "install-service", "--root", root, *extra, cwd=tmp_path,
                    check=False)
        assert done.returncode == 1, extra
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert done.stderr.startswith(
            f"tessera-agent: error: {unit}: not as install-service wrote it (edited, or "
            "installed by hand); nothing written:"), done.stderr
        assert "pass --force to replace it" in done.stderr
        assert snapshot(root) == before

    done = _run(agent, "install-service", "--root", root, "--force", cwd=tmp_path)
    assert f"{unit}: replaced (--force)" in done.stdout.splitlines()
    assert f"{root / FILES['tmpfiles.d/tessera.conf']}: written" in done.stdout.splitlines()
    check_written(root, agent)


# -- in process (the checkout's package files, the dev venv's tessera-agent) ------------

AGENT = Path(sysconfig.get_path("scripts")) / "tessera-agent"


def test_a_file_installed_by_hand_is_refused(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # what docs/AGENT.md had admins do before: install -m 0644 deploy/sysusers.d/...
    target = tmp_path / FILES["sysusers.d/tessera.conf"]
    target.parent.mkdir(parents=True)
    target.write_bytes((PACKAGED / "sysusers.d" / "tessera.conf").read_bytes())
    before = snapshot(tmp_path)
    assert main(["install-service", "--root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"tessera-agent: error: {target}: not as install-service wrote it")
    assert snapshot(tmp_path) == before


def test_an_unedited_file_from_an_earlier_version_is_updated_without_force(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-service", "--root", str(tmp_path)]) == 0
    unit = tmp_path / UNIT
    old = expected("tessera-agent.service", AGENT).replace("RestartSec=5", "RestartSec=10")
    unit.write_text("# Written by tessera-agent install-service (tessera 0.0.9), sha256 of "
                    f"the lines below: {hashlib.sha256(old.encode()).hexdigest()}.\n{old}")
    capsys.readouterr()
    assert main(["--json", "install-service", "--root", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["files"] == {str(tmp_path / FILES["sysusers.d/tessera.conf"]): "unchanged",
                               str(tmp_path / FILES["tmpfiles.d/tessera.conf"]): "unchanged",
                               str(unit): "updated"}
    check_written(tmp_path, AGENT)


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-service", "--root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"{tmp_path / w}: would be written" for w in FILES.values()]
    assert list(tmp_path.iterdir()) == []


def test_root_that_is_not_a_directory_is_refused(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "image"
    assert main(["install-service", "--root", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"tessera-agent: error: --root {missing}: not a directory (give an "
                   "existing directory, or / for this system) [bad_configuration]\n")
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_cannot_be_written_leaves_nothing_behind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the unit is written last: the two files before it are staged, then taken back
    (tmp_path / "etc").write_text("a file where a directory should be\n")
    before = snapshot(tmp_path)
    assert main(["install-service", "--root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"tessera-agent: error: cannot write {tmp_path / UNIT}: Not a "
                          "directory; nothing written: run as root, or pass --root DIR")
    assert snapshot(tmp_path) == before  # no files, no directories left
