"""Build the Mosquitto plugin: the native shim that embeds this Python.

``python -m broker_plugin.build [--check]`` compiles ``shim/tessera_mosquitto.c`` with
gcc against the Mosquitto plugin headers and the libpython of the interpreter running
this module (so run it with the venv's python), into ``_native/tessera_mosquitto.so``,
and prints the path to put in mosquitto.conf (``plugin <path>`` together with
``plugin_opt_python <that python>``). It rebuilds only when the source, the headers, the
interpreter or the flags change. ``--check`` builds nothing: exit status 0 when the
plugin is up to date, 1 when it needs a build.

:func:`readable_by` lists what a broker running as another user (Debian's broker drops
to ``mosquitto`` before it loads plugins) could not read: the plugin, the interpreter,
libpython, the standard library, the venv, the project.
"""

from __future__ import annotations

import argparse
import grp
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from structauth.errors import ConfigurationError

__all__ = [
    "BuildError", "build_fast_module", "ensure_built", "is_up_to_date", "plugin_path",
    "readable_by", "sanitizer_env", "sanitizing",
]

PACKAGE = Path(__file__).resolve().parent
SOURCE = PACKAGE / "shim" / "tessera_mosquitto.c"
#: the fast lane (per-message verify in C), linked into the plugin and buildable alone
FAST_SOURCES = (PACKAGE / "shim" / "fastlane.c", PACKAGE / "shim" / "blake2s.c")
_FAST_HEADERS = (PACKAGE / "shim" / "fastlane.h", PACKAGE / "shim" / "blake2s.h")
NATIVE = PACKAGE / "_native"
SETUP_HINT = "./run setup"
_HEADER_DIRS = ("/usr/include", "/usr/local/include")
_CFLAGS = ("-shared", "-fPIC", "-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
#: ``TESSERA_SANITIZE=1`` builds a separate plugin and fast lane with AddressSanitizer and
#: UndefinedBehaviorSanitizer (any UB report aborts), for the sanitizer test run; the
#: process that loads them needs the sanitizer runtimes preloaded (:func:`sanitizer_env`).
SANITIZE_ENV = "TESSERA_SANITIZE"
_SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                   "-fno-omit-frame-pointer")


def sanitizing() -> bool:
    """True when this process builds and uses the sanitizer variant."""
    return os.environ.get(SANITIZE_ENV, "") not in ("", "0")


def _cflags() -> tuple[str, ...]:
    return _CFLAGS + _SANITIZE_FLAGS if sanitizing() else _CFLAGS


def sanitizer_env(report_dir: Path) -> dict[str, str]:
    """Environment for a process (mosquitto, python) that loads sanitized code: the ASan
    and UBSan runtimes preloaded, reports written under ``report_dir`` (one file per
    report, so a test asserts there are none). Leak detection is off: CPython keeps
    memory alive until exit by design, which is not what this run looks for."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError(f"gcc missing: install gcc ({SETUP_HINT})")
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        found = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True,
                               text=True).stdout.strip()
        if not found or not Path(found).exists():
            raise BuildError(f"{name} missing: install gcc's sanitizer runtimes")
        libs.append(str(Path(found).resolve()))
    report_dir.mkdir(parents=True, exist_ok=True)
    return {
        "LD_PRELOAD": " ".join(libs),
        "ASAN_OPTIONS": f"detect_leaks=0:log_path={report_dir}/asan:abort_on_error=0",
        "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={report_dir}/ubsan",
    }


class BuildError(ConfigurationError):
    """The plugin cannot be built here; the message says what to install or fix."""


def _native() -> Path:
    return NATIVE / "sanitize" if sanitizing() else NATIVE


def plugin_path() -> Path:
    """Where the built plugin is (or will be)."""
    return _native() / "tessera_mosquitto.so"


def _stamp_path() -> Path:
    return _native() / "tessera_mosquitto.stamp"


def _mosquitto_include() -> Path:
    extra = os.environ.get("TESSERA_MOSQUITTO_INCLUDE")
    for d in ([extra] if extra else []) + list(_HEADER_DIRS):
        if all((Path(d) / h).is_file() for h in ("mosquitto_broker.h", "mosquitto_plugin.h")):
            return Path(d)
    raise BuildError(f"mosquitto_broker.h missing: install mosquitto-dev ({SETUP_HINT})")


def _libpython() -> tuple[Path, Path, str]:
    """(include dir, lib dir, -l name) of the running interpreter's shared libpython."""
    include = Path(sysconfig.get_config_var("INCLUDEPY") or "")
    if not (include / "Python.h").is_file():
        raise BuildError(f"Python.h missing in {include}: install python3-dev ({SETUP_HINT})")
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    ldversion = sysconfig.get_config_var("LDVERSION") or sysconfig.get_config_var("VERSION")
    candidates = [sysconfig.get_config_var("LDLIBRARY") or "", f"libpython{ldversion}.so"]
    for name in candidates:
        if name.endswith(".so") and (libdir / name).exists():
            return include, libdir, name[len("lib"):-len(".so")]
    raise BuildError(
        f"no shared libpython{ldversion}.so in {libdir}: this Python ({sys.executable}) cannot "
        "be embedded; use one built with --enable-shared (Debian's python3 is)"
    )


