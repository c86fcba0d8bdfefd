"""What the device keeps about refused messages is bounded (issue 15 point 6): the MQTT
client's and the fan-out subscriber's ``rejected`` keep the newest REJECTED_KEPT
entries and count every one. Driven through the paths a peer reaches: deliveries
without a valid proof."""

from __future__ import annotations

from types import SimpleNamespace

from device import fanout, mqtt
from simulator.fleet import Fleet
from structauth.errors import Reason


def _client(fleet: Fleet) -> mqtt.TesseraMqttClient:
    member = fleet.member("device", "pi-b")
    return mqtt.TesseraMqttClient(signer=member.signer, credential=member.credential,
                                  trust=fleet.trust, host="127.0.0.1", port=1,
                                  broker=fleet.member("broker", "mqtt-1").identity)


def test_the_clients_rejected_list_is_bounded_at_its_limit() -> None:
    client = _client(Fleet())
    seen: list[tuple[str, Reason]] = []
    client.on_rejected = lambda topic, reason: seen.append((topic, reason))
    # step-up requests that do not verify (not connected: no session to prove them)
    for i in range(mqtt.REJECTED_KEPT + 44):
        msg = SimpleNamespace(topic="tessera/step-up", payload=bytes([i % 256]) * 40)
        client._on_step_up_message(None, None, msg)
    assert len(client.rejected) == mqtt.REJECTED_KEPT
    assert client.rejected_count == mqtt.REJECTED_KEPT + 44 == len(seen)
    assert client.step_ups_ignored == mqtt.REJECTED_KEPT + 44


def test_refused_messages_kept_for_a_resend_are_bounded_at_their_limit() -> None:
    client = _client(Fleet())
    client.max_parked = 5
    for i in range(8):  # as the broker refusing eight QoS 1 messages (PUBACK 0x87)
        out = mqtt.Outgoing(f"devices/pi-b/telemetry/{i}", b"x", 1, False, b"s" * 8)
        client._settled(out, True, "0x87")
    assert [o.topic for o in client._parked] == [
        f"devices/pi-b/telemetry/{i}" for i in range(3, 8)]  # the newest five
    assert client.refused_dropped == 3


def test_the_fanout_subscribers_rejected_list_is_bounded_at_its_limit() -> None:
    sub = fanout.FanoutSubscriber(SimpleNamespace(client=None), lambda t, p: None)
    for i in range(fanout.REJECTED_KEPT + 10):
        sub._on_data(f"devices/pi-{i}/telemetry/t", b"too short for a trailer")
    assert len(sub.rejected) == fanout.REJECTED_KEPT
    assert sub.rejected_count == fanout.REJECTED_KEPT + 10
    # the newest are kept
    assert sub.rejected[-1][0] == f"devices/pi-{fanout.REJECTED_KEPT + 9}/telemetry/t"
