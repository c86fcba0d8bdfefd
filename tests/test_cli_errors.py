"""Every `tessera` error is one line on stderr and exit 1, names the file or flag and
the fix, and changes nothing (issue 13 point 4; docs/ENROLLMENT.md "Errors and exit
codes"). One parametrized matrix over the bad inputs the issue lists.

Full and read-only file systems are real: small tmpfs mounts (64 KiB, one filled, one
read-only), which needs root; without root those cases are skipped (a chmod'ed
directory proves nothing to root and is not used instead)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESSERA = str(Path(sys.executable).parent / "tessera")


@dataclass
class Case:
    argv: list[str]
    expect: str  # a fragment the one line must hold (the flag or file, or the fix)
    watch: list[Path] = field(default_factory=list)  # must be unchanged (or still absent)
    env: dict[str, str] = field(default_factory=dict)


def snapshot(paths: list[Path]) -> dict[str, object]:
    out: dict[str, object] = {}
    for path in paths:
        if not path.exists():
            out[str(path)] = None
        elif path.is_file():
            out[str(path)] = path.read_bytes()
        else:
            out[str(path)] = sorted(
                (str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"<dir>")
                for p in path.rglob("*")
            )
    return out


class Mounts:
    """A full and a read-only tmpfs, or None when we cannot mount (not root)."""

    def __init__(self, base: Path) -> None:
        self.full = base / "full"
        self.ro = base / "ro"
        self.mounted: list[Path] = []
        if os.geteuid() != 0:
            return
        for path, opts in ((self.full, "size=64k"), (self.ro, "size=64k,ro")):
            path.mkdir()
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                  capture_output=True)
            if done.returncode != 0:
                self.close()
                return
            self.mounted.append(path)
        # fill it: nothing more fits
        fd = os.open(self.full / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)

    @property
    def ok(self) -> bool:
        return len(self.mounted) == 2

    def close(self) -> None:
        for path in self.mounted:
            subprocess.run(["umount", str(path)], capture_output=True)
        self.mounted = []


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    base = tmp_path_factory.mktemp("cli-errors")
    # an authority to point serve at (file key: these cases never reach the token)
    auth = base / "auth"
    done = subprocess.run([TESSERA, "init", "--dir", str(auth), "--trust-domain", "t.test",
                           "--insecure-file-key"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (base / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    (base / "truncated.pem").write_text(
        (auth / "root.pem").read_text()[:200])  # a real certificate, cut off
    (base / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (base / "nul.csv").write_bytes(b"serial,tpm\nx\0y,device:/dev/null\n")
    (base / "policy.toml").write_text("")

    class NotJson(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body>It works!</body></html>"
            kind = "text/html"
            if self.path == "/v1/bundle" and self.headers.get("X-Test") is None:
                # the real bundle: export-bundle's own errors are what is tested
                body, kind = (auth / "root.pem").read_bytes(), "application/x-pem-file"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotJson)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    mounts = Mounts(base)
    try:
        yield {"base": base, "auth": auth, "html": f"http://127.0.0.1:{server.server_port}",
               "mounts": mounts}
    finally:
        mounts.close()
        server.shutdown()


def service_dir(base: Path, name: str, text: str | bytes | None, *,
                as_directory: bool = False) -> Path:
    """A copy of the authority with service.toml replaced by ``text``."""
    directory = base / name
    if not directory.exists():
        directory.mkdir()
        for f in (base / "auth").iterdir():
            if f.is_file() and f.name != "service.toml":
                (directory / f.name).write_bytes(f.read_bytes())
    target = directory / "service.toml"
    if as_directory:
        target.mkdir(exist_ok=True)
    elif text is not None:
        target.write_bytes(text.encode() if isinstance(text, str) else text)
    return directory


def registry_line(base: Path) -> str:
    return f'registry = "sqlite:///{base / "auth" / "registry.db"}"\n'


def init(directory: Path, *extra: str) -> list[str]:
    return [TESSERA, "init", "--dir", str(directory), "--trust-domain", "t.test",
            "--insecure-file-key", *extra]


CASES: dict[str, Callable[[dict[str, object]], Case]] = {}


def case(name: str) -> Callable[[Callable[[dict[str, object]], Case]],
                                Callable[[dict[str, object]], Case]]:
    def register(fn: Callable[[dict[str, object]], Case]) -> Callable[[dict[str, object]], Case]:
        CASES[name] = fn
        return fn
    return register


def _b(w: dict[str, object]) -> Path:
    base = w["base"]
    assert isinstance(base, Path)
    return base


# -- service.toml ----------------------------------------------------------------------

@case("service-toml-missing")
def _(w: dict[str, object]) -> Case:
    d = _b(w) / "empty"
    d.mkdir(exist_ok=True)
    return Case([TESSERA, "serve", "--dir", str(d)], "run 'tessera init", [d])


@case("service-toml-registry-not-a-string")
def _(w: dict[str, object]) -> Case:
    d = service_dir(_b(w), "types1", "registry = 5\n")
    return Case([TESSERA, "serve", "--dir", str(d)], "registry must be a string", [d])


@case("service-toml-roots-not-a-list")
def _(w: dict[str, object]) -> Case:
    d = service_dir(_b(w), "types2", registry_line(_b(w)) + 'tpm_maker_roots = "x.pem"\n')
    return Case([TESSERA, "serve", "--dir", str(d)], "tpm_maker_roots must be a list", [d])


@case("service-toml-lifetime-a-string")
def _(w: dict[str, object]) -> Case:
    d = service_dir(_b(w), "types3",
                    registry_line(_b(w)) + 'operational_lifetime_minutes = "60"\n')
    return Case([TESSERA, "serve", "--dir", str(d)], "operational_lifetime_minutes", [d])


@case("service-toml-lifetime-zero-at-serve")
def _(w: dict[str, object]) -> Case:
    d = service_dir(_b(w), "types4", registry_line(_b(w)) + "operational_lifetime_minutes = 0\n")
    return Case([TESSERA, "serve", "--dir", str(d)], "operational_lifetime_minutes", [d])


@case("service-toml-lifetime-huge-at-serve")
def _(w: dict[str, object]) -> Case:
    d = service_dir(_b(w), "types5",
                    registry_line(_b(w)) + "operational_lifetime_minutes = 99999999999999\n")
    return Case([TESSERA, "serve", "--dir", str(d)], "operational_lifetime_minutes", [d])


@case("service-toml-roots-truncated-at-serve")
def _(w: dict[str, object]) -> Case:
    d = service_dir(_b(w), "types6", registry_line(_b(w))
                    + f'tpm_maker_roots = ["{_b(w) / "truncated.pem"}"]\n')
    return Case([TESSERA, "serve", "--dir", str(d)], "tpm_maker_roots", [d])


@case("service-toml-not-toml")
def _(w: dict[str, object]) -> Case:
    d = service_dir(_b(w), "toml", "registry = \n[[[")
    return Case([TESSERA, "serve", "--dir", str(d)], "not valid TOML", [d])


@case("service-toml-not-utf8")
def _(w: dict[str, object]) -> Case:
    d = service_dir(_b(w), "utf8", b"registry = \"\xff\xfe\"\n")
    return Case([TESSERA, "serve", "--dir", str(d)], "not UTF-8", [d])


@case("service-toml-unreadable")
def _(w: dict[str, object]) -> Case:
    # root reads any file whatever its mode: a directory in its place is unreadable
    d = service_dir(_b(w), "unreadable", None, as_directory=True)
    return Case([TESSERA, "serve", "--dir", str(d)], "cannot read", [d])


# -- flags -------------------------------------------------------------------------------

for _value in ("0", "-5", "1000000000000", "abc"):
    @case(f"init-lifetime-{_value}")
    def _(w: dict[str, object], v: str = _value) -> Case:
        d = _b(w) / f"lifetime{v}"
        return Case(init(d, "--operational-lifetime", v), "--operational-lifetime", [d])

for _value in ("70000", "0", "http"):
    @case(f"serve-port-{_value}")
    def _(w: dict[str, object], v: str = _value) -> Case:
        return Case([TESSERA, "serve", "--dir", str(w["auth"]), "--port", v], "--port",
                    [_b(w) / "auth"])


@case("serve-tls-missing")
def _(w: dict[str, object]) -> Case:
    return Case([TESSERA, "serve", "--dir", str(w["auth"]), "--tls-cert",
                 str(_b(w) / "nope.pem"), "--tls-key", str(_b(w) / "nope.key")],
                "--tls-cert", [_b(w) / "auth"])


@case("serve-tls-only-cert")
def _(w: dict[str, object]) -> Case:
    return Case([TESSERA, "serve", "--dir", str(w["auth"]), "--tls-cert",
                 str(_b(w) / "garbage.pem")], "--tls-key", [_b(w) / "auth"])


@case("serve-tls-garbage")
def _(w: dict[str, object]) -> Case:
    g = str(_b(w) / "garbage.pem")
    return Case([TESSERA, "serve", "--dir", str(w["auth"]), "--tls-cert", g, "--tls-key", g],
                "--tls-cert", [_b(w) / "auth"])


for _cmd in ("show", "revoke"):
    for _serial in ("a b", "a\nb", "../x"):
        @case(f"{_cmd}-serial-{_serial!r}")
        def _(w: dict[str, object], c: str = _cmd, s: str = _serial) -> Case:
            return Case([TESSERA, c, s, "--provisioner", "http://127.0.0.1:9"], "serial",
                        env={"TESSERA_OPERATOR_TOKEN": "tso_x"})


@case("server-answers-html")
def _(w: dict[str, object]) -> Case:
    return Case([TESSERA, "list", "--provisioner", str(w["html"])], "not JSON",
                env={"TESSERA_OPERATOR_TOKEN": "tso_x"})


@case("server-unreachable")
def _(w: dict[str, object]) -> Case:
    return Case([TESSERA, "list", "--provisioner", "http://127.0.0.1:9"], "cannot reach",
                env={"TESSERA_OPERATOR_TOKEN": "tso_x"})


@case("batch-binary-csv")
def _(w: dict[str, object]) -> Case:
    return Case([TESSERA, "enroll", "--batch", str(_b(w) / "binary.csv"), "--provisioner",
                 "http://127.0.0.1:9"], "--batch", env={"TESSERA_OPERATOR_TOKEN": "tso_x"})


@case("batch-nul-csv")
def _(w: dict[str, object]) -> Case:
    return Case([TESSERA, "enroll", "--batch", str(_b(w) / "nul.csv"), "--provisioner",
                 "http://127.0.0.1:9"], "--batch", env={"TESSERA_OPERATOR_TOKEN": "tso_x"})


for _flag in ("--bundle", "--credential"):
    @case(f"broker-config-garbage{_flag}")
    def _(w: dict[str, object], f: str = _flag) -> Case:
        good = str(_b(w) / "auth" / "root.pem")
        files = {"--bundle": good, "--credential": good, f: str(_b(w) / "garbage.pem")}
        out = _b(w) / "mosquitto.conf"
        return Case([TESSERA, "broker", "config", "--trust-domain", "t.test",
                     "--bundle", files["--bundle"], "--credential", files["--credential"],
                     "--key", "pkcs11:/nonexistent.so#t/k", "--policy",
                     str(_b(w) / "policy.toml"), "-o", str(out)], f, [out])


# -- init --------------------------------------------------------------------------------

@case("init-truncated-maker-root")
def _(w: dict[str, object]) -> Case:
    d = _b(w) / "roots"
    return Case(init(d, "--tpm-maker-roots", str(_b(w) / "truncated.pem")),
                "--tpm-maker-roots", [d])


@case("init-bad-registry-url")
def _(w: dict[str, object]) -> Case:
    d = _b(w) / "badurl"
    return Case(init(d, "--registry", "mysql://db/x"), "registry URL", [d])


@case("init-bad-operator")
def _(w: dict[str, object]) -> Case:
    d = _b(w) / "badop"
    return Case(init(d, "--operator", "a b"), "--operator", [d])


@case("init-unreachable-postgresql")
def _(w: dict[str, object]) -> Case:
    d = _b(w) / "nopg"
    return Case(init(d, "--registry", "postgresql://u@127.0.0.1:9/db"), "nothing was created",
                [d])


@case("init-existing")
def _(w: dict[str, object]) -> Case:
    return Case(init(_b(w) / "auth"), "already holds", [_b(w) / "auth"])


@case("init-full-filesystem")
def _(w: dict[str, object]) -> Case:
    m = w["mounts"]
    assert isinstance(m, Mounts)
    if not m.ok:
        pytest.skip("needs root to mount a 64 KiB tmpfs")
    return Case(init(m.full / "a"), "nothing was created", [m.full])


@case("init-read-only-filesystem")
def _(w: dict[str, object]) -> Case:
    m = w["mounts"]
    assert isinstance(m, Mounts)
    if not m.ok:
        pytest.skip("needs root to mount a read-only tmpfs")
    return Case(init(m.ro / "a"), "Read-only file system", [m.ro])


@case("export-bundle-full-filesystem")
def _(w: dict[str, object]) -> Case:
    m = w["mounts"]
    assert isinstance(m, Mounts)
    if not m.ok:
        pytest.skip("needs root to mount a 64 KiB tmpfs")
    return Case([TESSERA, "export-bundle", "--provisioner", str(w["html"]), "-o",
                 str(m.full / "bundle.pem")], "-o", [m.full])


@case("export-bundle-not-a-bundle")
def _(w: dict[str, object]) -> Case:
    out = _b(w) / "bundle.pem"
    return Case([TESSERA, "export-bundle", "--provisioner", str(w["html"]) + "/x", "-o",
                 str(out)], "no PEM certificate", [out])


# -- usage errors --------------------------------------------------------------------------

@case("usage-no-command")
def _(w: dict[str, object]) -> Case:
    return Case([TESSERA], "required")


@case("usage-unknown-flag")
def _(w: dict[str, object]) -> Case:
    return Case([TESSERA, "list", "--frobnicate"], "--frobnicate")


@case("usage-missing-required")
def _(w: dict[str, object]) -> Case:
    return Case([TESSERA, "init"], "--trust-domain")


@case("usage-bad-choice")
def _(w: dict[str, object]) -> Case:
    return Case([TESSERA, "list", "--status", "zombie"], "--status")


@pytest.mark.parametrize("name", list(CASES))
def test_cli_error_is_one_line(world: dict[str, object], name: str) -> None:
    c = CASES[name](world)
    before = snapshot(c.watch)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **c.env}
    done = subprocess.run(c.argv, capture_output=True, text=True, env=env, timeout=60)
    lines = done.stderr.splitlines()
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("tessera: error: "), lines[0]
    assert "Traceback" not in done.stderr
    assert c.expect in lines[0], lines[0]
    assert snapshot(c.watch) == before
    # no temporary files left next to what was watched
    for path in c.watch:
        parent = path.parent if path.exists() and path.is_file() else path
        if parent.is_dir():
            assert not [p for p in parent.iterdir() if ".tmp" in p.name or "tessera-init" in
                        p.name], list(parent.iterdir())
        siblings = path.parent.iterdir() if path.parent.is_dir() else iter(())
        assert not [p for p in siblings if "tessera-init" in p.name]


def test_failed_init_can_be_run_again(world: dict[str, object]) -> None:
    """After each kind of failed init the same directory takes a good one, and serve's
    message before it matches init's (no half-made authority in between)."""
    d = _b(world) / "again"
    for bad in (["--operator", "a b"], ["--registry", "mysql://x"],
                ["--tpm-maker-roots", str(_b(world) / "truncated.pem")]):
        done = subprocess.run(init(d, *bad), capture_output=True, text=True)
        assert done.returncode == 1 and not d.exists()
        serve = subprocess.run([TESSERA, "serve", "--dir", str(d)], capture_output=True,
                               text=True)
        assert serve.returncode == 1 and "run 'tessera init" in serve.stderr
    done = subprocess.run(init(d), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in d.iterdir()) == [
        "authority-key.pem", "authority.toml", "operators.json", "registry.db", "root.pem",
        "service.toml"]


