"""The device agent: keeps one authenticated MQTT connection up, for the applications
on the device (the SDK) and for its own heartbeat.

    tessera-agent run --config /etc/tessera/agent.toml

What it does on its own:

* connects over MQTT 5 (TLS when configured) with an SA1 handshake signed by the
  device's TPM or PKCS#11 key, and verifies what the broker proves to it;
* re-authenticates inside the live connection before the session lifetime ends (an
  MQTT 5 AUTH exchange, make-before-break), or reconnects where that fails;
* resynchronises when its clock and the broker's disagree (drift, a step): the broker
  refuses a message for its epoch and asks on ``tessera/resync``, a delivery fails its
  epoch check here, or the session cannot prove a message any more (keys of the epoch
  erased); the agent then re-handshakes in the live connection and resends every QoS
  1/2 message the broker refused or that was never sent, proven under the new session
  (device/mqtt.py, ``resync_on_refusal``);
* renews its operational credential with the provisioning service once two thirds of
  its lifetime have passed, and uses it from the next handshake on;
* reconnects with exponential backoff and jitter when the broker goes away, and keeps a
  bounded buffer of messages published meanwhile (oldest dropped first, counted);
* answers the broker's step-up requests with fresh hardware proof: a re-authentication
  signed by the device key with the nonce as context, and a TPM quote over the nonce by
  the device's attestation key when the request asks for one; a request the connection
  lost before answering is answered by the next CONNECT (the nonce in its msg1), as
  long as the broker still keeps it.

The SDK (:class:`Agent` in-process: ``publish``, ``subscribe`` with verified callbacks)
is what applications use; docs/AGENT.md is the configuration reference.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import random
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device.state import DeviceState
from structauth.credentials import Identity
from structauth.errors import ConfigurationError, Reason, TesseraError

log = logging.getLogger("tessera.agent")

#: exit status of ``tessera-agent run`` when the broker refused this device as revoked:
#: the agent stops instead of retrying (the unit's RestartPreventExitStatus), since
#: only a new enrollment can help
EXIT_REVOKED = 3
#: reasons that mean "this device is revoked", as the MQTT client reports a refusal
_REVOKED = (Reason.CREDENTIAL_REVOKED, Reason.DEVICE_REVOKED)


def revocation_of(error: BaseException | None) -> str | None:
    """The broker's word, when ``error`` says this device is revoked; else None.

    The interface with device/mqtt.py (which reads the broker's CONNACK / DISCONNECT
    reason code and MQTT 5 reason string): a refusal the client recognises arrives as a
    TesseraError whose reason is CREDENTIAL_REVOKED or DEVICE_REVOKED; a broker reason
    string naming ``credential_revoked`` / ``device_revoked`` in its detail counts too.
    A connection the broker closes hands its error to the agent as the client's
    ``disconnect_error`` attribute (None or absent: no reason known). Anything else, a
    plain "not authorized" included, is retried with backoff.
    """
    if not isinstance(error, TesseraError):
        return None
    detail = error.detail
    if error.reason in _REVOKED or any(r.name.lower() in detail for r in _REVOKED):
        return detail
    return None

#: how long after its deadline the broker keeps an unanswered step-up for a CONNECT that
#: carries its nonce (the broker's step_up_reconnect_window_s default); past it the agent
#: connects plainly and the broker, if it still has the challenge, asks again
STEP_UP_RECONNECT_WINDOW_S = 60.0
#: a broker's bare "not authorized" sends the agent to the fleet's CRL at most this often
CRL_CHECK_INTERVAL_S = 60.0

_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "device": {"state_dir": str},
    "mqtt": {"host": str, "port": int, "tls_cafile": str, "broker_identity": str,
             "keepalive_s": int},
    "session": {"rehandshake_margin_s": (int, float), "resync_min_interval_s": (int, float)},
    "buffer": {"max_messages": int},
    "reconnect": {"initial_s": (int, float), "max_s": (int, float)},
    "renewal": {"enabled": bool, "provisioner": str, "cafile": str, "at_fraction": float},
    "heartbeat": {"topic": str, "interval_s": (int, float)},
}


_FIXES = {
    "device.state_dir": "the directory enrollment wrote (agent.json, operational.pem)",
    "mqtt.tls_cafile": "the PEM bundle of the CA that signed the broker's TLS certificate",
    "renewal.cafile": "the PEM bundle of the CA of the provisioning service's TLS certificate",
}


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    host: str
    #: the broker this device connects to (``mqtt.broker_identity``, required): named
    #: in every msg1 and the only identity accepted in msg2
    broker_identity: str = ""
    port: int = 8883
    tls_cafile: str | None = None
    keepalive_s: int = 30
    rehandshake_margin_s: float = 300.0
    #: unproven signs of clock disagreement re-handshake at most this often
    resync_min_interval_s: float = 1.0
    buffer_max: int = 1000
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    renew: bool = True
    provisioner: str | None = None
    provisioner_cafile: str | None = None
    renew_at_fraction: float = 2 / 3
    heartbeat_topic: str | None = None
    heartbeat_interval_s: float = 60.0
    #: where the configuration came from (error messages name it)
    source: str = "<agent config>"

    @classmethod
    def load(cls, path: Path, state_dir: Path | None = None) -> AgentConfig:
        """Parse ``path`` and check what it names on this machine (files, the device
        state, the broker's trust domain, installed extras): every problem is one
        ConfigurationError line naming the file, the key and the fix. ``state_dir``
        (``run --state DIR``) replaces device.state_dir, and relative file names in
        the configuration are read from it."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the agent configuration {path}: {exc.strerror} (write one as "
                "docs/AGENT.md shows, or pass --config FILE)") from None
        config = cls.parse(text, str(path))
        if state_dir is not None:
            def inside(name: str | None) -> str | None:
                return None if name is None else str(state_dir / name)  # absolute stays

            config = dataclasses.replace(
                config, state_dir=state_dir, tls_cafile=inside(config.tls_cafile),
                provisioner_cafile=inside(config.provisioner_cafile))
        config.check()
        return config

    def _problem(self, key: str, why: str, fix: str) -> ConfigurationError:
        return ConfigurationError(f"{self.source}: {key}: {why}; {fix}")

    def check(self) -> DeviceState:
        """What the configuration names must exist and fit together; the device state.

        Refused here, before anything connects (one line each): a file that is not
        there, a state directory without an enrollment, a broker identity in another
        trust domain than the device's credential, a key backend whose Python package
        (extra) is not installed."""
        for key, value in (("mqtt.tls_cafile", self.tls_cafile),
                           ("renewal.cafile", self.provisioner_cafile)):
            if value is not None and not Path(value).is_file():
                raise self._problem(key, f"{value} does not exist",
                                    f"set it to {_FIXES[key]}")
        if not (self.state_dir / "agent.json").is_file():
            raise self._problem(
                "device.state_dir", f"{self.state_dir} holds no agent.json",
                f"set it to {_FIXES['device.state_dir']}, or enroll this device first "
                "('tessera-agent enroll', or 'tessera enroll --out DIR' at the station)")
        try:
            state = DeviceState.load(self.state_dir)
            device = state.credential().identity
            state.trust()  # bundle.pem there and readable
        except ConfigurationError as exc:
            raise self._problem("device.state_dir", exc.detail,
                                "re-enroll, or point it at a complete state directory"
                                ) from None
        broker = Identity.parse(self.broker_identity)
        if broker.trust_domain != device.trust_domain:
            raise self._problem(
                "mqtt.broker_identity",
                f"{self.broker_identity} is in trust domain {broker.trust_domain!r}, this "
                f"device ({device}) in {device.trust_domain!r}",
                f"use the broker's identity in {device.trust_domain!r}, e.g. "
                f"spiffe://{device.trust_domain}/broker/<name>")
        backend = state.settings["backend"]
        needs = [("paho", "paho-mqtt", "device-tpm" if backend == "tpm" else "device-pkcs11")]
        needs.append(("tpm2_pytss", "tpm2-pytss", "device-tpm") if backend == "tpm"
                     else ("pkcs11", "python-pkcs11", "device-pkcs11"))
        import importlib.util

        for module, package, extra in needs:
            if importlib.util.find_spec(module) is None:
                raise ConfigurationError(
                    f"{self.state_dir / 'agent.json'}: backend {backend!r} needs the Python "
                    f"package {package}, which is not installed; pip install "
                    f"'tessera[{extra}]'")
        return state

    @classmethod
    def parse(cls, text: str, source: str = "<agent config>") -> AgentConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{source}: {exc}") from None
        for section, values in data.items():
            if section not in _SECTIONS:
                raise ConfigurationError(
                    f"{source}: unknown section [{section}] (known: {', '.join(_SECTIONS)}); "
                    "remove it or fix its name (docs/AGENT.md)"
                )
            if not isinstance(values, dict):
                raise ConfigurationError(f"{source}: {section} must be a table ([{section}])")
            for key, value in values.items():
                want = _SECTIONS[section].get(key)
                if want is None:
                    raise ConfigurationError(
                        f"{source}: unknown key {section}.{key} (known in [{section}]: "
                        f"{', '.join(_SECTIONS[section])}); remove it or fix its name")
                if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
                    kinds = want if isinstance(want, tuple) else (want,)
                    names = " or ".join({int: "a number", float: "a number", str: "a string",
                                         bool: "true or false"}[k] for k in kinds)
                    raise ConfigurationError(
                        f"{source}: {section}.{key} has the wrong type; it takes {names}")

        def get(section: str, key: str, default: Any = None) -> Any:
            return data.get(section, {}).get(key, default)

        if not get("mqtt", "host"):
            raise ConfigurationError(f"{source}: mqtt.host is required")
        broker_identity = get("mqtt", "broker_identity")
        if not broker_identity:
            raise ConfigurationError(
                f"{source}: mqtt.broker_identity is required (the broker's SPIFFE ID, e.g. "
                "spiffe://<trust domain>/broker/<name>: the device connects to that broker "
                "only)")
        try:
            if Identity.parse(broker_identity).kind != "broker":
                raise ValueError
        except (TesseraError, ValueError):
            raise ConfigurationError(
                f"{source}: mqtt.broker_identity {broker_identity!r} is not a broker "
                "identity (spiffe://<trust domain>/broker/<name>)") from None
        config = cls(
            state_dir=Path(get("device", "state_dir", "/var/lib/tessera")),
            host=get("mqtt", "host"),
            port=get("mqtt", "port", 8883),
            tls_cafile=get("mqtt", "tls_cafile"),
            broker_identity=broker_identity,
            keepalive_s=get("mqtt", "keepalive_s", 30),
            rehandshake_margin_s=float(get("session", "rehandshake_margin_s", 300)),
            resync_min_interval_s=float(get("session", "resync_min_interval_s", 1)),
            buffer_max=get("buffer", "max_messages", 1000),
            backoff_initial_s=float(get("reconnect", "initial_s", 1)),
            backoff_max_s=float(get("reconnect", "max_s", 60)),
            renew=get("renewal", "enabled", True),
            provisioner=get("renewal", "provisioner"),
            provisioner_cafile=get("renewal", "cafile"),
            renew_at_fraction=get("renewal", "at_fraction", 2 / 3),
            heartbeat_topic=get("heartbeat", "topic"),
            heartbeat_interval_s=float(get("heartbeat", "interval_s", 60)),
            source=source,
        )
        problems = [
            (not 1 <= config.port <= 65535, "mqtt.port must be 1..65535"),
            (config.buffer_max < 0, "buffer.max_messages must be >= 0"),
            (not 0 < config.backoff_initial_s <= config.backoff_max_s,
             "reconnect.initial_s must be > 0 and <= reconnect.max_s"),
            (not 0.1 <= config.renew_at_fraction <= 0.95, "renewal.at_fraction must be 0.1..0.95"),
            (config.heartbeat_interval_s <= 0, "heartbeat.interval_s must be > 0"),
            (config.rehandshake_margin_s < 0, "session.rehandshake_margin_s must be >= 0"),
            (not 0 <= config.resync_min_interval_s <= 3600,
             "session.resync_min_interval_s must be 0..3600"),
        ]
        for bad, why in problems:
            if bad:
                raise ConfigurationError(f"{source}: {why}")
        return config


