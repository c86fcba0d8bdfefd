"""The native Mosquitto shim (broker_plugin/shim/tessera_mosquitto.c) against a real
Mosquitto 2 process, with the test host tests/shim_host.py and real MQTT clients
(paho-mqtt, plus a few raw packets where paho cannot: MQTT 5 AUTH, PUBREC reasons)."""

from __future__ import annotations

import json
import os
import pwd
import queue
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker_plugin import build
from simulator.mosquitto import Mosquitto
from structauth.errors import ConfigurationError
from tests.support import wait_for

pytestmark = pytest.mark.broker

TESTS = Path(__file__).resolve().parent
METHOD = "tessera-sa1"
NOT_AUTHORIZED = 0x87  # MQTT 5 reason code
BAD_AUTH_METHOD = 0x8C
PROTOCOL_ERROR = 0x82
SESSION_TAKEN_OVER = 0x8E


# -- the broker and what its host recorded ---------------------------------------------


@dataclass
class Broker:
    mosq: Mosquitto
    record: Path
    commands: Path
    options: dict[str, str]

    def records(self, cb: str | None = None, **match: Any) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in self.record.read_text().splitlines()]
        return [r for r in rows if (cb is None or r["cb"] == cb)
                and all(r.get(k) == v for k, v in match.items())]

    def wait_record(self, cb: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.records(cb, **match)
            if rows:
                return rows[-1]
            time.sleep(0.01)
        raise AssertionError(f"no {cb} {match} recorded")

    def command(self, *actions: Any) -> None:
        with open(self.commands, "a") as f:
            for a in actions:
                f.write(json.dumps(a) + "\n")

    def log(self) -> str:
        return self.mosq.log_text()


def _options(directory: Path, **extra: str) -> dict[str, str]:
    return {"host": "shim_host", "path": str(TESTS), "record": str(directory / "record.jsonl"),
            "commands": str(directory / "commands.jsonl"), **extra}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    d = tmp_path_factory.mktemp("shim-broker")
    options = _options(d, zeta="one two  three")
    # 2000-message bursts must not overflow the default queue of 1000 (it drops the rest);
    # not 0 (unlimited): 2.0.11 then disconnects a client whose QoS 1 PUBLISH is denied
    with Mosquitto(d, plugin_options=options, extra_conf="max_queued_messages 10000") as mosq:
        yield Broker(mosq, Path(options["record"]), Path(options["commands"]), options)


# -- clients -------------------------------------------------------------------------------


class Client:
    """A paho-mqtt client whose callbacks land in queues."""

    def __init__(self, broker: Broker, client_id: str, *,
                 protocol: MQTTProtocolVersion = mqtt.MQTTv5,
                 method: str | None = None, data: bytes | None = None,
                 username: str | None = None, password: bytes | None = None) -> None:
        self.client_id = client_id
        self.connacks: queue.Queue[tuple[int, Any]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.acks: queue.Queue[tuple[int, int]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.disconnects: queue.Queue[float] = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        c.reconnect_delay_set(60, 60)  # never reconnect during a test

        def on_connect(client: mqtt.Client, _u: Any, _f: Any, rc: Any, props: Any) -> None:
            if rc.is_failure:
                client.disconnect()  # no reconnect attempt, a quick loop_stop()
            self.connacks.put((rc.value, props))

        c.on_connect = on_connect
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        c.on_publish = lambda _c, _u, mid, rc, _p: self.acks.put((mid, rc.value))
        c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.put([r.value for r in rcs])
        c.on_disconnect = lambda *_a: self.disconnects.put(time.monotonic())
        if username is not None:
            c.username_pw_set(username, password)  # type: ignore[arg-type] # bytes work
        props = None
        if method is not None:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.AuthenticationMethod = method
            if data is not None:
                props.AuthenticationData = data
        self.paho = c
        c.connect(broker.mosq.host, broker.mosq.port, properties=props)
        c.loop_start()
        self.rc, self.props = self.connacks.get(timeout=5)
        if self.rc != 0:
            c.loop_stop()

    def subscribe(self, topic: str, qos: int = 2) -> list[int]:
        self.paho.subscribe(topic, qos)
        return self.subacks.get(timeout=5)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Publish; for QoS 1 the PUBACK reason code."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            info.wait_for_publish(5)
            return 0
        while True:
            mid, rc = self.acks.get(timeout=5)
            if mid == info.mid:
                return rc

    def message(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def _connect_ok(broker: Broker, client_id: str) -> Client:
    c = Client(broker, client_id, username="allow", password=b"pw")
    assert c.rc == 0
    return c


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def _auth_props(method: str | None, data: bytes | None) -> bytes:
    body = b""
    if method is not None:
        body += b"\x15" + _s(method.encode())
    if data is not None:
        body += b"\x16" + _s(data)
    return _varint(len(body)) + body


_PROP_SIZES = {1: 1, 0x17: 1, 0x19: 1, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1,
               0x13: 2, 0x21: 2, 0x22: 2, 0x23: 2, 0x02: 4, 0x11: 4, 0x18: 4, 0x27: 4}


def _parse_props(body: bytes) -> dict[int, Any]:
    length, shift, i = 0, 0, 0
    while True:
        length |= (body[i] & 0x7F) << shift
        shift += 7
        i += 1
        if not body[i - 1] & 0x80:
            break
    props: dict[int, Any] = {}
    end = i + length
    while i < end:
        ident = body[i]
        i += 1
        if ident in _PROP_SIZES:
            size = _PROP_SIZES[ident]
            props[ident] = int.from_bytes(body[i:i + size], "big")
            i += size
        elif ident == 0x26:  # user property: two strings
            n = struct.unpack("!H", body[i:i + 2])[0]
            m = struct.unpack("!H", body[i + 2 + n:i + 4 + n])[0]
            i += 4 + n + m
        else:  # string or binary
            n = struct.unpack("!H", body[i:i + 2])[0]
            props[ident] = body[i + 2:i + 2 + n]
            i += 2 + n
    return props


class Raw:
    """Hand-made MQTT packets, for what paho does not do (AUTH) or hides (PUBREC reason,
    the MQTT 3 CONNACK return code)."""

    def __init__(self, broker: Broker) -> None:
        self.sock = socket.create_connection((broker.mosq.host, broker.mosq.port), timeout=5)

    def send(self, first: int, body: bytes) -> None:
        self.sock.sendall(bytes([first]) + _varint(len(body)) + body)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return data

    def recv(self) -> tuple[int, bytes]:
        first = self._exact(1)[0]
        length, shift = 0, 0
        while True:
            b = self._exact(1)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return first, self._exact(length)

    def connect(self, client_id: str, *, version: int = 5, username: str | None = None,
                password: bytes | None = None, method: str | None = None,
                data: bytes | None = None) -> tuple[int, bytes]:
        flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
        name = b"MQIsdp" if version == 3 else b"MQTT"
        body = _s(name) + bytes([version, flags]) + struct.pack("!H", 60)
        if version == 5:
            body += _auth_props(method, data)
        body += _s(client_id.encode())
        if username is not None:
            body += _s(username.encode())
        if password is not None:
            body += _s(password)
        self.send(0x10, body)
        return self.recv()

    def auth(self, reason: int, method: str, data: bytes | None) -> None:
        self.send(0xF0, bytes([reason]) + _auth_props(method, data))

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def ended(self, *reasons: int) -> int | None:
        """The connection ends as MQTT 5 allows a server to end it: a DISCONNECT with
        one of ``reasons`` and then the close (4.13, what Mosquitto 2.0.15+ sends), or
        the close alone (what 2.0.11 does). The reason code, or None for a bare close."""
        try:
            kind, body = self.recv()
        except (ConnectionError, OSError):
            return None
        assert kind == 0xE0, f"packet {kind:#04x} instead of a DISCONNECT or the close"
        code = body[0] if body else 0x00
        assert code in reasons, f"DISCONNECT {code:#04x}, expected one of {reasons}"
        assert self.closed_after_disconnects()
        return code

    def closed_after_disconnects(self) -> bool:
        """The close, after nothing but more DISCONNECTs (Mosquitto 2.0.20 follows its
        DISCONNECT 0x87 with a DISCONNECT 0x82 before it closes)."""
        while True:
            try:
                kind, _ = self.recv()
            except (ConnectionError, OSError):
                return True
            if kind != 0xE0:
                return False

    def close(self) -> None:
        self.sock.close()


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


# -- loading ----------------------------------------------------------------------------


def test_build_is_reproducible_and_checked() -> None:
    path = build.ensure_built()
    assert path == build.plugin_path() and path.is_file()
    assert build.is_up_to_date()
    assert build.main(["--check"]) == 0
    mtime = path.stat().st_mtime_ns
    assert build.ensure_built().stat().st_mtime_ns == mtime  # nothing to rebuild


def test_build_errors_are_one_clear_line(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(build, "_HEADER_DIRS", ("/nonexistent",))
    monkeypatch.delenv("TESSERA_MOSQUITTO_INCLUDE", raising=False)
    with pytest.raises(build.BuildError, match=r"mosquitto_broker.h missing \(in /nonexistent\)"
                       r": install mosquitto-dev \(apt install mosquitto-dev, or ./run setup\)"):
        build.ensure_built()
    assert build.main([]) == 2
    assert capsys.readouterr().err == (
        "error: mosquitto_broker.h missing (in /nonexistent): install mosquitto-dev "
        "(apt install mosquitto-dev, or ./run setup)\n")


def test_readable_by_finds_what_another_user_cannot_read() -> None:
    # pytest's tmp_path lives under a 0700 directory; this test needs an open parent
    with tempfile.TemporaryDirectory(prefix="tessera-perm-") as top:
        _check_blocked(Path(top))
    problems = build.readable_by("nobody")
    if any(str(p).startswith("/root/") for p in build.needed_paths()):
        assert any("(stopped at /root)" in p for p in problems), problems


def _check_blocked(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    gids = {nobody.pw_gid}
    private = tmp_path / "private"
    (private / "pkg").mkdir(parents=True)
    (private / "pkg" / "mod.py").write_text("")
    tmp_path.chmod(0o755)
    private.chmod(0o700)
    assert build._blocked(private / "pkg" / "mod.py", nobody.pw_uid, gids) == str(private)
    private.chmod(0o751)  # traversable, not listable: the file is readable, the dir is not
    assert build._blocked(private / "pkg" / "mod.py", nobody.pw_uid, gids) is None
    assert build._blocked(private, nobody.pw_uid, gids) == str(private)
    link = tmp_path / "link.py"
    link.symlink_to(private / "pkg" / "mod.py")
    (private / "pkg" / "mod.py").chmod(0o600)
    assert build._blocked(link, nobody.pw_uid, gids) == str(private / "pkg" / "mod.py")
    assert build._blocked(link, 0, {0}) is None


def test_plugin_loads_and_init_gets_every_option(broker: Broker) -> None:
    init = broker.wait_record("plugin_init")
    assert init["options"] == {"python": sys.executable, **broker.options}
    # plugin_opt_python made the broker's Python run in this venv, editable install included
    assert init["prefix"] == sys.prefix and init["base_prefix"] == sys.base_prefix
    assert init["structauth"] == str(TESTS.parent / "structauth" / "__init__.py")
    assert f"tessera: host shim_host ready (Python {sys.version.split()[0]}" in broker.log()


@pytest.mark.parametrize(
    ("case", "kwargs", "expected"),
    [
        ("no python", {"python": None}, "tessera: plugin_opt_python is required"),
        ("bad python", {"python": "/nonexistent/bin/python"},
         "tessera: plugin_opt_python /nonexistent/bin/python is not an executable"),
        ("no host", {"host": "no_such_tessera_host"},
         "tessera: cannot start the host module no_such_tessera_host: "
         "ModuleNotFoundError: No module named 'no_such_tessera_host'"),
        ("incomplete host", {"host": "json"},
         "tessera: host module json has no function plugin_init()"),
        ("init raises", {"init_raise": "1"},
         "tessera: shim_host.plugin_init refused to start: "
         "RuntimeError: test host refuses to start (init_raise) ("),
    ],
)
def test_refuses_to_start_with_one_clear_line(tmp_path: Path, case: str,
                                              kwargs: dict[str, Any], expected: str) -> None:
    python = kwargs.pop("python", sys.executable)
    options = _options(tmp_path, **kwargs)
    mosq = Mosquitto(tmp_path, plugin_options=options, python=python)
    with pytest.raises(ConfigurationError, match="mosquitto exited with status"):
        mosq.start()
    assert mosq.returncode not in (None, 0)
    lines = [ln for ln in mosq.log_text().splitlines() if "tessera:" in ln]
    assert len(lines) == 1, lines
    assert expected in lines[0]
    with pytest.raises(OSError):
        socket.create_connection((mosq.host, mosq.port), timeout=0.5).close()


def test_shutdown_runs_cleanup_and_does_not_wait_for_host_threads(tmp_path: Path) -> None:
    options = _options(tmp_path)
    mosq = Mosquitto(tmp_path, plugin_options=options).start()
    b = Broker(mosq, Path(options["record"]), Path(options["commands"]), options)
    b.wait_record("plugin_init")
    started = time.monotonic()
    # the host's non-daemon "counter" thread never ends: Py_FinalizeEx would hang here
    assert mosq.stop(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert b.records("plugin_cleanup")
    assert "Segmentation" not in mosq.output_text()


def test_reload_passes_the_init_options(broker: Broker) -> None:
    before = len(broker.records("on_reload"))
    broker.mosq.reload()
    assert _eventually(lambda: len(broker.records("on_reload")) > before)
    assert broker.records("on_reload")[-1]["options"] == {"python": sys.executable,
                                                          **broker.options}
    assert _connect_ok(broker, "after-reload").rc == 0


# -- authentication ------------------------------------------------------------------


def test_ext_auth_data_reaches_the_host_exactly_and_the_answer_the_client(broker: Broker) -> None:
    reply = b"\x00reply\xff" + os.urandom(300)
    data = b"ok:" + reply
    c = Client(broker, "ext-ok", method=METHOD, data=data)
    assert c.rc == 0
    assert c.props.AuthenticationMethod == METHOD
    assert c.props.AuthenticationData == reply
    start = broker.wait_record("on_ext_auth_start", client_id="ext-ok")
    assert bytes.fromhex(start["data"]) == data
    assert start["method"] == METHOD and start["protocol"] == 5 and start["reauth"] is False
    assert start["address"] == "127.0.0.1"
    assert not broker.records("on_basic_auth", client_id="ext-ok")
    c.close()
    plain = Client(broker, "ext-plain-reply", method=METHOD, data=b"ok:reply")
    assert plain.rc == 0 and plain.props.AuthenticationData == b"reply"
    plain.close()


@pytest.mark.parametrize(
    ("client_id", "method", "data", "reason", "logged"),
    [
        ("ext-deny", METHOD, b"deny", NOT_AUTHORIZED, None),
        ("ext-unsupported", METHOD, b"unsupported", BAD_AUTH_METHOD, None),
        ("ext-raise", METHOD, b"raise",
         NOT_AUTHORIZED, "LookupError: extended auth exploded on purpose"),
        ("ext-garbage", METHOD, b"garbage",
         NOT_AUTHORIZED, "tessera: on_ext_auth_start returned a tuple, expected"),
        ("ext-big", METHOD, b"big", NOT_AUTHORIZED, "returned a tuple, expected"),
        ("ext-nodata", METHOD, None, NOT_AUTHORIZED, None),
        ("ext-other", "other-method", b"ok:x", BAD_AUTH_METHOD, None),
    ],
)
def test_ext_auth_refusals(broker: Broker, client_id: str, method: str, data: bytes | None,
                           reason: int, logged: str | None) -> None:
    c = Client(broker, client_id, method=method, data=data)
    assert c.rc == reason
    recorded = broker.records("on_ext_auth_start", client_id=client_id)
    if method == METHOD:
        assert len(recorded) == 1
    else:
        assert recorded == []  # another method is deferred: the host is never asked
    if logged is not None:
        log = broker.log()
        assert logged in log
        if "exploded" in logged:
            assert "tessera:   Traceback (most recent call last):" in log
            assert "tessera: on_ext_auth_start raised, client refused: LookupError" in log


def test_continue_then_reauthentication_in_a_live_connection(broker: Broker) -> None:
    raw = Raw(broker)
    kind, body = raw.connect("reauth-1", method=METHOD, data=b"continue:")
    assert kind == 0xF0 and body[0] == 0x18  # AUTH, continue authentication
    assert _parse_props(body[1:])[0x16] == b"more"
    raw.auth(0x18, METHOD, b"ok:welcome")
    kind, body = raw.recv()
    assert kind == 0x20 and body[1] == 0  # CONNACK, success
    assert _parse_props(body[2:])[0x16] == b"welcome"
    cont = broker.wait_record("on_ext_auth_continue", client_id="reauth-1")
    assert cont["method"] == METHOD and cont["reauth"] is False

    # AUTH reason 0x19 inside the live connection reaches EXT_AUTH_START again; the
    # shim tells the host it is a re-authentication
    raw.auth(0x19, METHOD, b"ok:again")
    kind, body = raw.recv()
    assert kind == 0xF0 and body[0] == 0x00  # AUTH, success
    assert _parse_props(body[1:])[0x16] == b"again"
    starts = broker.records("on_ext_auth_start", client_id="reauth-1")
    assert [s["reauth"] for s in starts] == [False, True]

    # a refused re-authentication ends the connection. MQTT 5 (4.12.1): the server
    # SHOULD send DISCONNECT with a reason code and MUST close. Mosquitto 2.0.11 sends a
    # CONNACK 0x87 on the live connection instead; 2.0.15+ a DISCONNECT 0x87 (or 0x82;
    # 2.0.20 sends 0x87, then 0x82, then closes).
    raw.auth(0x19, METHOD, b"deny")
    kind, body = raw.recv()
    if kind == 0x20:  # 2.0.11
        assert body[1] == NOT_AUTHORIZED
        assert raw.closed()
    else:
        assert kind == 0xE0 and body and body[0] in (NOT_AUTHORIZED, PROTOCOL_ERROR), body
        assert raw.closed_after_disconnects()
    broker.wait_record("on_disconnect", client_id="reauth-1")
    raw.close()


def test_a_reauthentication_can_continue_in_both_directions(broker: Broker) -> None:
    """What SA1 v2 needs of the shim on a live connection: AUTH 0x19 -> the host answers
    CONTINUE -> AUTH 0x18 to the client -> the client's AUTH 0x18 reaches
    on_ext_auth_continue with reauth=True -> AUTH 0x00. And what Mosquitto 2.0.11 does
    meanwhile (handle_auth.c: state "reauthenticating"): any other packet from the
    client is a protocol error that closes the connection."""
    raw = Raw(broker)
    kind, body = raw.connect("reauth-2", method=METHOD, data=b"ok:hello")
    assert (kind, body[1]) == (0x20, 0)
    raw.auth(0x19, METHOD, b"continue:")
    kind, body = raw.recv()
    assert kind == 0xF0 and body[0] == 0x18 and _parse_props(body[1:])[0x16] == b"more"
    raw.auth(0x18, METHOD, b"ok:confirmed")
    kind, body = raw.recv()
    assert kind == 0xF0 and body[0] == 0x00  # AUTH, success
    assert _parse_props(body[1:])[0x16] == b"confirmed"
    starts = broker.records("on_ext_auth_start", client_id="reauth-2")
    assert [s["reauth"] for s in starts] == [False, True]
    cont = broker.wait_record("on_ext_auth_continue", client_id="reauth-2")
    assert cont["reauth"] is True and cont["data"] == b"ok:confirmed".hex()
    # the connection is live again: a PUBLISH is handled
    raw.send(0x30, _s(b"plain/after-reauth") + b"\x00" + b"x")
    broker.wait_record("on_message", topic="plain/after-reauth")
    # a PUBLISH between the client's 0x19 and its msg3 ends the connection
    raw.auth(0x19, METHOD, b"continue:")
    kind, body = raw.recv()
    assert kind == 0xF0 and body[0] == 0x18
    raw.send(0x30, _s(b"plain/too-early") + b"\x00" + b"x")
    kind, body = raw.recv()
    assert (kind, body[0]) == (0xE0, 0x82)  # DISCONNECT, protocol error
    assert raw.closed()
    assert not broker.records("on_message", topic="plain/too-early")
    broker.wait_record("on_disconnect", client_id="reauth-2")
    raw.close()


def test_no_auth_method_means_basic_auth(broker: Broker) -> None:
    ok = Client(broker, "basic-ok", username="allow", password=b"p\x01w")
    assert ok.rc == 0
    rec = broker.wait_record("on_basic_auth", client_id="basic-ok")
    assert rec == {**rec, "username": "allow", "password": b"p\x01w".hex(), "protocol": 5,
                   "address": "127.0.0.1"}
    assert not broker.records("on_ext_auth_start", client_id="basic-ok")  # ext auth skipped
    ok.close()

    assert Client(broker, "basic-no", username="nope", password=b"x").rc == NOT_AUTHORIZED
    anonymous = Client(broker, "basic-anon")
    assert anonymous.rc == NOT_AUTHORIZED
    assert broker.records("on_basic_auth", client_id="basic-anon")[0]["username"] is None

    for name, version, expected in (("v311-no", 4, 5), ("v311-ok", 4, 0), ("v31-ok", 3, 0)):
        raw = Raw(broker)
        kind, body = raw.connect(name, version=version,
                                 username="allow" if name.endswith("ok") else "nope",
                                 password=b"pw")
        assert (kind, body[1]) == (0x20, expected)  # MQTT 3 CONNACK return code
        assert broker.records("on_basic_auth", client_id=name)[0]["protocol"] == version
        raw.close()


@pytest.mark.parametrize(("username", "logged"), [
    ("raise", "ValueError: basic auth exploded on purpose"),
    ("garbage", "tessera: on_basic_auth returned str, expected 0"),
])
def test_basic_auth_errors_refuse(broker: Broker, username: str, logged: str) -> None:
    c = Client(broker, f"basic-{username}", username=username, password=b"x")
    assert c.rc == NOT_AUTHORIZED
    assert logged in broker.log()


def test_takeover_reports_only_the_current_connection(broker: Broker) -> None:
    first = Raw(broker)
    assert first.connect("dup-1", username="allow")[1][1] == 0
    second = Raw(broker)
    assert second.connect("dup-1", username="allow")[1][1] == 0
    # MQTT 5 (3.1.4): the server sends the old connection DISCONNECT 0x8E (session taken
    # over) if it is MQTT 5, then closes it; 2.0.11 closes it without the DISCONNECT
    first.ended(SESSION_TAKEN_OVER)
    # a round trip on the new connection: the broker has finished the takeover (and
    # would have told the host about the old connection by now)
    second.send(0xC0, b"")  # PINGREQ
    assert second.recv() == (0xD0, b"")  # PINGRESP
    # Mosquitto disconnected the old connection after the new one authenticated; the
    # host must not hear "dup-1 disconnected" while dup-1 is connected
    assert broker.records("on_disconnect", client_id="dup-1") == []
    second.close()
    broker.wait_record("on_disconnect", client_id="dup-1")
    assert len(broker.records("on_disconnect", client_id="dup-1")) == 1
    first.close()


# -- messages ---------------------------------------------------------------------------


def test_host_replaces_the_payload(broker: Broker) -> None:
    sub = _connect_ok(broker, "strip-sub")
    assert sub.subscribe("strip/#") == [2]
    pub = _connect_ok(broker, "strip-pub")
    for qos in (0, 1, 2):
        assert pub.publish(f"strip/3/q{qos}", b"hello!!!", qos=qos) == 0
        msg = sub.message()
        assert (msg.topic, msg.payload, msg.qos) == (f"strip/3/q{qos}", b"hello", qos)
    big = os.urandom(100 * 1024)
    assert pub.publish("strip/7/big", big, qos=1) == 0
    assert sub.message().payload == big[:-7]
    assert pub.publish("strip/5/all", b"12345", qos=1) == 0
    assert sub.message().payload == b""
    assert pub.publish("strip/2/retained", b"kept!!", qos=1, retain=True) == 0
    assert sub.message().payload == b"kept"
    late = _connect_ok(broker, "strip-late")
    late.subscribe("strip/2/retained")
    msg = late.message()
    assert (msg.payload, msg.retain) == (b"kept", True)
    rec = broker.records("on_message", topic="strip/3/q1")[-1]
    assert rec == {**rec, "client_id": "strip-pub", "n": 8, "qos": 1, "retain": False}
    for c in (sub, pub, late):
        c.close()


def test_many_messages_arrive_exactly(broker: Broker) -> None:
    sub = _connect_ok(broker, "load-sub")
    sub.subscribe("load/#", qos=1)
    pub = _connect_ok(broker, "load-pub")
    payloads = [os.urandom(i * 7 % 3000) for i in range(2000)]
    for i, p in enumerate(payloads):
        pub.paho.publish(f"load/1/{i}", p, qos=1)
    for i, p in enumerate(payloads):
        msg = sub.message()
        assert (msg.topic, msg.payload) == (f"load/1/{i}", p[: len(p) - 1])
    sub.close()
    pub.close()


def test_host_drop_answers_not_authorized(broker: Broker) -> None:
    sub = _connect_ok(broker, "drop-sub")
    sub.subscribe("drop/#")
    sub.subscribe("strip/0/sentinel")
    pub = _connect_ok(broker, "drop-pub")
    assert pub.publish("drop/87/q1", b"x", qos=1) == NOT_AUTHORIZED
    # 2.0.x ignores the reason code a plugin sets: every drop is answered 0x87
    assert pub.publish("drop/97/q1", b"x", qos=1) == NOT_AUTHORIZED
    pub.publish("drop/87/q0", b"x", qos=0)
    assert pub.publish("strip/0/sentinel", b"after", qos=1) == 0  # publisher still connected
    assert sub.message().topic == "strip/0/sentinel"  # nothing dropped got through
    raw = Raw(broker)
    assert raw.connect("drop-raw", username="allow")[1][1] == 0
    raw.send(0x34, _s(b"drop/87/q2") + struct.pack("!H", 7) + b"\x00" + b"payload")
    assert raw.recv() == (0x50, struct.pack("!H", 7) + bytes([NOT_AUTHORIZED]))  # PUBREC
    raw.close()
    for c in (sub, pub):
        c.close()


def test_host_errors_fail_closed_and_the_broker_keeps_running(broker: Broker) -> None:
    c = _connect_ok(broker, "fail-closed")
    assert c.subscribe("acl-raise/x") == [NOT_AUTHORIZED]
    assert c.subscribe("acl-garbage/x") == [NOT_AUTHORIZED]
    assert c.subscribe("acl-deny/x") == [NOT_AUTHORIZED]
    assert c.publish("acl-deny/x", b"x", qos=1) == NOT_AUTHORIZED
    assert not broker.records("on_message", topic="acl-deny/x")  # ACL comes first
    assert c.publish("raise/x", b"x", qos=1) == NOT_AUTHORIZED
    assert c.publish("garbage/x", b"x", qos=1) == NOT_AUTHORIZED
    log = broker.log()
    assert "tessera: on_acl_check raised, access denied: PermissionError: acl check exploded" in log
    assert "tessera: on_acl_check returned NoneType, expected 0" in log
    assert "tessera: on_message raised, message dropped: KeyError: 'on_message exploded" in log
    assert "tessera: on_message returned a list, expected" in log
    assert log.count("tessera:   Traceback (most recent call last):") >= 2
    assert c.subscribe("fine/x") == [2]
    assert c.publish("fine/x", b"still here", qos=1) == 0
    assert c.message().payload == b"still here"
    c.close()


def test_host_threads_run_between_callbacks(broker: Broker) -> None:
    c = _connect_ok(broker, "threads")
    c.publish("threads/1", b"", qos=1)
    first = broker.wait_record("on_message", topic="threads/1")["counter"]

    def counter_ran() -> bool:
        c.publish("threads/2", b"", qos=1)
        return bool(broker.records("on_message", topic="threads/2")[-1]["counter"] - first > 50)

    # the counter thread runs while the broker idles between callbacks
    wait_for(counter_ran, 5, "the host's counter thread to advance by 50")
    c.close()


# -- tick actions ---------------------------------------------------------------------


def test_tick_kick_disconnects_within_a_second(broker: Broker) -> None:
    victim = _connect_ok(broker, "victim")
    bystander = _connect_ok(broker, "bystander")
    asked = time.monotonic()
    broker.command(["kick", "victim"])
    gone = victim.disconnects.get(timeout=2)
    assert gone - asked < 1.0
    broker.wait_record("on_disconnect", client_id="victim")
    assert bystander.subscribe("kick/check") == [2]
    assert bystander.disconnects.empty()
    bystander.close()


def test_tick_publish_to_one_client_or_all(broker: Broker) -> None:
    target = _connect_ok(broker, "cmd-target")
    other = _connect_ok(broker, "cmd-other")
    for c in (target, other):
        c.subscribe("cmd/#")
    payload = os.urandom(64)
    broker.command(["publish", "cmd-target", "cmd/target", {"hex": payload.hex()}, 1, False])
    msg = target.message()
    assert (msg.topic, msg.payload, msg.qos) == ("cmd/target", payload, 1)
    broker.command(["publish", None, "cmd/all", {"hex": "616c6c"}, 0, False])
    for c in (target, other):
        msg = c.message()
        assert (msg.topic, msg.payload) == ("cmd/all", b"all")  # other never saw cmd/target
    target.close()
    other.close()


def test_malformed_tick_actions_are_logged_and_skipped(broker: Broker) -> None:
    c = _connect_ok(broker, "tick-malformed")
    bad = [["kick"], ["kick", None], ["kick", ""], ["bogus"], "string",
           ["publish", None, "a/+/b", {"hex": ""}, 0, False],
           ["publish", None, "t", "not bytes", 0, False],
           ["publish", None, "t", {"hex": ""}, 3, False],
           ["publish", None, "t", {"hex": ""}, 0, 1]]
    broker.command(*bad)
    assert _eventually(lambda: broker.log().count("on_tick action skipped") >= len(bad))
    skipped = "on_tick action skipped (malformed or refused by the broker): ('kick', None)"
    assert skipped in broker.log()
    broker.command(["raise"])
    raised = "tessera: on_tick raised: RuntimeError: on_tick exploded on purpose"
    assert _eventually(lambda: raised in broker.log())
    assert c.disconnects.empty()  # ("kick", None) did not kick everyone
    assert c.subscribe("tick/alive") == [2]
    broker.command(["kick", "tick-malformed"])  # and ticks still work
    c.disconnects.get(timeout=2)
