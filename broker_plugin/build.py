"""Build the Mosquitto plugin: the native shim that embeds this Python.

    python -m broker_plugin.build --state-dir /var/lib/tessera-broker [--check] [--user U]

compiles ``shim/tessera_mosquitto.c`` (shipped in the wheel as package data) with gcc
against the Mosquitto plugin headers and the libpython of the interpreter running this
module (so run it with the venv's python) into ``<state dir>/plugin/
tessera_mosquitto.so``, and prints the mosquitto.conf lines that load it (``plugin
<path>`` and ``plugin_opt_python <this python>``). It rebuilds only when the source, the
headers, the interpreter or the flags change. ``--check`` builds nothing: exit status 0
when the plugin is up to date, 1 when it needs a build. ``--user`` (e.g. ``mosquitto``)
also checks that the account the broker drops to can read everything the plugin needs.

Where the plugin goes when no directory is given (:func:`default_plugin_dir`):
``$TESSERA_PLUGIN_DIR``; in a source checkout, ``broker_plugin/_native``; otherwise
``$XDG_STATE_HOME/tessera/plugin`` (``~/.local/state``). Never into site-packages of an
installed package.

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
#: where the build goes when no directory is given (overrides the defaults below)
PLUGIN_DIR_ENV = "TESSERA_PLUGIN_DIR"
SETUP_HINT = "./run setup"
#: the Debian/Ubuntu/Raspberry Pi OS package that provides each build input
_APT = {
    "mosquitto_broker.h": "mosquitto-dev",
    "Python.h": "python3-dev",
    "gcc": "gcc",
}
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


def _install_hint(what: str) -> str:
    """How to get a missing build input: the apt package (plus the checkout's setup)."""
    package = _APT[what]
    hint = f"apt install {package}"
    if in_checkout():
        hint += f", or {SETUP_HINT}"
    return f"install {package} ({hint})"


def in_checkout() -> bool:
    """True when this module runs from a source checkout (not from an installed wheel)."""
    return (PACKAGE.parent / "pyproject.toml").is_file() and "-packages" not in PACKAGE.parts[-2]


def default_plugin_dir() -> Path:
    """Where the plugin is built when no directory is given (see the module doc)."""
    env = os.environ.get(PLUGIN_DIR_ENV)
    if env:
        return Path(env).resolve()
    if in_checkout():
        return NATIVE
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "tessera" / "plugin"


def _native(directory: Path | None = None) -> Path:
    base = Path(directory).resolve() if directory is not None else default_plugin_dir()
    return base / "sanitize" if sanitizing() else base


def plugin_path(directory: Path | None = None) -> Path:
    """Where the built plugin is (or will be); ``directory`` as in :func:`ensure_built`."""
    return _native(directory) / "tessera_mosquitto.so"


def _stamp_path(directory: Path | None = None) -> Path:
    return _native(directory) / "tessera_mosquitto.stamp"


def _mosquitto_include() -> Path:
    # TESSERA_MOSQUITTO_INCLUDE, when set, is the only place looked at: the operator chose it
    extra = os.environ.get("TESSERA_MOSQUITTO_INCLUDE")
    dirs = [extra] if extra else list(_HEADER_DIRS)
    for d in dirs:
        if all((Path(d) / h).is_file() for h in ("mosquitto_broker.h", "mosquitto_plugin.h")):
            return Path(d)
    return _missing("mosquitto_broker.h", f"in {', '.join(dirs)}")


def _missing(what: str, where: str) -> Path:
    raise BuildError(f"{what} missing ({where}): {_install_hint(what)}")


def _libpython() -> tuple[Path, Path, str]:
    """(include dir, lib dir, -l name) of the running interpreter's shared libpython."""
    include = Path(sysconfig.get_config_var("INCLUDEPY") or "")
    if not (include / "Python.h").is_file():
        _missing("Python.h", f"in {include}")
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


def _gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        _missing("gcc", "not on PATH")
    assert gcc is not None
    return gcc


def _check_sources() -> None:
    """The shim's C files ship in the wheel (package data); name any that are not here."""
    for path in (SOURCE, *FAST_SOURCES, *_FAST_HEADERS):
        if not path.is_file():
            raise BuildError(
                f"plugin source missing: {path} (this install of tessera lacks its "
                "package data; reinstall it: pip install --force-reinstall 'tessera[broker]')"
            )


def _recipe() -> tuple[list[str], str]:
    """The gcc command line (output path last) and a digest of everything that shapes the
    result: source, headers, interpreter, flags."""
    gcc = _gcc()
    _check_sources()
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
    gcc = _gcc()
    _check_sources()
    include, _, _ = _libpython()
    out = Path(directory) / f"tessera_fast{sysconfig.get_config_var('EXT_SUFFIX')}"
    done = subprocess.run([gcc, *_cflags(), f"-I{include}", *map(str, FAST_SOURCES), "-o",
                           str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"building the fast lane failed: {(done.stderr or done.stdout).strip()}")
    return out


def is_up_to_date(directory: Path | None = None) -> bool:
    """True when the built plugin matches the source, headers and this interpreter."""
    _, digest = _recipe()
    stamp = _stamp_path(directory)
    return (plugin_path(directory).is_file() and stamp.is_file()
            and stamp.read_text().strip() == digest)


def ensure_built(directory: Path | None = None) -> Path:
    """Build the plugin into ``directory`` (default: :func:`default_plugin_dir`) unless
    it is up to date there; its path. BuildError says why not, in one line."""
    cmd, digest = _recipe()
    out, stamp = plugin_path(directory), _stamp_path(directory)
    if out.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create {out.parent}: {exc.strerror}; choose a writable "
                         "--state-dir") from None
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
    """POSIX permission check (ACLs ignored) of `bits` (a combination of 4=r, 2=w,
    1=x)."""
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


def needed_paths(directory: Path | None = None) -> list[Path]:
    """What the broker process opens to run the plugin and the host."""
    _, libdir, lib = _libpython()
    paths = [plugin_path(directory), Path(sys.executable), libdir / f"lib{lib}.so",
             Path(sysconfig.get_path("stdlib")), Path(sysconfig.get_path("platstdlib")),
             Path(sysconfig.get_path("purelib")), PACKAGE.parent]
    out: list[Path] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def _unwritable(path: Path, uid: int, gids: set[int]) -> str | None:
    """Why `user` cannot write `path` as the plugin does (create it, or a temporary
    file beside it renamed over it): its directory must exist (the plugin creates no
    directories) and allow write and search, an existing file read and write. None
    when it can."""
    path = Path(os.path.abspath(path))
    parent = path.parent
    if not parent.is_dir():
        return f"its directory {parent} does not exist; create it"
    where = _blocked(parent, uid, gids)
    if where is None and not _allowed(parent.stat(), uid, gids, 3):
        where = str(parent)
    if where is None and path.exists() and not _allowed(path.stat(), uid, gids, 6):
        where = str(path)
    return None if where is None else f"stopped at {where}"


def readable_by(user: str, directory: Path | None = None, *, read: tuple[Path, ...] = (),
                write: tuple[Path, ...] = ()) -> list[str]:
    """Paths the plugin needs that `user` cannot read (the plugin, this Python and the
    package, then ``read``) or write (``write``: the audit log, state files), each with
    the first component that stops it; empty when the broker may run as that user."""
    pw = pwd.getpwnam(user)
    gids = set(os.getgrouplist(user, pw.pw_gid)) | {pw.pw_gid}
    gids |= {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    problems = []
    # a file of `read` that is missing is left to the checks that open it
    for p in [*needed_paths(directory), *(r for r in read if os.path.lexists(r))]:
        where = _blocked(p, pw.pw_uid, gids)
        if where is not None:
            problems.append(f"{p} (stopped at {where})")
    for p in write:
        why = _unwritable(p, pw.pw_uid, gids)
        if why is not None:
            problems.append(f"{p} (cannot write: {why})")
    return problems


def conf_lines(plugin: Path) -> list[str]:
    """The mosquitto.conf lines that load ``plugin`` with this interpreter."""
    return [
        f"# Tessera plugin, built by '{Path(sys.executable).name} -m broker_plugin.build'",
        f"plugin {plugin}",
        f"plugin_opt_python {sys.executable}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker_plugin.build",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="build into DIR/plugin (default: see the module doc; never "
                             "site-packages)")
    parser.add_argument("--check", action="store_true", help="only tell whether a build is needed")
    parser.add_argument("--user", metavar="USER",
                        help="also check that USER (the account mosquitto drops to) can read "
                             "the plugin, this Python and the installed package")
    args = parser.parse_args(argv)
    directory = args.state_dir / "plugin" if args.state_dir is not None else None
    try:
        if args.check:
            fresh = is_up_to_date(directory)
            print(f"{plugin_path(directory)} {'up to date' if fresh else 'needs a build'}")
            return 0 if fresh else 1
        plugin = ensure_built(directory)
        if args.user:
            try:
                blocked = readable_by(args.user, directory)
            except KeyError:
                raise BuildError(f"--user {args.user}: no such user") from None
            if blocked:
                raise BuildError(f"user {args.user} cannot read {blocked[0]}: build into a "
                                 "--state-dir and install tessera where that user can read")
        print("\n".join(conf_lines(plugin)))
        return 0
    except BuildError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2
    except OSError as exc:  # anything else the file system refuses: one line, no traceback
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
