"""Test helpers shared by the suite: a fake clock, a pair of sessions and a full
three-message SA1 handshake."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from structauth.credentials import TimePolicy
from structauth.events import HandshakeCompleted, HandshakeConfirmed
from structauth.handshake import Initiator, Responder
from structauth.params import SessionParams
from structauth.session import Role, Session


@dataclass
class FakeClock:
    """A monotonic clock the test moves by hand."""

    now: float = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class SessionPair:
    """Both ends of one session, sharing a fake clock.

    ``direct()`` builds them from fixed chain keys (for session-only tests);
    ``handshake()`` from a real three-message SA1 handshake. Either way both ends are
    established: a responder only ever gets its session from ``Responder.confirm``.
    """

    initiator: Session
    responder: Session
    clock: FakeClock = field(default_factory=FakeClock)

    #: the chain keys ``direct()`` uses (initiator-to-responder, responder-to-initiator)
    DIRECT_I2R = b"\x01" * 32
    DIRECT_R2I = b"\x02" * 32

    @classmethod
    def direct(
        cls, params: SessionParams | None = None, clock: FakeClock | None = None
    ) -> SessionPair:
        params = params or SessionParams()
        clock = clock or FakeClock()
        sid = bytes(range(8))
        ini = Session(
            role=Role.INITIATOR,
            session_id=sid,
            send_chain_key=cls.DIRECT_I2R,
            receive_chain_key=cls.DIRECT_R2I,
            params=params,
            start=clock.now,
        )
        res = Session(
            role=Role.RESPONDER,
            session_id=sid,
            send_chain_key=cls.DIRECT_R2I,
            receive_chain_key=cls.DIRECT_I2R,
            params=params,
            start=clock.now,
        )
        return cls(ini, res, clock)

    @classmethod
    def handshake(
        cls,
        initiator: Initiator,
        responder: Responder,
        policy: TimePolicy,
        clock: FakeClock | None = None,
    ) -> SessionPair:
        clock = clock or FakeClock()
        done, confirmed = run_handshake(initiator, responder, clock.now, policy)
        return cls(done.session, confirmed.session, clock)

    def up(self, action: bytes, payload: bytes) -> tuple[bytes, bytes]:
        """Initiator protects a message; returns (header, body)."""
        return self.initiator.protect(action, payload, self.clock.now)

    def down(self, action: bytes, payload: bytes) -> tuple[bytes, bytes]:
        return self.responder.protect(action, payload, self.clock.now)


def run_handshake(
    initiator: Initiator,
    responder: Responder,
    now: float,
    policy: TimePolicy,
    *,
    initiator_policy: TimePolicy | None = None,
    context: bytes = b"",
    quote: bytes = b"",
) -> tuple[HandshakeCompleted, HandshakeConfirmed]:
    """msg1 -> accept -> msg2 -> receive -> msg3 -> confirm, all at ``now``."""
    answered = responder.accept(initiator.start(context=context, quote=quote), now, policy)
    done = initiator.receive(answered.reply, now, initiator_policy or policy)
    confirmed = responder.confirm(answered.pending, done.reply, now)
    return done, confirmed


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


async def wait_for_async(predicate: Callable[[], object], timeout: float = 5.0,
                         what: str = "") -> None:
    """:func:`wait_for` for asyncio tests: yields to the loop between checks."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.005)


def capture_msg1(client: Any) -> list[bytes]:
    """Every msg1 ``client`` (a device.mqtt.TesseraMqttClient) sends from now on, as an
    on-path attacker would copy it off the network."""
    captured: list[bytes] = []
    make = client._new_initiator

    def spying() -> Any:
        initiator = make()
        start = initiator.start

        def start_and_copy(**kw: Any) -> bytes:
            msg1 = start(**kw)
            captured.append(msg1)
            return bytes(msg1)

        initiator.start = start_and_copy
        return initiator

    client._new_initiator = spying
    return captured


def replay_msg1(port: int, client_id: str, msg1: bytes) -> int:
    """A raw MQTT 5 CONNECT carrying a captured msg1, as an attacker with none of our
    client code sends it: packet type << 8 | reason code of the first packet back
    (0x287: CONNACK 0x87, refused at msg1; an AUTH type when msg2 came)."""
    from bench.mqtt_wire import Conn, connect_packet

    conn = Conn(port, timeout=5)
    try:
        conn.sock.sendall(connect_packet(client_id, msg1))
        first, body = conn.read_packet()
        return (first >> 4) << 8 | body[1 if first >> 4 == 2 else 0]
    finally:
        conn.sock.close()


def broker_conf_files(directory: Path) -> dict[str, str]:
    """What `tessera broker config` takes, for a broker `mqtt-1` of a fresh fleet, in
    ``directory``: its command-line flags (``--bundle``, ``--credential``, ``--key``,
    ``--policy``) to their values, plus ``trust_domain`` and ``dir``."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from hw.software import InsecureSoftwareSigner
    from simulator.fleet import Fleet
    from simulator.mosquitto import plugin_files

    fleet = Fleet()
    signer = InsecureSoftwareSigner.generate()
    member = fleet.member("broker", "mqtt-1", signer=signer)
    options = plugin_files(
        directory, trust_domain=fleet.trust_domain,
        bundle_pem=fleet.root.public_bytes(Encoding.PEM),
        credential_pem=member.credential.chain[0].public_bytes(Encoding.PEM),
        key=f"insecure-software:{signer.save(directory / 'broker-key.pem')}")
    return {"--bundle": options["bundle"], "--credential": options["credential"],
            "--key": options["key"], "--policy": options["policy"],
            "trust_domain": fleet.trust_domain, "dir": str(directory)}


def a_ca_certificate(base: Path) -> Path:
    """A CA certificate standing in for the one that signed the broker's TLS certificate."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    path = base / "broker-tls-ca.pem"
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker TLS CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        path.write_bytes(cert.public_bytes(Encoding.PEM))
    return path
