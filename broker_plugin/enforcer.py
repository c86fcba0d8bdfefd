"""What the broker decides, without IO: handshakes in CONNECT/CONNACK, the proof on
every PUBLISH, topic ACLs, revocation and expiry of live sessions.

The Mosquitto shim calls :mod:`broker_plugin.host`, which calls this on the broker's
own thread with a monotonic ``now``; anything that needs IO (the revocation feed, the
audit file, metrics over HTTP) lives in host threads and reaches the enforcer through
:meth:`Enforcer.revoke` and the tick. Every refusal has a :class:`Reason`, is counted
and audited, and disturbs nothing else.

On the wire (MQTT 5):

* CONNECT carries Authentication Method ``tessera-sa1`` and SA1 msg1 as Authentication
  Data; CONNACK carries msg2. The client id must be the identity in the credential
  (its SPIFFE URI).
* A PUBLISH payload is ``application payload || SA1 header`` (31 bytes, a trailer). The
  broker verifies it under the publisher's session with the topic as the action and
  delivers the payload without the trailer.
* Toward a single recipient (a topic the policy's ``direct`` templates name for one
  device, e.g. ``devices/{id}/commands/#``) the broker re-proves the message under
  that device's session, so the device knows it came through the broker from an
  authenticated sender.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from structauth.credentials import Credential, Identity, TimePolicy
from structauth.errors import AuthorizationError, Reason, TesseraError
from structauth.handshake import Responder
from structauth.session import HEADER_SIZE, Session

AUTH_METHOD = "tessera-sa1"
CONFIRM_ACTION = b"sa1/confirm"

# Mosquitto return codes (mosquitto.h)
MOSQ_ERR_SUCCESS = 0
MOSQ_ERR_AUTH = 11
MOSQ_ERR_ACL_DENIED = 12
MOSQ_ERR_PLUGIN_DEFER = 17
# mosquitto_plugin.h access values for ACL checks
MOSQ_ACL_READ = 0x01
MOSQ_ACL_WRITE = 0x02
MOSQ_ACL_SUBSCRIBE = 0x04
MOSQ_ACL_UNSUBSCRIBE = 0x08
# MQTT 5 reason codes
RC_NOT_AUTHORIZED = 0x87
RC_BAD_AUTH_METHOD = 0x8C
RC_PAYLOAD_FORMAT_INVALID = 0x99
RC_TOPIC_NAME_INVALID = 0x90
RC_IMPLEMENTATION_SPECIFIC = 0x83

# Reasons a rejected PUBLISH maps to, for QoS 1/2 publishers (PUBACK/PUBREC reason).
_PUBLISH_RC = {
    Reason.NOT_AUTHORIZED: RC_NOT_AUTHORIZED,
    Reason.CREDENTIAL_REVOKED: RC_NOT_AUTHORIZED,
    Reason.CREDENTIAL_EXPIRED: RC_NOT_AUTHORIZED,
}


class AuthAnswer(NamedTuple):
    rc: int
    data: bytes | None


class MessageAnswer(NamedTuple):
    rc: int  # 0: route it; otherwise drop it
    payload: bytes | None  # replacement payload (None: unchanged)
    reason_code: int  # MQTT 5 reason for the publisher (0: leave as is)
    reason: str | None


ROUTE_UNCHANGED = MessageAnswer(MOSQ_ERR_SUCCESS, None, 0, None)


@dataclass
class Client:
    """One authenticated connection."""

    client_id: str
    identity: Identity
    credential: Credential
    cert_serial: str
    device_class: str
    session: Session
    address: str
    not_after: dt.datetime
    rejections: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


DEFAULT_DIRECT = ("devices/{id}/commands/#",)


def direct_recipient(templates: tuple[tuple[str, ...], ...], topic: str) -> str | None:
    """The device name a topic addresses, if it matches a ``direct`` template (one
    ``{id}`` level; ``+`` and a final ``#`` as in MQTT); None otherwise."""
    levels = topic.split("/")
    for template in templates:
        found = None
        for i, part in enumerate(template):
            if part == "#":
                break
            if i >= len(levels):
                found = None
                break
            if part == "{id}":
                found = levels[i]
            elif part != "+" and part != levels[i]:
                found = None
                break
        else:
            if len(levels) != len(template):
                found = None
        if found:
            return found
    return None


class Enforcer:
    def __init__(
        self,
        responder: Responder,
        policy: Any,  # broker_plugin.policy.PolicyHolder or Policy (``.current`` or direct)
        *,
        wall_clock: Callable[[], dt.datetime],
        direct: tuple[str, ...] = DEFAULT_DIRECT,
        device_class_of: Callable[[Identity], str] = lambda identity: "default",
        audit: Callable[..., None] = lambda event, **fields: None,
        count: Callable[[str, str], None] = lambda metric, label: None,
    ) -> None:
        self.responder = responder
        self._policy = policy
        self.wall_clock = wall_clock
        self.device_class_of = device_class_of
        self.audit = audit
        self.count = count
        self.clients: dict[str, Client] = {}
        self.direct = tuple(tuple(t.split("/")) for t in direct)
        self._device_prefix = f"spiffe://{responder.trust_domain}/device/"
        self.revoked_serials: set[str] = set()
        self._pending_kicks: list[str] = []
        self._outbox: list[tuple[Any, ...]] = []

    @property
    def policy(self) -> Any:
        return getattr(self._policy, "current", self._policy)

    # -- connect -----------------------------------------------------------------
    def basic_auth(self, client_id: str, address: str, protocol: int) -> int:
        """A client that sent no authentication method (or an MQTT 3.1.x client):
        Mosquitto skips extended auth for it and asks here. Always refused."""
        why = (
            f"MQTT {'5' if protocol == 5 else '3.1.x'} client without authentication "
            f"method {AUTH_METHOD!r}"
        )
        self.audit("handshake_refused", client_id=client_id, address=address,
                   reason="not_authorized", detail=why)
        self.count("handshakes", "refused")
        return MOSQ_ERR_AUTH

    def _revoked(self, credential: Credential) -> bool:
        return _serial(credential) in self.revoked_serials

    def connect(
        self, client_id: str, address: str, method: str, data: bytes | None, now: float
    ) -> AuthAnswer:
        """CONNECT with SA1 msg1 (or an AUTH re-authentication): answer with msg2."""
        try:
            if method != AUTH_METHOD:
                raise AuthorizationError(f"authentication method {method!r} is not {AUTH_METHOD!r}",
                               Reason.NOT_AUTHORIZED)
            if not data:
                raise AuthorizationError("no SA1 msg1 in the authentication data", Reason.MALFORMED)
            answered = self.responder.accept(
                data, now, TimePolicy.trusted(self.wall_clock()), revoked=self._revoked
            )
            identity = answered.peer
            if client_id != identity.uri:
                raise AuthorizationError(
                    f"client id {client_id!r} is not the credential's identity {identity.uri}",
                    Reason.WRONG_IDENTITY,
                )
            if identity.kind not in ("device", "broker"):
                raise AuthorizationError(f"{identity} is neither a device nor a broker",
                               Reason.WRONG_IDENTITY)
        except TesseraError as exc:
            self.audit("handshake_refused", client_id=client_id, address=address,
                       reason=exc.reason.name.lower(), detail=exc.detail)
            self.count("handshakes", "refused")
            return AuthAnswer(MOSQ_ERR_AUTH, None)
        previous = self.clients.get(client_id)
        client = Client(
            client_id=client_id,
            identity=identity,
            credential=answered.credential,
            cert_serial=_serial(answered.credential),
            device_class=self.device_class_of(identity),
            session=answered.session,
            address=address,
            not_after=answered.credential.not_after,
        )
        self.clients[client_id] = client
        if previous is not None:
            previous.session.close()
        self.audit("handshake_ok", client_id=client_id, identity=identity.uri,
                   session=answered.session.session_id.hex(), address=address,
                   reauth=previous is not None)
        self.count("handshakes", "ok")
        return AuthAnswer(MOSQ_ERR_SUCCESS, answered.reply)

    def disconnect(self, client_id: str) -> None:
        client = self.clients.pop(client_id, None)
        if client is not None:
            client.session.close()

    # -- authorization -------------------------------------------------------------
    def acl(self, client_id: str, access: int, topic: str) -> int:
        client = self.clients.get(client_id)
        if client is None:
            return MOSQ_ERR_ACL_DENIED
        if access == MOSQ_ACL_WRITE:
            # the publish itself is decided in message(), after the proof is checked
            return MOSQ_ERR_SUCCESS
        if access == MOSQ_ACL_UNSUBSCRIBE:
            return MOSQ_ERR_SUCCESS
        if access == MOSQ_ACL_SUBSCRIBE:
            decision = self.policy.may_subscribe(client.identity, client.device_class, topic)
        else:  # READ: delivery of one message to this client
            decision = self.policy.may_subscribe(client.identity, client.device_class, topic)
        if decision.allowed:
            return MOSQ_ERR_SUCCESS
        self.audit("acl_denied", client_id=client_id, identity=client.identity.uri,
                   session=client.session.session_id.hex(), topic=topic,
                   access=access, detail=decision.reason)
        self.count("rejections", "acl_denied")
        return MOSQ_ERR_ACL_DENIED

    # -- messages --------------------------------------------------------------------
    def message(self, client_id: str, topic: str, payload: bytes, now: float) -> MessageAnswer:
        """A PUBLISH from ``client_id``: verify its proof, check the topic, strip the
        proof. Anything wrong drops it, with a reason for QoS 1/2 publishers."""
        client = self.clients.get(client_id)
        if client is None:
            # Messages the broker itself injects (client_id empty) are ours already.
            if not client_id:
                return ROUTE_UNCHANGED
            return self._reject(None, client_id, topic, Reason.UNKNOWN_SESSION,
                                "no Tessera session for this client")
        if len(payload) < HEADER_SIZE:
            return self._reject(client, client_id, topic, Reason.TRUNCATED,
                                "payload shorter than the SA1 proof")
        cut = len(payload) - HEADER_SIZE
        try:
            verified = client.session.verify(
                payload[cut:], topic.encode(), payload[:cut], now
            )
        except TesseraError as exc:
            return self._reject(client, client_id, topic, exc.reason, exc.detail)
        if topic == CONFIRM_ACTION.decode():
            return MessageAnswer(MOSQ_ERR_ACL_DENIED, None, 0, None)  # consumed here
        decision = self.policy.may_publish(client.identity, client.device_class, topic)
        if not decision.allowed:
            return self._reject(client, client_id, topic, Reason.NOT_AUTHORIZED,
                                decision.reason)
        name = direct_recipient(self.direct, topic) if self.direct else None
        if name is None:
            return MessageAnswer(MOSQ_ERR_SUCCESS, verified.payload, 0, None)
        # One named recipient: prove the message to it under its own session, so it
        # knows the broker routed it from an authenticated sender.
        recipient = self.clients.get(self._device_prefix + name)
        if recipient is None:
            return self._reject(client, client_id, topic, Reason.UNKNOWN_SESSION,
                                f"{name} is not connected; direct messages are not queued")
        try:
            header, body = recipient.session.protect(topic.encode(), verified.payload, now)
        except TesseraError as exc:
            return self._reject(client, client_id, topic, exc.reason,
                                f"cannot prove the message to {name}: {exc.detail}")
        return MessageAnswer(MOSQ_ERR_SUCCESS, body + header, 0, None)

    def _reject(
        self, client: Client | None, client_id: str, topic: str, reason: Reason, detail: str
    ) -> MessageAnswer:
        name = reason.name.lower()
        self.audit("message_rejected", client_id=client_id,
                   identity=client.identity.uri if client else None,
                   session=client.session.session_id.hex() if client else None,
                   topic=topic, reason=name, detail=detail)
        self.count("rejections", name)
        if client is not None:
            client.rejections += 1
        rc = _PUBLISH_RC.get(reason, RC_NOT_AUTHORIZED if reason is Reason.NOT_AUTHORIZED
                             else RC_PAYLOAD_FORMAT_INVALID)
        return MessageAnswer(MOSQ_ERR_ACL_DENIED, None, rc, f"tessera: {name}")

    # -- revocation and expiry ------------------------------------------------------
    def revoke(self, cert_serials: list[str], reason: str = "revoked") -> list[str]:
        """Apply a revocation event: refuse these credentials from now on and close
        the connections that use them (at the next tick)."""
        self.revoked_serials.update(s.lower() for s in cert_serials)
        doomed = [c.client_id for c in self.clients.values()
                  if c.cert_serial in self.revoked_serials]
        for client_id in doomed:
            client = self.clients[client_id]
            self.audit("revoked_disconnect", client_id=client_id, identity=client.identity.uri,
                       session=client.session.session_id.hex(), reason=reason)
            self.count("revocation_disconnects", "")
        self._pending_kicks.extend(doomed)
        return doomed

    def tick(self, now: float) -> list[tuple[Any, ...]]:
        """Actions for the broker thread: ("kick", client_id) and ("publish", ...)."""
        wall = self.wall_clock()
        for client in list(self.clients.values()):
            if client.not_after <= wall:
                self.audit("session_expired", client_id=client.client_id,
                           identity=client.identity.uri,
                           session=client.session.session_id.hex(), detail="credential expired")
                self._pending_kicks.append(client.client_id)
            elif client.session.poll(now) is not None:
                self.audit("session_expired", client_id=client.client_id,
                           identity=client.identity.uri,
                           session=client.session.session_id.hex(), detail="session ended")
                self._pending_kicks.append(client.client_id)
        actions: list[tuple[Any, ...]] = [("kick", c) for c in dict.fromkeys(self._pending_kicks)]
        for client_id in dict.fromkeys(self._pending_kicks):
            self.disconnect(client_id)
        self._pending_kicks.clear()
        actions.extend(self._outbox)
        self._outbox.clear()
        return actions


def _serial(credential: Credential) -> str:
    return format(credential.chain[0].serial_number, "x")
