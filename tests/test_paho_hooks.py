"""device/mqtt.py adds MQTT 5 AUTH to paho-mqtt through paho's private API (paho 2.x
has no AUTH support and no public hook for it). This fails as soon as a paho release
changes any private name or signature the client relies on, before a device meets it
in the field. Written against paho-mqtt 2.2 (the version installed here)."""

from __future__ import annotations

import inspect

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device.paho_auth import AuthClient


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_the_private_methods_the_client_overrides_keep_their_signatures() -> None:
    assert _parameters(mqtt.Client._packet_handle) == ["self"]
    assert _parameters(mqtt.Client._packet_queue) == [
        "self", "command", "packet", "mid", "qos", "info"]
    assert _parameters(mqtt.Client._call_socket_open) == ["self", "sock"]


def test_the_private_state_the_client_reads_is_there() -> None:
    client = AuthClient(CallbackAPIVersion.VERSION2, client_id="hooks", protocol=mqtt.MQTTv5)
    # incoming packets: the command byte and the body, read by _packet_handle
    assert {"command", "packet"} <= set(client._in_packet)
    # no connection yet: send_auth refuses instead of queueing into nothing
    assert client._sock is None
    assert client.send_auth(0x19, b"msg1") == mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
    # the hooks are the subclass's, and paho still calls them by these names
    assert AuthClient._packet_handle is not mqtt.Client._packet_handle
    assert AuthClient._packet_queue is not mqtt.Client._packet_queue
    source = inspect.getsource(mqtt.Client)
    for call in ("self._packet_handle()", "self._packet_queue(", "self._call_socket_open("):
        assert call in source, f"paho no longer calls {call}"
