"""Receiving fan-out topics with the broker's delayed-disclosure proofs (structauth.fanout).

A back-end subscriber on ``devices/+/telemetry/#`` gets each message with a 31-byte
trailer MACed under a key the broker discloses ``delay`` intervals later. This buffers
messages, checks each arrived while its key was still secret, and hands them to the
callback only once the key came (in a message proven under this client's own session)
and the tag matched: delivery is delayed by ``delay`` to ``delay + 1`` intervals, the
price of a proof no other subscriber can forge. Needs ``plugin_opt_fanout_interval_ms``
on the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from structauth.errors import Reason, TesseraError
from structauth.fanout import ANCHOR_TOPIC, HELLO_TOPIC, KEY_TOPIC, FanoutVerifier

log = logging.getLogger("tessera.fanout")
CONTROL = "tessera/fanout/#"


class FanoutSubscriber:
    def __init__(self, client: Any, callback: Callable[[str, bytes], None], *,
                 clock: Callable[[], float] = time.monotonic, max_pending: int = 10_000
                 ) -> None:
        self.client = client  # device.mqtt.TesseraMqttClient, connected
        self.callback = callback
        self.clock = clock
        self.verifier = FanoutVerifier(max_pending)
        self.rejected: list[tuple[str, Reason]] = []
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._hello_at: float | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Say hello (the broker answers with the chain's anchor) and wait for it."""
        self.client.client.message_callback_add(CONTROL, self._on_control)
        with self._lock:
            self._hello_at = self.clock()
        self.client.publish(HELLO_TOPIC, b"", qos=1)
        if not self.ready.wait(timeout):
            raise TimeoutError("the broker sent no fan-out anchor: is "
                               "plugin_opt_fanout_interval_ms set?")

    def subscribe(self, topic: str, qos: int = 0) -> None:
        self.client.subscribe(topic, self._on_data, qos, proven=False)

    def _reject(self, topic: str, reason: Reason, why: object) -> None:
        self.rejected.append((topic, reason))
        log.warning("dropped a fan-out message on %s: %s", topic, why)

    def _on_data(self, topic: str, data: bytes) -> None:
        if topic.startswith("tessera/"):
            return  # control messages reach _on_control
        with self._lock:
            try:
                self.verifier.on_message(topic, data, self.clock())
            except TesseraError as exc:
                self._reject(topic, exc.reason, exc)

    def _on_control(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            body = self.client.open_delivery(msg.topic, bytes(msg.payload))
        except TesseraError as exc:
            self._reject(msg.topic, exc.reason, exc)
            return
        good: list[tuple[str, bytes]] = []
        with self._lock:
            try:
                if msg.topic == ANCHOR_TOPIC:
                    first = not self.ready.is_set()
                    self.verifier.on_anchor(body, self._hello_at if first else None)
                    self.ready.set()
                elif msg.topic == KEY_TOPIC:
                    good, bad = self.verifier.on_key(body)
                    for topic, reason in bad:
                        self._reject(topic, reason, "tag does not match")
            except TesseraError as exc:
                self._reject(msg.topic, exc.reason, exc)
        for topic, payload in good:
            self.callback(topic, payload)
