"""`tessera-agent install-service`: the agent's systemd files, from the installed package.

The package ships three files in ``device/deploy/`` (package data, the only copy):

    tessera-agent.service  -> ROOT/etc/systemd/system/tessera-agent.service
    sysusers.d/tessera.conf -> ROOT/usr/lib/sysusers.d/tessera.conf  (the tessera account)
    tmpfiles.d/tessera.conf -> ROOT/usr/lib/tmpfiles.d/tessera.conf  (/var/lib/tessera)

The unit's ``ExecStart=`` names ``/opt/tessera/venv/bin/tessera-agent`` in the package;
the installed copy names the tessera-agent this command runs as (the script of the
running interpreter's install), so it works wherever pip put it.

Each written file starts with a comment line recording the tessera version and the
SHA-256 of the lines after it. A file whose lines still match its recorded hash was
written by this command and not edited since: it is replaced by the current version (an
upgrade). A file that differs otherwise (edited, or installed by hand) is refused
unless ``force``, and then nothing at all is written. A file identical to what would be
written is left as it is.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from structauth.errors import ConfigurationError

#: the unit's ExecStart= program in the package copy (and the docs' venv)
PACKAGED_AGENT = "/opt/tessera/venv/bin/tessera-agent"
MODE = 0o644

#: package file (under device/deploy) -> where it goes, relative to the root
TARGETS = (
    ("sysusers.d/tessera.conf", "usr/lib/sysusers.d/tessera.conf"),
    ("tmpfiles.d/tessera.conf", "usr/lib/tmpfiles.d/tessera.conf"),
    ("tessera-agent.service", "etc/systemd/system/tessera-agent.service"),
)

_HEADER = re.compile(r"# Written by tessera-agent install-service \(tessera (\S+)\), "
                     r"sha256 of the lines below: ([0-9a-f]{64})\.")


@dataclass(frozen=True)
class Planned:
    path: Path
    content: bytes
    status: str  # new | unchanged | updated | changed (refused without force) | replaced


def packaged(name: str) -> str:
    """The text of a file shipped in device/deploy (``name`` as in TARGETS)."""
    resource = files("device").joinpath("deploy", *name.split("/"))
    try:
        return resource.read_text(encoding="utf-8")
    except OSError:
        raise ConfigurationError(
            f"the package file device/deploy/{name} is missing from this install: "
            "pip install --force-reinstall 'tessera[device-tpm]'") from None


def agent_script() -> str:
    """The tessera-agent this process runs as: argv[0] when that is the script, else the
    one in the running interpreter's scripts directory."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "tessera-agent" and argv0.is_file():
        return os.path.abspath(argv0)
    script = Path(sysconfig.get_path("scripts")) / "tessera-agent"
    if not script.is_file():
        raise ConfigurationError(
            f"no tessera-agent script at {script} to name in ExecStart=: run the "
            "tessera-agent that pip installed (e.g. /opt/tessera/venv/bin/tessera-agent "
            "install-service)")
    return str(script)


def _systemd_word(path: str) -> str:
    """``path`` as one ExecStart= word: % doubled, quoted when it holds blanks/quotes."""
    path = path.replace("%", "%%")
    if re.search(r"[\s\"'\\;]", path):
        return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return path


def render(name: str, version: str, agent: str) -> bytes:
    """What install-service writes for package file ``name``: the header line, then the
    package file (for the unit, with ExecStart= naming ``agent``)."""
    body = packaged(name)
    if name.endswith(".service"):
        lines = body.splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
        if len(starts) != 1 or not lines[starts[0]].startswith(f"ExecStart={PACKAGED_AGENT} "):
            raise ConfigurationError(
                f"the package file device/deploy/{name} has no 'ExecStart={PACKAGED_AGENT} "
                "...' line: pip install --force-reinstall 'tessera[device-tpm]'")
        i = starts[0]
        lines[i] = lines[i].replace(PACKAGED_AGENT, _systemd_word(agent), 1)
        body = "".join(lines)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return (f"# Written by tessera-agent install-service (tessera {version}), sha256 of "
            f"the lines below: {digest}.\n{body}").encode()


def _pristine(old: bytes) -> bool:
    """Whether ``old`` is a file this command wrote and nobody edited since."""
    first, _, rest = old.partition(b"\n")
    match = _HEADER.fullmatch(first.decode("utf-8", "replace"))
    return match is not None and hashlib.sha256(rest).hexdigest() == match.group(2)


def plan(root: Path, version: str, agent: str, force: bool) -> list[Planned]:
    """What install-service would do under ``root``; refuses (ConfigurationError, one
    line) when a file differs and was edited, unless ``force``."""
    if not root.is_dir():
        raise ConfigurationError(f"--root {root}: not a directory (give an existing "
                                 "directory, or / for this system)")
    out = []
    for name, where in TARGETS:
        path = root / where
        content = render(name, version, agent)
        try:
            old: bytes | None = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            old = None  # absent (writing it says why when it cannot be)
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}; nothing "
                                     "written: run as root, or pass --root DIR") from None
        if old is None:
            status = "new"
        elif old == content:
            status = "unchanged"
        elif _pristine(old):
            status = "updated"
        else:
            status = "replaced" if force else "changed"
        out.append(Planned(path, content, status))
    edited = [str(p.path) for p in out if p.status == "changed"]
    if edited:
        raise ConfigurationError(
            f"{', '.join(edited)}: not as install-service wrote it (edited, or installed "
            "by hand); nothing written: move local changes to an override (systemctl edit "
            "tessera-agent; /etc/sysusers.d, /etc/tmpfiles.d) and pass --force to replace "
            f"{'it' if len(edited) == 1 else 'them'}")
    return out


def write(planned: list[Planned]) -> None:
    """Write every new or changed file (mode 0644, directories 0755 as needed), all or
    none: each goes to a temporary file beside its target first, then all are renamed."""
    staged: list[tuple[Path, Path]] = []
    made: list[Path] = []  # directories this call created, deepest last
    target = Path()
    try:
        for p in planned:
            if p.status == "unchanged":
                continue
            target = p.path
            missing = [d for d in p.path.parents if not d.exists()]
            for d in reversed(missing):
                d.mkdir()
                made.append(d)
                os.chmod(d, 0o755)  # not narrowed by the umask
            fd, name = tempfile.mkstemp(dir=p.path.parent, prefix=f".{p.path.name}.")
            staged.append((Path(name), p.path))
            with os.fdopen(fd, "wb") as f:
                f.write(p.content)
            os.chmod(name, MODE)
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for d in reversed(made):
            d.rmdir()
        raise ConfigurationError(f"cannot write {target}: {exc.strerror or exc}; nothing "
                                 "written: run as root, or pass --root DIR") from None
    for tmp, path in staged:
        os.replace(tmp, path)


def next_commands(root: Path) -> list[str]:
    """The commands that apply the files (for another root: into that image)."""
    if root.resolve() == Path("/"):
        return ["systemd-sysusers tessera.conf", "systemd-tmpfiles --create tessera.conf",
                "systemctl daemon-reload", "systemctl enable --now tessera-agent"]
    return [f"systemd-sysusers --root={root} tessera.conf",
            f"systemd-tmpfiles --root={root} --create tessera.conf",
            f"systemctl --root={root} enable tessera-agent"]
