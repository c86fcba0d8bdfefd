"""A test-only host for the Tessera Mosquitto shim (broker_plugin/shim/tessera_mosquitto.c).

It runs inside the mosquitto process started by tests/test_broker_shim.py (plugin
options ``host shim_host`` and ``path <tests dir>``), records every callback as one JSON
line in the file named by the ``record`` option, and behaves according to what the
client sends, so that one broker serves many test cases.

The host contract (the same as at the top of tessera_mosquitto.c; ints are MOSQ_ERR_*):

    plugin_init(options: dict[str, str]) -> None                # raise to refuse to start
    plugin_cleanup() -> None
    on_reload(options: dict[str, str]) -> None
    on_basic_auth(client_id, username: str | None, password: bytes | None, address: str,
                  protocol: int) -> int                         # protocol 3, 4 or 5
    on_ext_auth_start(client_id, address, protocol, method: str, data: bytes | None,
                      *, reauth: bool = False) -> tuple[int, bytes | None]
    on_ext_auth_continue(same) -> tuple[int, bytes | None]
    on_acl_check(client_id, access: int, topic: str, payload: bytes, qos: int,
                 retain: bool) -> int
    on_message(client_id, topic: str, payload: bytes, qos: int, retain: bool)
        -> tuple[int, bytes | None, int, str | None]             # rc, new payload, reason
    on_tick() -> list[tuple]      # ("kick", id) | ("publish", id | None, topic, payload,
                                  #                 qos, retain)
    on_disconnect(client_id: str, reason: int) -> None

Behaviour:
- basic auth: username "allow" is accepted, "raise" raises, "garbage" returns a str,
  anything else (or none) is refused.
- extended auth: the auth data is "<verb>:<argument>": ok -> (0, argument),
  continue -> (MOSQ_ERR_AUTH_CONTINUE, b"more"), deny -> MOSQ_ERR_AUTH,
  unsupported -> MOSQ_ERR_NOT_SUPPORTED, raise, garbage, big (70000 bytes out).
- ACL: a topic containing acl-deny / acl-raise / acl-garbage is denied / raises /
  returns None.
- messages by topic: strip/<n>/... drops the last n payload bytes; drop/<hex>/... drops
  with that reason code; raise/... raises; garbage/... returns a list; threads/...
  records the host thread's counter; bench/... and load/... are not recorded.
- tick: actions are JSON lines appended to the ``commands`` file, read by a host thread
  ({"hex": ...} becomes bytes, lists become tuples); ["raise"] makes on_tick raise once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

MOSQ_ERR_AUTH_CONTINUE = -4
MOSQ_ERR_SUCCESS = 0
MOSQ_ERR_NOT_SUPPORTED = 10
MOSQ_ERR_AUTH = 11
MOSQ_ERR_ACL_DENIED = 12

_lock = threading.Lock()
_record: Any = None
_actions: queue.Queue[Any] = queue.Queue()
_counter = 0
_stop = threading.Event()


def _rec(cb: str, **fields: Any) -> None:
    line = json.dumps({"cb": cb, "t": time.monotonic(), **fields}) + "\n"
    with _lock:
        if _record is not None:
            _record.write(line)
            _record.flush()


def _hex(data: bytes | None) -> str | None:
    return None if data is None else data.hex()


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "hex" in value:
        return bytes.fromhex(value["hex"])
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def _watch_commands(path: Path) -> None:
    """A host thread: turns lines appended to the commands file into tick actions."""
    offset = 0
    while not _stop.is_set():
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        complete = chunk[: chunk.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.splitlines():
            _actions.put(_decode(json.loads(line)))
        time.sleep(0.01)


def _count() -> None:
    """A host thread that only makes progress while the broker thread releases the GIL."""
    global _counter
    while True:  # never stops: broker shutdown must not wait for it (no Py_FinalizeEx)
        _counter += 1
        time.sleep(0.002)


def plugin_init(options: dict[str, str]) -> None:
    global _record
    if options.get("init_raise"):
        raise RuntimeError("test host refuses to start (init_raise)")
    _record = open(options["record"], "a")  # noqa: SIM115 - lives as long as the broker
    spec = importlib.util.find_spec("structauth")
    _rec("plugin_init", options=options, prefix=sys.prefix, base_prefix=sys.base_prefix,
         structauth=spec.origin if spec else None, argv=sys.argv)
    if "commands" in options:
        threading.Thread(target=_watch_commands, args=(Path(options["commands"]),),
                         name="commands", daemon=True).start()
    threading.Thread(target=_count, name="counter", daemon=False).start()


def plugin_cleanup() -> None:
    _rec("plugin_cleanup")
    _stop.set()


def on_reload(options: dict[str, str]) -> None:
    _rec("on_reload", options=options)


def on_basic_auth(client_id: str, username: str | None, password: bytes | None,
                  address: str, protocol: int) -> Any:
    _rec("on_basic_auth", client_id=client_id, username=username, password=_hex(password),
         address=address, protocol=protocol)
    if username == "raise":
        raise ValueError("basic auth exploded on purpose")
    if username == "garbage":
        return "yes please"
    return MOSQ_ERR_SUCCESS if username == "allow" else MOSQ_ERR_AUTH


def _ext_answer(data: bytes | None) -> Any:
    verb, _, arg = (data or b"").partition(b":")
    if verb == b"ok":
        return MOSQ_ERR_SUCCESS, arg or None
    if verb == b"continue":
        return MOSQ_ERR_AUTH_CONTINUE, b"more"
    if verb == b"unsupported":
        return MOSQ_ERR_NOT_SUPPORTED, None
    if verb == b"raise":
        raise LookupError("extended auth exploded on purpose")
    if verb == b"garbage":
        return "zero", b"x"
    if verb == b"big":
        return MOSQ_ERR_SUCCESS, b"x" * 70000
    return MOSQ_ERR_AUTH, None


def on_ext_auth_start(client_id: str, address: str, protocol: int, method: str,
                      data: bytes | None, *, reauth: bool = False) -> Any:
    _rec("on_ext_auth_start", client_id=client_id, address=address, protocol=protocol,
         method=method, data=_hex(data), reauth=reauth)
    return _ext_answer(data)


def on_ext_auth_continue(client_id: str, address: str, protocol: int, method: str,
                         data: bytes | None, *, reauth: bool = False) -> Any:
    _rec("on_ext_auth_continue", client_id=client_id, address=address, protocol=protocol,
         method=method, data=_hex(data), reauth=reauth)
    return _ext_answer(data)


def on_acl_check(client_id: str, access: int, topic: str, payload: bytes, qos: int,
                 retain: bool) -> Any:
    if not topic.startswith(("bench/", "load/")):
        _rec("on_acl_check", client_id=client_id, access=access, topic=topic,
             n=len(payload), qos=qos, retain=retain)
    if "acl-raise" in topic:
        raise PermissionError("acl check exploded on purpose")
    if "acl-garbage" in topic:
        return None
    return MOSQ_ERR_ACL_DENIED if "acl-deny" in topic else MOSQ_ERR_SUCCESS


def on_message(client_id: str, topic: str, payload: bytes, qos: int, retain: bool) -> Any:
    kind, _, rest = topic.partition("/")
    if kind == "bench":
        return MOSQ_ERR_SUCCESS, None, 0, None
    if kind != "load":
        _rec("on_message", client_id=client_id, topic=topic, n=len(payload), qos=qos,
             retain=retain, sha=hashlib.sha256(payload).hexdigest()[:16], counter=_counter)
    arg = rest.partition("/")[0]
    if kind in ("strip", "load"):
        n = int(arg)
        return MOSQ_ERR_SUCCESS, payload[: len(payload) - n], 0, None
    if kind == "drop":
        return MOSQ_ERR_ACL_DENIED, None, int(arg, 16), "dropped by the test host"
    if kind == "raise":
        raise KeyError("on_message exploded on purpose")
    if kind == "garbage":
        return [0]
    return MOSQ_ERR_SUCCESS, None, 0, None


def on_tick() -> list[tuple[Any, ...]]:
    out = []
    while True:
        try:
            action = _actions.get_nowait()
        except queue.Empty:
            break
        if action == ("raise",):
            raise RuntimeError("on_tick exploded on purpose")
        out.append(action)
    if out:
        _rec("on_tick", actions=[repr(a) for a in out])
    return out


def on_disconnect(client_id: str, reason: int) -> None:
    _rec("on_disconnect", client_id=client_id, reason=reason)