@dataclass
class _Subscription:
    topic: str
    callback: Callable[[str, bytes], None]
    qos: int
    proven: bool


@dataclass
class AgentStats:
    connects: int = 0
    reconnects: int = 0
    rehandshakes: int = 0
    renewals: int = 0
    buffered_dropped: int = 0
    published: int = 0
    step_ups_on_connect: int = 0  # step-ups answered by a reconnect carrying the nonce
    #: of connections already closed (Agent.totals() adds the live one's)
    resyncs: int = 0  # re-handshakes to resynchronise clocks
    resent: int = 0  # refused or unsent QoS 1/2 messages resent under a newer session
    refused_dropped: int = 0  # refused for another reason than the clock: given up
    requeued: int = 0  # not acknowledged when a connection closed: sent again on the next
    last_error: str = ""
    errors: list[str] = field(default_factory=list)


class Agent:
    """The agent and its SDK: ``start()``, ``publish()``, ``subscribe()``, ``stop()``."""

    def __init__(self, config: AgentConfig, *, client_factory: Any = None,
                 clock: Callable[[], float] = time.monotonic, signer: Any = None) -> None:
        """``clock``: the monotonic clock the sessions run on (given to the MQTT client);
        ``signer``: the device key, instead of opening the one its state names."""
        from device.mqtt import TesseraMqttClient

        self.config = config
        self.state = DeviceState.load(config.state_dir)
        self.identity: Identity = self.state.credential().identity
        self._factory = client_factory or TesseraMqttClient
        self.clock = clock
        self.stats = AgentStats()
        self.client: Any = None
        self.connected = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._buffer: collections.deque[tuple[str, bytes, int, bool]] = collections.deque()
        self._subscriptions: list[_Subscription] = []
        self._signer: Any = signer
        self._own_signer = signer is None  # opened (and closed) here
        self._tpm: Any = None  # the TpmBackend of a TPM-backed device
        self._quote_fn: Callable[[bytes], bytes] | None = None
        #: a step-up a lost connection left unanswered, and until when (self.clock) the
        #: broker may still take its nonce in a CONNECT
        self._outstanding: tuple[Any, float] | None = None
        self._thread: threading.Thread | None = None
        self._renew_retry_at = 0.0
        self._crl_checked_at = -CRL_CHECK_INTERVAL_S  # the first refusal checks at once
        self._renew_due: dt.datetime | None = None
        #: the broker's word when it refused this device as revoked; the agent then
        #: stops (``finished`` is set) instead of retrying
        self.revoked: str | None = None
        #: set when the agent stopped by itself (revoked)
        self.finished = threading.Event()

    # -- SDK ------------------------------------------------------------------
    def topic(self, template: str) -> str:
        """``devices/{id}/telemetry`` with this device's name filled in."""
        return template.replace("{id}", self.identity.name)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Send now if connected (True), else keep it for the next connection (False).
        The proof is made when the message is actually sent."""
        with self._lock:
            if self.connected.is_set() and self.client is not None:
                try:
                    self.client.publish(topic, payload, qos=qos, retain=retain)
                    self.stats.published += 1
                    return True
                except TesseraError as exc:
                    log.warning("publish on %s failed (%s); buffering it", topic, exc)
            self._keep(topic, payload, qos, retain)
            return False

    def _keep(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.config.buffer_max == 0:
            self.stats.buffered_dropped += 1
            return
        if len(self._buffer) >= self.config.buffer_max:
            self._buffer.popleft()
            self.stats.buffered_dropped += 1
        self._buffer.append((topic, payload, qos, retain))

    def subscribe(self, topic: str, callback: Callable[[str, bytes], None], qos: int = 1,
                  *, proven: bool = True) -> None:
        """``callback(topic, payload)`` for each message the broker proves to this
        device (``proven=False`` for fan-out topics); kept across reconnections."""
        sub = _Subscription(topic, callback, qos, proven)
        with self._lock:
            self._subscriptions.append(sub)
            if self.connected.is_set() and self.client is not None:
                self.client.subscribe(topic, callback, qos, proven=proven)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> Agent:
        self._open_key()
        self._thread = threading.Thread(target=self._run, name="tessera-agent", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._lost.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._disconnect()
        if self._signer is not None and self._own_signer:
            getattr(self._signer, "close", lambda: None)()
        if self._tpm is not None:
            self._tpm.close()

    def _open_key(self) -> None:
        """The device key; for a TPM, also the quote function step-ups need, on the same
        TPM connection (one backend: a TPM behind a socket serves one connection)."""
        if not self._own_signer:
            return
        settings = self.state.settings
        if settings["backend"] != "tpm":
            self._signer = self.state.signer()
            return
        from device.attestation import DEFAULT_AK_NAME
        from device.mqtt import tpm_quote_fn
        from device.state import DEVICE_KEY_NAME
        from hw.tpm import TpmBackend

        backend = TpmBackend(settings["tcti"], settings["key_dir"])
        try:
            self._signer = backend.load_signing_key(DEVICE_KEY_NAME)
        except BaseException:
            backend.close()
            raise
        self._tpm = backend
        quote: list[Callable[[bytes], bytes]] = []

        def quote_fn(nonce: bytes) -> bytes:
            # the AK (enrollment made it) is opened at the first quote, not at start
            if not quote:
                quote.append(tpm_quote_fn(backend, DEFAULT_AK_NAME))
            return quote[0](nonce)

        self._quote_fn = quote_fn

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def _disconnect(self) -> None:
        with self._lock:
            self.connected.clear()
            client, self.client = self.client, None
        if client is not None:
            self._keep_step_up(client)
            try:
                client.close()
            except Exception as exc:  # a dead connection may fail to close; that is fine
                log.debug("close: %s", exc)
            self._retire(client)

    def _retire(self, client: Any) -> None:
        """A closed connection: its counts into the stats, and what the broker never
        accepted back to the front of the buffer, for the next connection."""
        stats = self.stats
        stats.resyncs += getattr(client, "resyncs", 0)
        stats.resent += getattr(client, "resent", 0)
        stats.refused_dropped += getattr(client, "refused_dropped", 0)
        take = getattr(client, "unacknowledged", None)
        if take is None:
            return
        kept = take()
        with self._lock:
            for out in reversed(kept):
                self._buffer.appendleft((out.topic, out.payload, out.qos, out.retain))
            stats.requeued += len(kept)
            while len(self._buffer) > max(self.config.buffer_max, len(kept)):
                self._buffer.pop()  # the newest beyond the bound: never what was in flight
                stats.buffered_dropped += 1

    def totals(self) -> AgentStats:
        """The stats with the live connection's counts added."""
        import dataclasses

        client = self.client
        return dataclasses.replace(
            self.stats,
            resyncs=self.stats.resyncs + getattr(client, "resyncs", 0),
            resent=self.stats.resent + getattr(client, "resent", 0),
            refused_dropped=self.stats.refused_dropped + getattr(client, "refused_dropped", 0),
            errors=list(self.stats.errors))

    def _connect(self) -> None:
        credential = self.state.credential()
        client = self._factory(
            signer=self._signer, credential=credential, trust=self.state.trust(),
            host=self.config.host, port=self.config.port,
            broker=Identity.parse(self.config.broker_identity),
            tls_cafile=self.config.tls_cafile, keepalive=self.config.keepalive_s,
            clock=self.clock,
        )
        if hasattr(client, "resync_min_interval_s"):
            client.resync_min_interval_s = self.config.resync_min_interval_s
        context, quote = self._step_up_answer()
        if context:
            try:
                client.connect(context=context, quote=quote)
            except TesseraError as exc:
                if exc.reason != Reason.BACKEND_UNAVAILABLE:
                    self._outstanding = None  # refused: the next attempt connects plainly
                raise
            self.stats.step_ups_on_connect += 1
            log.info("answered the outstanding step-up in the CONNECT")
        else:
            client.connect()
        self._outstanding = None
        previous = client.client.on_disconnect

        def lost(*args: Any) -> None:
            if previous is not None:
                previous(*args)
            if self.client is client:  # an old connection's late news changes nothing
                why = revocation_of(getattr(client, "disconnect_error", None))
                if why is not None:
                    self._revoke(why)
                self.connected.clear()
                self._lost.set()

        client.client.on_disconnect = lost
        if hasattr(client, "answer_step_ups"):
            client.answer_step_ups(self._quote_fn)
        if hasattr(client, "resync_on_refusal"):
            client.resync_on_refusal(self._flush)
        with self._lock:
            self.client = client
            for sub in self._subscriptions:
                client.subscribe(sub.topic, sub.callback, sub.qos, proven=sub.proven)
            # what was kept offline goes first, in order, before anything new
            self._flush_locked(client)
            self._lost.clear()
            self.connected.set()

    def _flush(self) -> None:
        """Send what was buffered while the connection could not prove (after a
        resynchronisation or a re-handshake)."""
        with self._lock:
            client = self.client
            if client is not None and self.connected.is_set():
                self._flush_locked(client)

    def _flush_locked(self, client: Any) -> None:
        while self._buffer:
            topic, payload, qos, retain = self._buffer[0]
            try:
                client.publish(topic, payload, qos=qos, retain=retain)
            except TesseraError as exc:  # kept, in order, for the next resync
                log.info("buffered messages wait: %s", exc)
                return
            self._buffer.popleft()
            self.stats.published += 1

    def _keep_step_up(self, client: Any) -> None:
        """Keep the step-up request ``client`` (a connection being dropped) received and
        did not answer: the broker takes its nonce in a CONNECT until the request's
        deadline plus its reconnect window have passed."""
        request = getattr(client, "pending_step_up", None)
        clock = getattr(client, "clock", None)
        if request is None or clock is None:
            return
        left = request.received_at + request.deadline_s + STEP_UP_RECONNECT_WINDOW_S - clock()
        if left > 0:
            self._outstanding = (request, self.clock() + left)

    def _step_up_answer(self) -> tuple[bytes, bytes]:
        """(context, quote) for the next CONNECT: the outstanding step-up's nonce and, if
        it asked for one, a TPM quote over it; empty when there is nothing to answer."""
        kept = self._outstanding
        if kept is None or self.clock() >= kept[1]:
            self._outstanding = None
            return b"", b""
        request = kept[0]
        if not request.quote:
            return request.nonce, b""
        if self._quote_fn is None:
            self._outstanding = None  # cannot answer it: connect, and be asked again
            return b"", b""
        try:
            return request.nonce, self._quote_fn(request.nonce)
        except TesseraError as exc:
            self._note(f"step-up quote: {exc}")
            self._outstanding = None
            return b"", b""

    def _run(self) -> None:
        backoff = self.config.backoff_initial_s
        next_heartbeat = 0.0
        while not self._stop.is_set():
            # renewal needs only the provisioning service: an agent that cannot reach
            # its broker must still renew, or it would come back with an expired credential
            self._maybe_renew()
            if not self.connected.is_set():
                try:
                    self._disconnect()
                    self._connect()
                    self.stats.connects += 1
                    if self.stats.connects > 1:
                        self.stats.reconnects += 1
                    log.info("connected to %s:%d as %s", self.config.host, self.config.port,
                             self.identity)
                    backoff = self.config.backoff_initial_s
                except TesseraError as exc:
                    why = revocation_of(exc)
                    if why is None and exc.reason is Reason.NOT_AUTHORIZED:
                        # Mosquitto gives a refused CONNECT no reason string: the
                        # fleet's signed CRL says whether it is this device's revocation
                        why = self._revoked_per_crl()
                    if why is not None:
                        self._revoke(why)
                        break
                    self._note(f"connect: {exc}")
                    delay = backoff * random.uniform(0.5, 1.5)
                    backoff = min(backoff * 2, self.config.backoff_max_s)
                    self._stop.wait(delay)
                    continue
            now = self.clock()
            if self.config.heartbeat_topic and now >= next_heartbeat:
                self.publish(self.topic(self.config.heartbeat_topic),
                             dt.datetime.now(dt.UTC).isoformat().encode())
                next_heartbeat = now + self.config.heartbeat_interval_s
            self._maybe_rehandshake()
            self._lost.wait(0.2)
        if self.revoked is not None:
            self.finished.set()

    def _revoked_per_crl(self) -> str | None:
        """The fleet authority's CRL (public, signed) names this device's operational
        credential: the reason the broker gives only as "not authorized". At most once
        per CRL_CHECK_INTERVAL_S; None when it does not, or cannot be read or verified
        (then the refusal is retried like any other)."""
        url = self.config.provisioner or self.state.provisioner
        if not url or self.clock() - self._crl_checked_at < CRL_CHECK_INTERVAL_S:
            return None
        self._crl_checked_at = self.clock()
        from cryptography import x509

        from device.provisioner import ProvisionerClient

        try:
            der = ProvisionerClient(url, cafile=self.config.provisioner_cafile,
                                    timeout=5.0).call("GET", "/v1/crl", raw=True)
            crl = x509.load_der_x509_crl(der)
            chain = self.state.credential().chain
            cert = chain[0]
            # signed by the fleet's root or an issuer in this device's own chain
            issuers = [c for c in (*self.state.trust().roots, *chain[1:])
                       if c.subject == crl.issuer]
            if not any(crl.is_signature_valid(c.public_key())  # type: ignore[arg-type]
                       for c in issuers):
                log.warning("the CRL from %s is not signed by this fleet; ignored", url)
                return None
        except (TesseraError, ValueError, TypeError) as exc:
            log.info("could not check the fleet's CRL: %s", exc)
            return None
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is None:
            return None
        return (f"credential_revoked: the fleet's CRL lists this device's credential "
                f"{cert.serial_number:x} (revoked {entry.revocation_date_utc:%Y-%m-%d %H:%M} "
                "UTC)")

    def _revoke(self, why: str) -> None:
        """Said once; then the loop ends: retrying a revoked identity only hammers the
        broker, and only a new enrollment helps."""
        if self.revoked is not None:
            return
        self.revoked = why
        self.stats.last_error = f"revoked: {why}"
        log.error("the broker refused this device as revoked (%s); stopping. Re-enroll it "
                  "('tessera-agent enroll --reenroll', or 'tessera enroll --reenroll' at the "
                  "station) and start the agent again", why)
        self._stop.set()
        self._lost.set()
        self.finished.set()

    def _note(self, text: str) -> None:
        log.warning("%s", text)
        self.stats.last_error = text
        self.stats.errors = [*self.stats.errors[-19:], text]

    def _maybe_rehandshake(self) -> None:
        client = self.client
        session = getattr(client, "session", None)
        if client is None or session is None:
            return
        if self.clock() < session.expires_at - self.config.rehandshake_margin_s:
            return
        try:
            if hasattr(client, "reauthenticate"):
                client.reauthenticate()
            else:
                self.connected.clear()  # no AUTH support: a fresh CONNECT instead
            self.stats.rehandshakes += 1
        except TesseraError as exc:
            why = revocation_of(exc)
            if why is not None:
                self._revoke(why)
            else:
                self._note(f"re-handshake: {exc}")
            self.connected.clear()
            return
        self._flush()

    def _maybe_renew(self) -> None:
        if not self.config.renew:
            return
        if self._renew_due is None:  # read once per credential, not on every loop pass
            cert = self.state.credential().chain[0]
            start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
            self._renew_due = start + (end - start) * self.config.renew_at_fraction
        if dt.datetime.now(dt.UTC) < self._renew_due or self._renew_retry_at > self.clock():
            return
        url = self.config.provisioner or self.state.provisioner
        if not url:
            return
        from device.provisioner import CredentialStore, ProvisionerClient, renew

        try:
            issued = renew(ProvisionerClient(url, cafile=self.config.provisioner_cafile),
                           self._signer, self.state.serial)
        except TesseraError as exc:
            self._note(f"renewal: {exc}")
            self._renew_retry_at = self.clock() + 30 * random.uniform(0.5, 1.5)
            return
        CredentialStore(self.state.directory).save(issued)
        self._renew_due = None
        self.stats.renewals += 1
        log.info("operational credential renewed; valid until %s",
                 issued["operational_not_after"])
        client = self.client
        if client is not None:
            client.credential = self.state.credential()  # the next handshake shows it
            if hasattr(client, "reauthenticate"):
                try:
                    client.reauthenticate()
                    self.stats.rehandshakes += 1
                except TesseraError as exc:
                    self._note(f"re-handshake after renewal: {exc}")
                    self.connected.clear()

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