def _recipe() -> tuple[list[str], str]:
    """The gcc command line (output path last) and a digest of everything that shapes the
    result: source, headers, interpreter, flags."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError(f"gcc missing: install gcc ({SETUP_HINT})")
    if not SOURCE.is_file():
        raise BuildError(f"plugin source missing: {SOURCE} (reinstall tessera)")
    mosq = _mosquitto_include()
    include, libdir, lib = _libpython()
    cmd = [gcc, *_cflags(), f"-I{include}", f"-I{mosq}", str(SOURCE), *map(str, FAST_SOURCES),
           f"-L{libdir}", f"-l{lib}", f"-Wl,-rpath,{libdir}", "-o"]
    digest = hashlib.sha256()
    for part in (SOURCE, *FAST_SOURCES, *_FAST_HEADERS, mosq / "mosquitto_broker.h",
                 mosq / "mosquitto_plugin.h"):
        digest.update(part.read_bytes())
    libfile = (libdir / f"lib{lib}.so").resolve()
    st = libfile.stat()
    digest.update(json.dumps([cmd, sys.version, str(libfile), st.st_size, st.st_mtime_ns]).encode())
    return cmd, digest.hexdigest()


def build_fast_module(directory: Path) -> Path:
    """Build the fast lane alone as the Python extension ``tessera_fast`` in
    ``directory`` (the plugin has it built in): for tests, which compare it with
    structauth's reference verify, and for measuring it outside a broker."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError(f"gcc missing: install gcc ({SETUP_HINT})")
    include, _, _ = _libpython()
    out = Path(directory) / f"tessera_fast{sysconfig.get_config_var('EXT_SUFFIX')}"
    done = subprocess.run([gcc, *_cflags(), f"-I{include}", *map(str, FAST_SOURCES), "-o",
                           str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"building the fast lane failed: {(done.stderr or done.stdout).strip()}")
    return out


def is_up_to_date() -> bool:
    """True when the built plugin matches the source, headers and this interpreter."""
    _, digest = _recipe()
    stamp = _stamp_path()
    return plugin_path().is_file() and stamp.is_file() and stamp.read_text().strip() == digest


def ensure_built() -> Path:
    """Build the plugin unless it is up to date; its path. BuildError says why not."""
    cmd, digest = _recipe()
    out, stamp = plugin_path(), _stamp_path()
    if out.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: a broker or a concurrent build never sees half a file
    fd, tmp = tempfile.mkstemp(prefix=".tessera_mosquitto.", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cmd, tmp], capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).splitlines()
            first = next((ln for ln in lines if "error" in ln), lines[0] if lines else "")
            raise BuildError(f"building the Mosquitto plugin failed: {first.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp.write_text(digest + "\n")
    return out


# --- can another user (the broker's) read what the plugin needs? -------------------


def _allowed(st: os.stat_result, uid: int, gids: set[int], bits: int) -> bool:
    """POSIX permission check (ACLs ignored) of `bits` (a combination of 4=r, 1=x)."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        mode = (st.st_mode >> 6) & 7
    elif st.st_gid in gids:
        mode = (st.st_mode >> 3) & 7
    else:
        mode = st.st_mode & 7
    return mode & bits == bits


def _blocked(path: Path, uid: int, gids: set[int]) -> str | None:
    """The first component of `path` (or of where its symlinks lead) that the user
    cannot traverse or read, or None."""
    seen: set[Path] = set()
    todo = [Path(os.path.abspath(path))]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for parent in reversed(p.parents):
            try:
                if not _allowed(parent.stat(), uid, gids, 1):
                    return str(parent)
            except OSError:
                return str(parent)
        if p.is_symlink():  # judge where it leads, reporting the real culprit
            todo.append(Path(os.path.normpath(os.path.join(p.parent, os.readlink(p)))))
            continue
        try:
            st = p.stat()
        except OSError:
            return str(p)
        need = 5 if stat.S_ISDIR(st.st_mode) else 4  # list a directory, read a file
        if not _allowed(st, uid, gids, need):
            return str(p)
    return None


def needed_paths() -> list[Path]:
    """What the broker process opens to run the plugin and the host."""
    _, libdir, lib = _libpython()
    paths = [plugin_path(), Path(sys.executable), libdir / f"lib{lib}.so",
             Path(sysconfig.get_path("stdlib")), Path(sysconfig.get_path("platstdlib")),
             Path(sysconfig.get_path("purelib")), PACKAGE.parent]
    out: list[Path] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def readable_by(user: str) -> list[str]:
    """Paths the plugin needs that `user` cannot read (each with the first component
    that stops it); empty when the broker may run as that user."""
    pw = pwd.getpwnam(user)
    gids = set(os.getgrouplist(user, pw.pw_gid)) | {pw.pw_gid}
    gids |= {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    problems = []
    for p in needed_paths():
        where = _blocked(p, pw.pw_uid, gids)
        if where is not None:
            problems.append(f"{p} (stopped at {where})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker_plugin.build",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only tell whether a build is needed")
    args = parser.parse_args(argv)
    try:
        if args.check:
            fresh = is_up_to_date()
            print(f"{plugin_path()} {'up to date' if fresh else 'needs a build'}")
            return 0 if fresh else 1
        print(ensure_built())
        return 0
    except BuildError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
