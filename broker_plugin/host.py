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
    revocation_file, revocation_grace_s, revocation_stale
                  the revoked set and feed position kept across restarts, and what
                  a feed unreachable for longer than the grace means for new
                  handshakes (broker_plugin/revocation_store.py)
    quarantine_database
                  postgresql:// URL shared by replicas: a quarantine decided at one
                  is entered at the others (broker_plugin/quarantine_store.py)
    cafile        CA bundle for the provisioner's TLS certificate
    audit_log     JSON-lines audit log path (hash-chained)
    direct        comma-separated topic templates that name one recipient device with
                  ``{id}`` (default ``devices/{id}/commands/#``): messages on them are
                  re-proven to that device under its own session
    metrics_port  serve Prometheus metrics (``GET /metrics``) on 127.0.0.1:<port>
                  from a host thread; 0 picks a free port (logged). Unset: no metrics.
    attestation_keys
                  directory of enrolled attestation keys, ``<device name>.akpub`` each
                  holding the AK's marshalled TPM2B_PUBLIC (the enrollment evidence's
                  ``ak_public``); a step-up quote from such a device must be signed by
                  exactly that AK (re-read on SIGHUP). Without it a quote is checked
                  for freshness and form only (broker_plugin/stepup.py says what that
                  proves).
    nonce_file    keep the msg1 nonce cache in this file, so that a msg1 captured
                  before a restart is refused at once (HANDSHAKE_REPLAYED) after it
    nonce_database
                  postgresql:// URL shared by replicas (same broker identity): each
                  refuses the msg1s the others answered, once synced
                  (broker_plugin/nonce_store.py; nonce_poll_s, default 1 s, is the
                  readers' fallback poll)

Sessions and handshakes (the session parameters go to every device in msg2; the
defaults are those of structauth.params.SessionParams and
broker_plugin.enforcer.PendingLimits):

    session_epoch_ms         10000   epoch length P (100 .. 3600000)
    session_skew_epochs          2   epochs either side a receiver accepts (0 .. 16)
    session_lifetime_s        3600   a session ends after this; agents re-handshake
                                     before it (1 .. 604800)
    session_replay_window     1024   sequence numbers kept for replay checks (32 .. 65535)
    pending_timeout_s           10   a handshake answered with msg2 waits this long for
                                     the client's msg3 (key confirmation), (0, 60]
    pending_max               1024   pending handshakes held in total
    pending_per_source          16   ... per source (an IPv4 address, an IPv6 /64)
    pending_per_client           2   ... per client id
    A new pending handshake beyond a bound evicts the oldest pending one of that client
    id, source or table (docs/MQTT.md); confirmed sessions are never evicted.

Step-up, quarantine and rotation (broker_plugin/enforcer.py describes the flow; the
defaults are those of broker_plugin.stepup.StepUpSettings). Durations in seconds,
switches ``on``/``off``:

    step_up_deadline_s          30   time to answer a step-up request before a kick
    step_up_reconnect_window_s  60   after that kick, a CONNECT carrying the nonce
                                     still answers the challenge
    step_up_fresh_s            300   a step-up satisfies sensitive topics this long
    step_up_change_grace_s      60   time live sessions get to step up after a policy
                                     change or a new broker credential / trust bundle
    rotation_grace_s            30   a replaced session keeps verifying in-flight
                                     messages this long after a re-authentication
                                     (default: (skew_epochs + 1) x epoch, 30 s with the
                                     default session parameters)
    step_up_new_network         on   a device connecting from a network (IPv4 /24,
                                     IPv6 /64) it has not used must step up first
    step_up_new_network_quote  off   ... with a TPM quote
    network_memory               8   networks remembered per device (LRU)
    max_identities          100000   identities remembered for networks, rates, breaker
    step_up_rate_spike          on   ask a device whose rate jumps far above its baseline
    rate_factor                 10   ... above factor x its EWMA baseline
    rate_min                    20   ... and above this many messages per second
    rate_window_s               10   ... counted per window of this length
    quarantine_failures          3   failed step-ups within the window that quarantine
                                     an identity (0: never)
    quarantine_rejections      500   rejected messages within the window that do (0:
                                     never); refusals for the epoch, replays of an
                                     accepted sequence number and messages under the
                                     device's own older sessions never count
    quarantine_window_s        300
    quarantine_s               600   how long a quarantine lasts (kick, handshakes
                                     refused)
    resync_interval_s            1   at most one tessera/resync request (re-handshake,
                                     your clock drifted) per session this often

SIGHUP (``on_reload``): the policy is re-read; if its digest changed, every live session
is asked to step up. The bundle and the broker credential are re-read too; if either
changed, the responder is rebuilt (the key re-opened) and every live session is asked
to step up (trigger ``key_change``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import hashlib
import logging
import os
import queue
import time
from pathlib import Path
from typing import Any

from broker_plugin.enforcer import (
    MOSQ_ERR_AUTH,
    MOSQ_ERR_SUCCESS,
    Enforcer,
    PendingLimits,
)
from broker_plugin.fastlane import FastLane
from broker_plugin.stepup import (
    KEY_CHANGE,
    POLICY_CHANGE,
    STEP_UP_OPTIONS,
)
from broker_plugin.stepup import (
    parse_settings as parse_settings,  # re-exported: callers import it from here
)
from structauth.errors import ConfigurationError, TesseraError
from structauth.fanout import FanoutSigner
from structauth.handshake import DEFAULT_PENDING_TIMEOUT
from structauth.params import SessionParams

log = logging.getLogger("tessera.broker")

_state: dict[str, Any] = {}
REQUIRED = ("trust_domain", "bundle", "credential", "key", "policy")
DEFAULT_DIRECT_OPTION = "devices/{id}/commands/#"
#: the cyclic collector's first-generation threshold inside the broker (default 700)
GC_THRESHOLD = 20_000


def _option_path(options: dict[str, str], name: str) -> Path:
    value = options.get(name)
    if not value:
        raise ConfigurationError(f"plugin_opt_{name} is required")
    path = Path(value)
    if not path.is_file():
        raise ConfigurationError(f"plugin_opt_{name}: {path} does not exist or is not readable")
    return path


# plugin option -> (StepUpSettings field, kind, minimum): broker_plugin.stepup's table
_SETTINGS = STEP_UP_OPTIONS


# plugin option -> SessionParams field
_SESSION: dict[str, str] = {
    "session_epoch_ms": "epoch_ms",
    "session_skew_epochs": "skew_epochs",
    "session_lifetime_s": "lifetime_s",
    "session_replay_window": "replay_window",
}
# plugin option -> PendingLimits field
_PENDING: dict[str, str] = {
    "pending_max": "total",
    "pending_per_source": "per_source",
    "pending_per_client": "per_client",
}


def _whole(options: dict[str, str], option: str) -> int | None:
    raw = options.get(option)
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigurationError(f"plugin_opt_{option}: {raw!r} is not a whole number") from None


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """What the broker offers and holds per handshake: the session parameters every
    msg2 carries, how long a pending handshake waits for msg3, and the pending bounds."""

    params: SessionParams
    pending_timeout: float
    pending: PendingLimits


def parse_session(options: dict[str, str]) -> SessionOptions:
    """SessionOptions from ``plugin_opt_*`` values; ConfigurationError with one line
    naming the option for a bad one."""
    values: dict[str, int] = {}
    for option, name in _SESSION.items():
        value = _whole(options, option)
        if value is not None:
            values[name] = value
    try:
        params = SessionParams(**values)  # type: ignore[arg-type]
    except TesseraError as exc:
        given = ", ".join(f"plugin_opt_{o} {values[n]}" for o, n in _SESSION.items()
                          if n in values)
        raise ConfigurationError(f"{given}: {exc.detail}") from None
    raw = options.get("pending_timeout_s")
    timeout = DEFAULT_PENDING_TIMEOUT
    if raw is not None:
        try:
            timeout = float(raw)
            if not 0 < timeout <= 60:
                raise ValueError
        except ValueError:
            raise ConfigurationError(f"plugin_opt_pending_timeout_s: {raw!r} is not seconds "
                                     "in (0, 60]") from None
    limits: dict[str, int] = {}
    for option, name in _PENDING.items():
        value = _whole(options, option)
        if value is not None:
            limits[name] = value
    pending = PendingLimits(**limits)
    bad = pending.problem()
    if bad:
        given = ", ".join(f"plugin_opt_{o} {limits[n]}" for o, n in _PENDING.items()
                          if n in limits)
        raise ConfigurationError(f"{given}: pending handshakes {bad}")
    return SessionOptions(params, timeout, pending)


FANOUT_OPTIONS = ("fanout_interval_ms", "fanout_delay")


def parse_fanout(options: dict[str, str], now: float) -> FanoutSigner | None:
    """Fan-out proofs (structauth.fanout) when ``plugin_opt_fanout_interval_ms`` is set;
    ConfigurationError with one line for a bad value."""
    raw = options.get("fanout_interval_ms")
    if raw is None:
        return None
    try:
        interval_ms = int(raw)
        delay = int(options.get("fanout_delay", "2"))
        if not (50 <= interval_ms <= 60_000 and 1 <= delay <= 16):
            raise ValueError  # checked here too: a huge interval overflows the float
        return FanoutSigner(os.urandom, now, interval_s=interval_ms / 1000.0, delay=delay,
                            length=max(3600, 2 * delay + 2))
    except ValueError:
        raise ConfigurationError(
            f"plugin_opt_fanout_interval_ms {raw!r} / plugin_opt_fanout_delay "
            f"{options.get('fanout_delay')!r}: a whole number of ms 50..60000 and a delay of "
            "1..16 intervals") from None


def load_attestation_keys(directory: str) -> dict[str, bytes]:
    """``<device name>.akpub`` files of a directory: device name -> TPM2B_PUBLIC."""
    from broker_plugin.stepup import parse_ak_public

    path = Path(directory)
    if not path.is_dir():
        raise ConfigurationError(f"plugin_opt_attestation_keys: {path} is not a directory")
    keys: dict[str, bytes] = {}
    for file in sorted(path.glob("*.akpub")):
        data = file.read_bytes()
        try:
            parse_ak_public(data)
        except TesseraError as exc:
            raise ConfigurationError(
                f"plugin_opt_attestation_keys: {file} is not an attestation key's "
                f"TPM2B_PUBLIC: {exc.detail}") from None
        keys[file.name[: -len(".akpub")]] = data
    return keys


def _identity_files_digest(options: dict[str, str]) -> bytes:
    """What the broker's own identity is made of: trust bundle, credential, key spec."""
    h = hashlib.sha256()
    for name in ("bundle", "credential"):
        h.update(_option_path(options, name).read_bytes())
        h.update(b"\0")
    h.update(options.get("key", "").encode())
    return h.digest()


def build_responder(options: dict[str, str], nonces: Any = None) -> tuple[Any, Any]:
    """(Responder, signer) for the broker identity these options name, offering the
    session parameters they set."""
    from cryptography import x509

    from hw import open_signer
    from structauth.credentials import Credential, TrustStore
    from structauth.handshake import Responder

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
    trust = TrustStore(bundle, options["trust_domain"])
    session = parse_session(options)
    responder = Responder(signer=signer, credential=credential, trust=trust, peer_kind=None,
                          nonce_cache=nonces, params=session.params,
                          pending_timeout=session.pending_timeout)
    return responder, signer


def build_enforcer(options: dict[str, str]) -> tuple[Enforcer, Any]:
    """The enforcer for these options; ConfigurationError with one line if wrong."""
    from broker_plugin.policy import PolicyHolder

    missing = [f"plugin_opt_{n}" for n in REQUIRED if not options.get(n)]
    if missing:
        raise ConfigurationError(f"missing {', '.join(missing)} (run 'tessera broker config')")
    settings = parse_settings(options)
    session = parse_session(options)  # checked before the key is opened
    if "rotation_grace_s" not in options:  # as long as the epoch window accepts
        p = session.params
        settings = dataclasses.replace(
            settings, rotation_grace_s=(p.skew_epochs + 1) * p.epoch_ms / 1000.0)
    responder, signer = build_responder(options)
    holder = PolicyHolder(_option_path(options, "policy"))
    direct = tuple(t.strip() for t in options.get("direct", DEFAULT_DIRECT_OPTION).split(",")
                   if t.strip())
    for template in direct:
        if template.split("/").count("{id}") != 1:
            raise ConfigurationError(
                f"plugin_opt_direct: {template!r} must name the recipient with one {{id}} level"
            )
    enforcer = Enforcer(responder, holder, wall_clock=lambda: dt.datetime.now(dt.UTC),
                        direct=direct, settings=settings, pending=session.pending)
    if options.get("attestation_keys"):
        _use_attestation_keys(enforcer, load_attestation_keys(options["attestation_keys"]))
    return enforcer, signer


def _use_attestation_keys(enforcer: Enforcer, keys: dict[str, bytes]) -> None:
    def enrolled(identity: Any) -> bytes | None:
        return keys.get(identity.name) if identity.kind == "device" else None

    enforcer.attestation_key_of = enrolled


class RevocationFeed:
    """The revocation feed as the broker thread sees it: the follower thread
    (broker_plugin/revocation_store.py), the persisted revoked set and position, and the
    feed's health with its alarm (metric and audit records at start and end)."""

    def __init__(self, options: dict[str, str], enforcer: Enforcer) -> None:
        from broker_plugin.revocation_store import (
            FeedFollower,
            FeedHealth,
            RevocationEvent,
            RevocationStore,
            parse_feed_options,
        )

        path, grace, policy = parse_feed_options(options)
        self.enforcer = enforcer
        self.store = RevocationStore(path)
        self.store.lock()
        loaded = self.store.load()
        now, wall = time.monotonic(), time.time()
        self.health = FeedHealth(grace_s=grace, policy=policy)
        if self.store.synced_at is not None:  # the outage is counted across restarts
            self.health.last_ok = now - min(max(0.0, wall - self.store.synced_at), 1e9)
        for event in loaded:  # applied and audited when they first came: no kicks now
            enforcer.revoked_serials.update(event.cert_serials)
        if self.store.damaged:
            log.error("revocation file damaged, set aside; following the feed from the "
                      "start: %s", self.store.damaged)
            enforcer.audit("revocation_file_damaged", detail=self.store.damaged)
        if self.store.path is not None:
            enforcer.audit("revocations_loaded", count=len(loaded), since=self.store.since,
                           file=str(self.store.path))
        self.events: queue.SimpleQueue[RevocationEvent] = queue.SimpleQueue()
        self.follower = FeedFollower(options["provisioner"], self.store, self.health,
                                     self.events, options.get("cafile"))
        self.metrics: Any = None
        if enforcer.metrics is not None:
            r = enforcer.metrics.registry
            self.metrics = (
                r.gauge("tessera_revocation_feed_stale", "1 while the revocation feed has "
                        "been unreachable for longer than revocation_grace_s (alarm)."),
                r.gauge("tessera_revocation_feed_age_seconds", "Seconds since the "
                        "revocation feed last answered (0 while it is healthy)."),
                r.counter("tessera_revocation_feed_errors_total",
                          "Failed polls of the revocation feed."),
                r.counter("tessera_revocation_events_total",
                          "Revocation events applied (each feed event once)."),
                r.gauge("tessera_revocation_feed_position",
                        "Id of the last revocation event the broker holds."),
            )
        self._errors_exported = 0
        self._next_check = 0.0
        self.follower.initial_sync()  # the current set before the listener opens
        self.check(time.monotonic())
        self.follower.start()

    def check(self, now: float) -> None:
        """Broker thread, every tick: apply queued events (each audited once), raise or
        clear the staleness alarm, export the metrics."""
        enforcer, h = self.enforcer, self.health
        while not self.events.empty():  # on every tick (under load, every loop pass)
            event = self.events.get_nowait()
            enforcer.audit("revocation_applied", event_id=event.id,
                           identity=event.identity or None,
                           cert_serials=list(event.cert_serials), reason=event.reason)
            enforcer.revoke(list(event.cert_serials), event.reason)
            h.events_applied += 1
            if self.metrics is not None:
                self.metrics[3].inc()
        if now < self._next_check:  # the alarm and the metrics: every 100 ms
            return
        self._next_check = now + 0.1
        stale = h.stale(now)
        if stale != h.alarm:
            h.alarm = stale
            if stale:
                h.alarm_since = now
                age = h.age(now)
                log.error("revocation feed stale (no answer for %s, grace %g s): %s",
                          "ever" if age == float("inf") else f"{age:.1f} s", h.grace_s,
                          "new handshakes refused" if h.policy == "refuse"
                          else "new handshakes still allowed")
                enforcer.audit("revocation_feed_stale", grace_s=h.grace_s, policy=h.policy,
                               since_answer_s=None if age == float("inf") else round(age, 3),
                               position=self.store.since, detail=h.last_error)
            else:
                log.warning("revocation feed answering again after %.1f s stale",
                            now - h.alarm_since)
                enforcer.audit("revocation_feed_restored", stale_s=round(now - h.alarm_since, 3),
                               position=self.store.since, policy=h.policy)
        if self.metrics is not None:
            stale_g, age_g, errors_c, _, position_g = self.metrics
            stale_g.set(1.0 if stale else 0.0)
            age = h.age(now)
            age_g.set(age if age != float("inf") else -1.0)
            if h.errors != self._errors_exported:
                errors_c.inc(h.errors - self._errors_exported)
                self._errors_exported = h.errors
            position_g.set(float(self.store.since))

    def refusal(self, client_id: str, address: str, now: float, reauth: bool) -> bool:
        """Refuse a new handshake because the feed is stale (policy ``refuse``)?
        Audited and counted like any refused handshake."""
        h = self.health
        if not h.refuses(now):
            return False
        age = h.age(now)
        self.enforcer.audit(
            "handshake_refused", client_id=client_id, address=address,
            reason="revocation_feed_stale", reauth=reauth, stage="msg1",
            detail=f"the revocation feed has not answered for "
                   f"{'ever' if age == float('inf') else f'{age:.0f} s'} "
                   f"(grace {h.grace_s:g} s): new handshakes are refused")
        if self.enforcer.metrics is not None:
            self.enforcer.metrics.rejected("revocation_feed_stale")
        return True

    def close(self) -> None:
        self.follower.stop()
        self.store.close()


class AuditAlarm:
    """The audit log failing to write (disk full, I/O error): the broker keeps
    enforcing (authentication and authorisation never wait on the audit log; refusing
    every device because a log disk filled would turn it into an outage of the fleet)
    and raises ``tessera_audit_failing`` to 1, counting ``tessera_audit_records_lost_total``;
    once a record is written again the alarm clears and the log itself says what is
    missing (the writer's ``audit_overflow`` record with the counts)."""

    INTERVAL_S = 0.25

    def __init__(self, writer: Any, metrics: Any) -> None:
        self.writer = writer
        r = metrics.registry
        self.failing = r.gauge("tessera_audit_failing", "1 while the audit log cannot be "
                               "written (records are being lost: disk full?).")
        self.lost = r.counter("tessera_audit_records_lost_total", "Audit records not "
                              "written (write failed or queue full).")
        self._failed = self._written = self._lost = 0
        self._next = 0.0
        self.alarm = False

    def check(self, now: float) -> None:
        if now < self._next:
            return
        self._next = now + self.INTERVAL_S
        w = self.writer
        failed, written = w.failed_total, w.written_total
        lost = failed + w.dropped_total
        if lost > self._lost:
            self.lost.inc(lost - self._lost)
            self._lost = lost
        if failed > self._failed and not self.alarm:
            self.alarm = True
            self.failing.set(1.0)
            log.error("audit log %s cannot be written: %s (still enforcing; records lost)",
                      w.log.path, w.last_error)
        elif self.alarm and failed == self._failed and written > self._written:
            self.alarm = False
            self.failing.set(0.0)
            log.warning("audit log %s written again", w.log.path)
        self._failed, self._written = failed, written


# -- the shim's contract -------------------------------------------------------------


def plugin_init(options: dict[str, str]) -> None:
    enforcer, signer = build_enforcer(options)
    enforcer.fast = FastLane.load()  # built into the plugin; None elsewhere
    enforcer.fanout = parse_fanout(options, time.monotonic())
    metrics_server = None
    if options.get("metrics_port"):
        from broker_plugin.metrics import BrokerMetrics

        try:
            port = int(options["metrics_port"])
            if not 0 <= port <= 65535:
                raise ValueError
        except ValueError:
            raise ConfigurationError(
                f"plugin_opt_metrics_port: {options['metrics_port']!r} is not a port "
                "(0..65535)") from None
        metrics = BrokerMetrics()
        metrics_server = metrics.serve("127.0.0.1", port)
        enforcer.metrics = metrics
        enforcer.timer = time.perf_counter
        if enforcer.fast is not None:
            enforcer.fast.set_timing(metrics.verify_seconds.buckets)
        log.warning("tessera: metrics on %s", metrics_server.url)
    from broker_plugin.nonce_store import NonceSync

    nonces = NonceSync.from_options(options, enforcer.responder.nonces,
                                    enforcer.responder.identity.uri)
    if nonces is not None and enforcer.metrics is not None:
        nonces.bind_metrics(enforcer.metrics)
    audit = None
    if options.get("audit_log"):
        from broker_plugin.audit import AsyncAuditWriter, AuditLog

        audit = AsyncAuditWriter(AuditLog(Path(options["audit_log"])))
        enforcer.audit = audit.submit
    audit_alarm = AuditAlarm(audit, enforcer.metrics) \
        if audit is not None and enforcer.metrics is not None else None
    feed = RevocationFeed(options, enforcer) if options.get("provisioner") else None
    from broker_plugin.quarantine_store import QuarantineShare

    quarantine = QuarantineShare.from_options(options, enforcer.responder.identity.uri)
    if quarantine is not None:
        quarantine.start()
    if feed is None:
        from broker_plugin.revocation_store import parse_feed_options

        parse_feed_options(options)  # revocation_* options without a feed: one line
    # A handshake allocates many short-lived container objects (certificate parsing,
    # key shares, events): with CPython's default gen0 threshold (700) the cyclic
    # collector ran every few handshakes (measured: 109 collections in 600 handshakes,
    # 3 with this threshold; 3-5% of a first-contact handshake's CPU), and its older
    # generations grow with every live session. What exists now (modules, policy,
    # keys) is frozen out of the collector; collections are rarer.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    _state.update(enforcer=enforcer, signer=signer, feed=feed, audit_alarm=audit_alarm,
                  quarantine=quarantine,
                  audit=audit, options=options, metrics_server=metrics_server,
                  identity_digest=_identity_files_digest(options), nonces=nonces)


def plugin_cleanup() -> None:
    feed = _state.get("feed")
    if feed is not None:
        feed.close()
    quarantine = _state.get("quarantine")
    if quarantine is not None:
        quarantine.close()
    audit = _state.get("audit")
    if audit is not None:
        audit.close()
    server = _state.get("metrics_server")
    if server is not None:
        server.close()
    nonces = _state.get("nonces")
    if nonces is not None:
        nonces.close()
    _state.clear()


def on_reload(options: dict[str, str]) -> None:
    """SIGHUP: re-read the policy, the attestation keys and the broker's own identity
    files; a changed policy or identity asks every live session to step up."""
    enforcer: Enforcer = _state["enforcer"]
    holder = enforcer._policy
    now = time.monotonic()
    try:
        changed = holder.reload(Path(options.get("policy", "")))
        if changed and enforcer.fast is not None:
            enforcer.fast.forget_topics(None)
        enforcer.audit("policy_reloaded", detail=str(options.get("policy")), changed=changed,
                       digest=holder.current.digest.hex())
        if changed:
            enforcer.require_step_up_all(POLICY_CHANGE, now,
                                         detail=f"policy {holder.current.digest.hex()[:16]}")
    except ConfigurationError as exc:
        log.error("policy reload refused, keeping the old policy: %s", exc)
    try:
        if options.get("attestation_keys"):
            _use_attestation_keys(enforcer, load_attestation_keys(options["attestation_keys"]))
    except ConfigurationError as exc:
        log.error("attestation keys reload refused, keeping the old ones: %s", exc)
    try:
        digest = _identity_files_digest(options)
        if digest != _state.get("identity_digest"):
            responder, signer = build_responder(options, enforcer.responder.nonces)
            old_signer = _state.get("signer")
            enforcer.responder = responder
            _state.update(signer=signer, identity_digest=digest)
            getattr(old_signer, "close", lambda: None)()
            enforcer.audit("policy_reloaded", detail="broker credential or trust bundle "
                           "changed", changed=True, digest=digest.hex())
            enforcer.require_step_up_all(KEY_CHANGE, now, detail="broker credential or trust "
                                         "bundle changed")
    except (ConfigurationError, TesseraError, OSError) as exc:
        log.error("broker identity reload refused, keeping the old one: %s", exc)


def on_basic_auth(client_id: str, username: str | None, password: bytes | None,
                  address: str, protocol: int) -> int:
    if not _state:
        return MOSQ_ERR_AUTH
    return int(_state["enforcer"].basic_auth(client_id, address, protocol))


def on_ext_auth_start(client_id: str, address: str, protocol: int, method: str,
                      data: bytes | None, *, reauth: bool = False) -> tuple[int, bytes | None]:
    # msg1 -> (MOSQ_ERR_AUTH_CONTINUE, msg2): Mosquitto sends msg2 in AUTH 0x18. reauth:
    # an AUTH packet (0x19) on a live connection; the shim tells them apart.
    now = time.monotonic()
    nonces = _state.get("nonces")
    if nonces is not None:  # other replicas' nonces read since the last tick
        nonces.feed(now)
    feed = _state.get("feed")
    if feed is not None and feed.refusal(client_id, address, now, reauth):
        return MOSQ_ERR_AUTH, None
    rc, out = _state["enforcer"].connect(client_id, address, method, data, now,
                                         reauth=reauth)
    return rc, out


def on_ext_auth_continue(client_id: str, address: str, protocol: int, method: str,
                         data: bytes | None, *, reauth: bool = False
                         ) -> tuple[int, bytes | None]:
    # msg3 -> (0, None): CONNACK (or AUTH 0x00 for a re-authentication, whose new session
    # then replaces the old one in place); anything else makes Mosquitto close it.
    rc, out = _state["enforcer"].confirm(client_id, address, method, data, time.monotonic(),
                                         reauth=reauth)
    return rc, out


def on_acl_check(client_id: str, access: int, topic: str, payload: bytes, qos: int,
                 retain: bool) -> int:
    return int(_state["enforcer"].acl(client_id, access, topic))


def on_message(client_id: str, topic: str, payload: bytes, qos: int,
               retain: bool) -> tuple[int, bytes | None, int, str | None]:
    answer = _state["enforcer"].message(client_id, topic, payload, time.monotonic())
    return answer.rc, answer.payload, answer.reason_code, answer.reason


def on_verified(client_id: str, topic: str, payload: bytes, qos: int,
                retain: bool) -> tuple[int, bytes | None, int, str | None, bool]:
    answer, repeatable = _state["enforcer"].verified(client_id, topic, payload,
                                                     time.monotonic())
    return answer.rc, answer.payload, answer.reason_code, answer.reason, repeatable


def on_rejected(client_id: str, topic: str, reason: str,
                detail: str) -> tuple[int, bytes | None, int, str | None]:
    answer = _state["enforcer"].rejected(client_id, topic, reason, detail, time.monotonic())
    return answer.rc, answer.payload, answer.reason_code, answer.reason


def on_tick() -> list[tuple[Any, ...]]:
    enforcer: Enforcer = _state["enforcer"]
    feed = _state.get("feed")
    if feed is not None:
        feed.check(time.monotonic())
    audit_alarm = _state.get("audit_alarm")
    if audit_alarm is not None:
        audit_alarm.check(time.monotonic())
    quarantine = _state.get("quarantine")
    if quarantine is not None:
        quarantine.tick(enforcer, time.monotonic())
    nonces = _state.get("nonces")
    if nonces is not None:
        nonces.tick(time.monotonic())
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
    "on_rejected",
    "on_reload",
    "on_tick",
    "on_verified",
    "plugin_cleanup",
    "plugin_init",
]
