"""The Python side of the Mosquitto plugin: what the native shim calls.

The shim (broker_plugin/shim/tessera_mosquitto.c) calls these functions on the
broker's single thread, holding the GIL only for the call. They stay cheap and never
wait on IO: the revocation feed is followed by a host thread that queues events, and
the tick applies them (kicks happen on the broker thread, as Mosquitto requires).

Options (``plugin_opt_<name>`` in mosquitto.conf; ``tessera broker config`` writes them):

    python        the virtual environment's python (read by the shim)
    trust_domain  the fleet's trust domain
    bundle        PEM trust bundle (``tessera export-bundle``)
    credential    PEM credential chain of this broker (kind ``broker``)
    key           signer spec of its key: ``pkcs11:<module>#<token>/<label>``,
                  ``tpm:<tcti>#<name>`` or (development) ``insecure-software:<pem>``
    pin_file      file with the PKCS#11 PIN (else $TESSERA_PKCS11_PIN)
    key_dir       TPM key blob directory (for ``tpm:`` keys)
    policy        TOML policy file (broker_plugin/policy.py)
    provisioner   URL of the provisioning service, to follow its revocation feed
    cafile        CA bundle for the provisioner's TLS certificate
    audit_log     JSON-lines audit log path (hash-chained)
    direct        comma-separated topic templates that name one recipient device with
                  ``{id}`` (default ``devices/{id}/commands/#``): messages on them are
                  re-proven to that device under its own session
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from broker_plugin.enforcer import (
    MOSQ_ERR_AUTH,
    MOSQ_ERR_SUCCESS,
    Enforcer,
)
from structauth.errors import ConfigurationError

log = logging.getLogger("tessera.broker")

_state: dict[str, Any] = {}
REQUIRED = ("trust_domain", "bundle", "credential", "key", "policy")
DEFAULT_DIRECT_OPTION = "devices/{id}/commands/#"


def _option_path(options: dict[str, str], name: str) -> Path:
    value = options.get(name)
    if not value:
        raise ConfigurationError(f"plugin_opt_{name} is required")
    path = Path(value)
    if not path.is_file():
        raise ConfigurationError(f"plugin_opt_{name}: {path} does not exist or is not readable")
    return path


def build_enforcer(options: dict[str, str]) -> tuple[Enforcer, Any]:
    """The enforcer for these options; ConfigurationError with one line if wrong."""
    from cryptography import x509

    from broker_plugin.policy import PolicyHolder
    from hw import open_signer
    from structauth.credentials import Credential, TrustStore
    from structauth.handshake import Responder

    missing = [f"plugin_opt_{n}" for n in REQUIRED if not options.get(n)]
    if missing:
        raise ConfigurationError(f"missing {', '.join(missing)} (run 'tessera broker config')")
    bundle = x509.load_pem_x509_certificates(_option_path(options, "bundle").read_bytes())
    credential = Credential.from_pem(_option_path(options, "credential").read_bytes())
    if credential.identity.kind != "broker":
        raise ConfigurationError(
            f"plugin_opt_credential is {credential.identity}, not a broker identity"
        )
    extra: dict[str, Any] = {}
    if options.get("key_dir"):
        extra["key_dir"] = options["key_dir"]
    if options.get("pin_file"):
        extra["pin_file"] = options["pin_file"]
    signer = open_signer(options["key"], **extra)
    holder = PolicyHolder(_option_path(options, "policy"))
    trust = TrustStore(bundle, options["trust_domain"])
    responder = Responder(signer=signer, credential=credential, trust=trust, peer_kind=None)
    direct = tuple(t.strip() for t in options.get("direct", DEFAULT_DIRECT_OPTION).split(",")
                   if t.strip())
    for template in direct:
        if template.split("/").count("{id}") != 1:
            raise ConfigurationError(
                f"plugin_opt_direct: {template!r} must name the recipient with one {{id}} level"
            )
    enforcer = Enforcer(responder, holder, wall_clock=lambda: dt.datetime.now(dt.UTC),
                        direct=direct)
    return enforcer, signer


class RevocationFollower(threading.Thread):
    """Long-polls the provisioning service's revocation feed and queues events for the
    broker thread. Starts from id 0 each time the broker starts, so it always knows
    every revoked credential; reconnects with backoff."""

    def __init__(self, url: str, events: queue.SimpleQueue[dict[str, Any]],
                 cafile: str | None = None) -> None:
        super().__init__(name="tessera-revocations", daemon=True)
        import ssl

        self.url = url.rstrip("/")
        self.events = events
        self.since = 0
        self.stopping = threading.Event()
        self._ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None

    def run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                with urllib.request.urlopen(
                    f"{self.url}/v1/revocations?since={self.since}&wait=20",
                    timeout=30, context=self._ctx,
                ) as resp:
                    batch = json.loads(resp.read())["events"]
                for event in batch:
                    self.events.put(event)
                    self.since = max(self.since, int(event["id"]))
                backoff = 0.5
            except Exception as exc:  # keep following whatever happens; log it
                log.warning("revocation feed %s: %s", self.url, exc)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)


# -- the shim's contract -------------------------------------------------------------


def plugin_init(options: dict[str, str]) -> None:
    enforcer, signer = build_enforcer(options)
    audit = None
    if options.get("audit_log"):
        from broker_plugin.audit import AsyncAuditWriter, AuditLog

        audit = AsyncAuditWriter(AuditLog(Path(options["audit_log"])))
        enforcer.audit = audit.submit
    events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    follower = None
    if options.get("provisioner"):
        follower = RevocationFollower(options["provisioner"], events, options.get("cafile"))
        follower.start()
    _state.update(enforcer=enforcer, signer=signer, events=events, follower=follower,
                  audit=audit, options=options)


def plugin_cleanup() -> None:
    follower = _state.get("follower")
    if follower is not None:
        follower.stopping.set()
    audit = _state.get("audit")
    if audit is not None:
        audit.close()
    _state.clear()


def on_reload(options: dict[str, str]) -> None:
    enforcer: Enforcer = _state["enforcer"]
    holder = enforcer._policy
    try:
        holder.reload(Path(options.get("policy", "")))
        enforcer.audit("policy_reloaded", detail=str(options.get("policy")))
    except ConfigurationError as exc:
        log.error("policy reload refused, keeping the old policy: %s", exc)


def on_basic_auth(client_id: str, username: str | None, password: bytes | None,
                  address: str, protocol: int) -> int:
    if not _state:
        return MOSQ_ERR_AUTH
    return int(_state["enforcer"].basic_auth(client_id, address, protocol))


def on_ext_auth_start(client_id: str, address: str, protocol: int, method: str,
                      data: bytes | None, *, reauth: bool = False) -> tuple[int, bytes | None]:
    # reauth: an AUTH packet (0x19) on a live connection; the shim tells them apart. A
    # successful one replaces the session in place (Enforcer.connect); a failed one
    # makes Mosquitto close the connection.
    rc, out = _state["enforcer"].connect(client_id, address, method, data, time.monotonic())
    return rc, out


def on_ext_auth_continue(client_id: str, address: str, protocol: int, method: str,
                         data: bytes | None) -> tuple[int, bytes | None]:
    # SA1 completes in one round trip; a CONTINUE is a client out of step.
    return MOSQ_ERR_AUTH, None


def on_acl_check(client_id: str, access: int, topic: str, payload: bytes, qos: int,
                 retain: bool) -> int:
    return int(_state["enforcer"].acl(client_id, access, topic))


def on_message(client_id: str, topic: str, payload: bytes, qos: int,
               retain: bool) -> tuple[int, bytes | None, int, str | None]:
    answer = _state["enforcer"].message(client_id, topic, payload, time.monotonic())
    return answer.rc, answer.payload, answer.reason_code, answer.reason


def on_tick() -> list[tuple[Any, ...]]:
    enforcer: Enforcer = _state["enforcer"]
    events: queue.SimpleQueue[dict[str, Any]] = _state["events"]
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            break
        enforcer.revoke(list(event.get("cert_serials", [])), event.get("reason", "revoked"))
    return enforcer.tick(time.monotonic())


def on_disconnect(client_id: str, reason: int) -> None:
    if _state:
        _state["enforcer"].disconnect(client_id)


__all__ = [
    "MOSQ_ERR_SUCCESS",
    "on_acl_check",
    "on_basic_auth",
    "on_disconnect",
    "on_ext_auth_continue",
    "on_ext_auth_start",
    "on_message",
    "on_reload",
    "on_tick",
    "plugin_cleanup",
    "plugin_init",
]