# -- one convention: --json anywhere, errors as JSON in JSON mode, --version (issue 14) --


@pytest.mark.parametrize("argv", [
    ["list", "--json", "--provisioner", "http://127.0.0.1:9"],
    ["--json", "list", "--provisioner", "http://127.0.0.1:9"],
    ["list", "--provisioner", "http://127.0.0.1:9", "--json"],
])
def test_json_anywhere_and_errors_as_json(argv: list[str]) -> None:
    import json

    done = subprocess.run([TESSERA, *argv], capture_output=True, text=True,
                          env={"PATH": os.environ.get("PATH", ""),
                               "TESSERA_OPERATOR_TOKEN": "tso_x"})
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()
    error = json.loads(line)
    assert error["exit"] == 1 and error["reason"] == "backend_unavailable"
    assert "cannot reach" in error["error"]


def test_usage_error_as_json() -> None:
    import json

    done = subprocess.run([TESSERA, "list", "--frobnicate", "--json"], capture_output=True,
                          text=True)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert "--frobnicate" in json.loads(line)["error"]


def test_json_after_the_command_on_success(tmp_path: Path) -> None:
    import json

    done = subprocess.run(init(tmp_path / "a", "--json"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["operator_token"].startswith("tso_")


def test_version() -> None:
    from importlib.metadata import version

    done = subprocess.run([TESSERA, "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.strip() == f"tessera {version('tessera')}"
