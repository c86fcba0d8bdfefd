"""Fan-out proofs (structauth.fanout): the scheme on a fake clock, then a real Mosquitto."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from broker_plugin.host import parse_fanout
from device.fanout import FanoutSubscriber
from device.mqtt import TesseraMqttClient
from hw.software import InsecureSoftwareSigner
from simulator.fleet import Fleet
from simulator.mosquitto import Mosquitto, plugin_files
from structauth.errors import ConfigurationError, Reason, TesseraError
from structauth.fanout import KEY_TOPIC, TRAILER_SIZE, FanoutSigner, FanoutVerifier

T = b"devices/pi-1/telemetry/t"


def _pair(delay: int = 2, length: int = 100) -> tuple[FanoutSigner, FanoutVerifier, list[float]]:
    clock = [1000.0]
    signer = FanoutSigner(os.urandom, clock[0], interval_s=1.0, delay=delay, length=length)
    verifier = FanoutVerifier(max_pending=50)
    hello_local = 5.0  # the subscriber's own clock differs from the broker's
    verifier.on_anchor(signer.anchor(clock[0] + 0.01), hello_local)
    clock.append(hello_local)
    return signer, verifier, clock


def _keys(signer: FanoutSigner, now: float) -> list[bytes]:
    return [body for topic, body in signer.due(now) if topic == KEY_TOPIC]


def _reason(fn: object, *args: object) -> Reason:
    with pytest.raises(TesseraError) as exc:
        fn(*args)  # type: ignore[operator]
    return exc.value.reason


def test_messages_verify_once_their_key_is_disclosed() -> None:
    signer, verifier, (b0, l0) = _pair()
    sealed = signer.seal(T, b"21.5", b0 + 0.2)
    assert len(sealed) == 4 + TRAILER_SIZE
    verifier.on_message(T.decode(), sealed, l0 + 0.25)
    assert _keys(signer, b0 + 1.5) == []  # interval 1's key is still secret
    [key] = _keys(signer, b0 + 2.1)  # interval 3 started: K_1 goes out
    assert verifier.on_key(key) == ([(T.decode(), b"21.5")], [])


def test_forged_moved_and_altered_are_refused_when_the_key_comes() -> None:
    signer, verifier, (b0, l0) = _pair()
    good = signer.seal(T, b"ok", b0 + 0.1)
    forged = bytearray(good)
    forged[-1] ^= 1
    altered = b"OK" + good[2:]
    verifier.on_message(T.decode(), bytes(forged), l0 + 0.2)
    verifier.on_message(T.decode() + "/x", good, l0 + 0.2)  # moved to another topic
    verifier.on_message(T.decode(), altered, l0 + 0.2)
    verifier.on_message(T.decode(), good, l0 + 0.2)
    [key] = _keys(signer, b0 + 2.0)
    ok, bad = verifier.on_key(key)
    assert ok == [(T.decode(), b"ok")]
    assert [r for _, r in bad] == [Reason.BAD_TAG] * 3


def test_a_subscriber_that_knows_a_key_cannot_forge_with_it() -> None:
    # K_1 is public once disclosed; a message for interval 1 made with it arrives after
    # the disclosure by construction, and the time bound refuses it
    signer, verifier, (b0, l0) = _pair()
    [key] = _keys(signer, b0 + 2.0)
    verifier.on_key(key)
    stolen = FanoutSigner(os.urandom, b0, interval_s=1.0, delay=2, length=100)
    stolen.chain = signer.chain  # everything the broker knows, even
    late = stolen.seal(T, b"forged", b0 + 0.5)
    assert _reason(verifier.on_message, T.decode(), late, l0 + 2.0) is Reason.REPLAYED
    # and a message for the current interval, held back until its key is out
    held = signer.seal(T, b"held", b0 + 2.5)  # interval 3
    assert _reason(verifier.on_message, T.decode(), held, l0 + 4.0) is (
        Reason.EPOCH_OUT_OF_WINDOW)


def test_clock_drift_inside_the_bound_is_fine_and_beyond_it_is_not() -> None:
    signer, verifier, (b0, l0) = _pair()
    msg = signer.seal(T, b"x", b0 + 0.9)  # interval 1; K_1 out when the broker reaches 2 s
    verifier.on_message(T.decode(), msg, l0 + 1.9)
    other = signer.seal(T, b"y", b0 + 0.9)  # (the same bytes again would be a duplicate)
    assert _reason(verifier.on_message, T.decode(), other, l0 + 2.0) is (
        Reason.EPOCH_OUT_OF_WINDOW)


def test_keys_must_hash_to_the_anchor_and_belong_to_the_chain() -> None:
    signer, verifier, (b0, _l0) = _pair()
    other, _, _ = _pair()
    [theirs] = _keys(other, b0 + 3.0)
    assert _reason(verifier.on_key, theirs) is Reason.UNKNOWN_SESSION
    [mine] = _keys(signer, b0 + 3.0)
    fake = json.loads(mine)
    fake["key"] = os.urandom(32).hex()
    assert _reason(verifier.on_key, json.dumps(fake).encode()) is Reason.BAD_TAG
    for junk in (b"", b"{}", b"not json", json.dumps({**fake, "interval": 0}).encode()):
        with pytest.raises(TesseraError):
            verifier.on_key(junk)
    verifier.on_key(mine)  # the genuine one still works after all that


@pytest.mark.parametrize("size", range(TRAILER_SIZE + 2))
def test_malformed_trailers_of_every_length(size: int) -> None:
    signer, verifier, (b0, l0) = _pair()
    good = signer.seal(T, b"", b0 + 0.1)
    data = (good * 2)[:size] if size != TRAILER_SIZE else bytes(size)
    with pytest.raises(TesseraError):
        verifier.on_message(T.decode(), data, l0 + 0.1)


def test_the_buffer_is_bounded() -> None:
    signer, verifier, (b0, l0) = _pair()
    for n in range(50):
        verifier.on_message(T.decode(), signer.seal(T, b"%d" % n, b0 + 0.1), l0 + 0.1)
    assert _reason(verifier.on_message, T.decode(), signer.seal(T, b"one more", b0 + 0.1),
                   l0 + 0.1) is Reason.REPLAYED


def test_a_new_chain_takes_over_and_the_old_keys_still_come() -> None:
    signer, verifier, (b0, l0) = _pair(delay=1, length=5)
    last_old = signer.seal(T, b"old", b0 + 4.5)  # interval 5, the old chain's last
    verifier.on_message(T.decode(), last_old, l0 + 4.5)
    out = signer.due(b0 + 5.2)  # the new chain starts: its anchor, and K_5 of the old
    anchors = [body for topic, body in out if topic.endswith("anchor")]
    keys = [body for topic, body in out if topic == KEY_TOPIC]
    assert len(anchors) == 1
    verifier.on_anchor(anchors[0], None)
    assert verifier.on_key(keys[0])[0] == [(T.decode(), b"old")]
    new = signer.seal(T, b"new", b0 + 5.3)
    verifier.on_message(T.decode(), new, l0 + 5.3)
    [key] = _keys(signer, b0 + 6.1)
    assert verifier.on_key(key)[0] == [(T.decode(), b"new")]


def test_the_time_bound_follows_every_later_chain() -> None:
    # each new chain starts where the newest one ended, not the oldest still known
    signer, verifier, (b0, l0) = _pair(delay=1, length=5)
    for n in (1, 2, 3):
        start = b0 + 5.0 * n
        for topic, body in signer.due(start + 0.1):
            if topic.endswith("anchor"):
                verifier.on_anchor(body, None)
            else:
                verifier.on_key(body)
        msg = signer.seal(T, f"chain {n}".encode(), start + 0.5)  # interval 1
        verifier.on_message(T.decode(), msg, l0 + 5.0 * n + 0.5)  # in time
        late = signer.seal(T, b"late", start + 0.5)
        assert _reason(verifier.on_message, T.decode(), late,
                       l0 + 5.0 * n + 1.0) is Reason.EPOCH_OUT_OF_WINDOW
        [key] = _keys(signer, start + 1.1)
        assert verifier.on_key(key)[0] == [(T.decode(), f"chain {n}".encode())]


def test_plugin_options_for_fan_out_are_checked() -> None:
    assert parse_fanout({}, 0.0) is None
    assert parse_fanout({"fanout_interval_ms": "200"}, 0.0) is not None
    for bad in ({"fanout_interval_ms": "x"}, {"fanout_interval_ms": "1"},
                {"fanout_interval_ms": "200", "fanout_delay": "0"}):
        with pytest.raises(ConfigurationError):
            parse_fanout(bad, 0.0)


# -- a real Mosquitto ---------------------------------------------------------------------

@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[Fleet, Mosquitto]]:
    fleet = Fleet(t0=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    signer = InsecureSoftwareSigner.generate()
    member = fleet.member("broker", "mqtt-1", signer=signer)
    key = signer.save(tmp_path / "broker-key.pem")
    options = plugin_files(
        tmp_path, trust_domain=fleet.trust_domain,
        bundle_pem=fleet.root.public_bytes(Encoding.PEM),
        credential_pem=member.credential.chain[0].public_bytes(Encoding.PEM),
        key=f"insecure-software:{key}", audit_log=str(tmp_path / "audit.jsonl"))
    options.update(fanout_interval_ms="200", fanout_delay="1")
    with Mosquitto(tmp_path / "mosquitto", plugin_options=options) as mosq:
        yield fleet, mosq


@pytest.mark.broker
def test_a_backend_gets_fan_out_messages_only_once_proven(
        broker: tuple[Fleet, Mosquitto]) -> None:
    fleet, mosq = broker

    def client(kind: str, name: str) -> TesseraMqttClient:
        m = fleet.member(kind, name)
        return TesseraMqttClient(signer=m.signer, credential=m.credential, trust=fleet.trust,
                                 host="127.0.0.1", port=mosq.port,
                                 broker=fleet.member("broker", "mqtt-1").identity)

    backend, device = client("broker", "backend"), client("device", "pi-f")
    backend.connect()
    device.connect()
    # each delivery with the number of key disclosures the subscriber had received
    got: queue.Queue[tuple[str, bytes, int]] = queue.Queue()
    sub = FanoutSubscriber(backend, lambda t, p: got.put((t, p, sub.keys_received)))
    refusals: queue.Queue[tuple[str, Reason]] = queue.Queue()
    sub.on_rejected = lambda t, r: refusals.put((t, r))
    sub.start()
    sub.subscribe("devices/#")
    keys_before = []
    for i in range(5):
        keys_before.append(sub.keys_received)
        device.publish("devices/pi-f/telemetry/t", f"m{i}".encode(), qos=1).wait_for_publish(5)
    out = [got.get(timeout=5) for _ in range(5)]
    assert [(t, p) for t, p, _ in out] == [("devices/pi-f/telemetry/t", f"m{i}".encode())
                                           for i in range(5)]
    # held until a key disclosed after it was sent (not by time: by the key)
    assert all(keys > before for (_, _, keys), before in zip(out, keys_before, strict=True))
    assert list(sub.rejected) == [] and sub.rejected_count == 0
    # a raw subscriber sees the trailer, and a copy with one bit flipped is refused
    raw: queue.Queue[bytes] = queue.Queue()
    plain = client("broker", "raw")
    plain.connect()
    plain.subscribe("devices/#", lambda t, p: raw.put(p), proven=False)
    device.publish("devices/pi-f/telemetry/t", b"z", qos=1).wait_for_publish(5)
    wire = raw.get(timeout=5)
    assert len(wire) == 1 + TRAILER_SIZE and wire[:1] == b"z"
    forged = bytearray(wire)
    forged[-1] ^= 1
    sub._on_data("devices/pi-f/telemetry/t", bytes(forged))  # as if it had been sent
    assert got.get(timeout=5)[1] == b"z"
    # its key came (with the genuine copy's): the forged copy is refused, not delivered
    assert refusals.get(timeout=5) == ("devices/pi-f/telemetry/t", Reason.BAD_TAG)
    assert list(sub.rejected) == [("devices/pi-f/telemetry/t", Reason.BAD_TAG)]
    assert got.empty()
    for c in (backend, device, plain):
        c.close()
