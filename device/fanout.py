"""Receiving fan-out topics with the broker's delayed-disclosure proofs (structauth.fanout).

A back-end subscriber on ``devices/+/telemetry/#`` gets each message with a 31-byte
trailer MACed under a key the broker discloses ``delay`` intervals later. This buffers
messages, checks each arrived while its key was still secret, and hands them to the
callback only once the key came (in a message proven under this client's own session)
and the tag matched: delivery is delayed by ``delay`` to ``delay + 1`` intervals, the
price of a proof no other subscriber can forge. Needs ``plugin_opt_fanout_interval_ms``
on the broker.

The TESLA security condition (structauth.fanout): a message is buffered only if an upper
bound on the broker's clock, ``c + (now - h)(1 + max_drift_ppm / 1e6)`` from the anchor
answering a hello sent at local time h, is before its key's disclosure. The subscriber
says hello again on its own (from the broker's key messages, which arrive every interval)
whenever the drift term reaches half of the margin, so the bound never goes stale; past
the margin without a fresh anchor every message is refused (SESSION_EXPIRED), and a key
arriving earlier than the bound allows refuses them (BAD_CONFIGURATION) until the next
anchor. The clock is CLOCK_BOOTTIME where there is one: a monotonic clock that stops
while the machine sleeps would under-estimate the broker's time after a resume.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from structauth.errors import Reason, TesseraError
from structauth.fanout import (
    ANCHOR_TOPIC,
    DEFAULT_MAX_DRIFT_PPM,
    HELLO_TOPIC,
    KEY_TOPIC,
    FanoutVerifier,
)

log = logging.getLogger("tessera.fanout")
CONTROL = "tessera/fanout/#"
#: refusals whose (topic, reason) are kept (FanoutSubscriber.rejected)
REJECTED_KEPT = 256


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


#: counts time asleep too (Linux); elsewhere the monotonic clock
DEFAULT_CLOCK: Callable[[], float] = (
    _boottime if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic)


class FanoutSubscriber:
    def __init__(self, client: Any, callback: Callable[[str, bytes], None], *,
                 clock: Callable[[], float] = DEFAULT_CLOCK, max_pending: int = 10_000,
                 max_drift_ppm: float = DEFAULT_MAX_DRIFT_PPM, margin_s: float | None = None
                 ) -> None:
        self.client = client  # device.mqtt.TesseraMqttClient, connected
        self.callback = callback
        self.clock = clock
        self.verifier = FanoutVerifier(max_pending, max_drift_ppm=max_drift_ppm,
                                       margin_s=margin_s)
        #: the most recent refusals (topic, reason), newest last; at most REJECTED_KEPT,
        #: the rest only counted
        self.rejected: deque[tuple[str, Reason]] = deque(maxlen=REJECTED_KEPT)
        self.rejected_count = 0
        #: called with each refusal's topic and reason (on the thread that refused it)
        self.on_rejected: Callable[[str, Reason], None] | None = None
        #: key disclosures received (each may release buffered messages)
        self.keys_received = 0
        self.ready = threading.Event()  # set once a time bound is in place
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # an anchor came
        self._started = False

    def start(self, timeout: float = 10.0) -> None:
        """Say hello (the broker answers with the chain's anchor) and wait for the
        answer. Called again, it resynchronises: the chains, their disclosed keys and
        the messages waiting for keys are kept."""
        with self._lock:
            if not self._started:
                self.client.client.message_callback_add(CONTROL, self._on_control)
                self._started = True
            nonce = os.urandom(16)
            self.verifier.hello(self.clock(), nonce)
            before = self.verifier.hellos_answered
        self._publish_hello(nonce)
        # a fresh answer: the one to this hello, or (if an earlier hello's answer was
        # lost) this one's, matched with that earlier hello, which only makes it older
        with self._changed:
            if not self._changed.wait_for(
                    lambda: self.verifier.hellos_answered > before and self.verifier.synced,
                    timeout):
                raise TimeoutError("the broker sent no fan-out anchor: is "
                                   "plugin_opt_fanout_interval_ms set?")

    def subscribe(self, topic: str, qos: int = 0) -> None:
        self.client.subscribe(topic, self._on_data, qos, proven=False)

    def _publish_hello(self, nonce: bytes) -> None:
        # recorded before it is sent: an answer may come before publish() returns. A
        # hello recorded but never sent only makes later answers look older (safe).
        # The nonce lets a broker that echoes it say which hello an anchor answers.
        # QoS 0: the broker consumes a hello and refuses it to the publisher (PUBACK
        # 0x87 at QoS 1), which the client would park and resend after its next
        # resynchronisation, and every resend would be answered: an answer to no
        # recorded hello. A lost hello is simply followed by another (hello_due).
        try:
            self.client.publish(HELLO_TOPIC, nonce, qos=0)
        except TesseraError as exc:
            log.warning("fan-out hello not sent: %s", exc)

    def _hello_if_due(self, now: float) -> bytes | None:
        """Under the lock: record a hello if one is due; its nonce (the caller sends it)."""
        if not self._started or not self.verifier.hello_due(now):
            return None
        nonce = os.urandom(16)
        self.verifier.hello(now, nonce)
        return nonce

    def _reject(self, topic: str, reason: Reason, why: object) -> None:
        self.rejected.append((topic, reason))
        self.rejected_count += 1
        if self.on_rejected is not None:
            self.on_rejected(topic, reason)
        log.warning("dropped a fan-out message on %s: %s", topic, why)

    def _on_data(self, topic: str, data: bytes) -> None:
        if topic.startswith("tessera/"):
            return  # control messages reach _on_control
        with self._lock:
            now = self.clock()
            try:
                self.verifier.on_message(topic, data, now)
            except TesseraError as exc:
                self._reject(topic, exc.reason, exc)
            hello = self._hello_if_due(now)
        if hello is not None:
            self._publish_hello(hello)

    def _on_control(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            body = self.client.open_delivery(msg.topic, bytes(msg.payload))
        except TesseraError as exc:
            self._reject(msg.topic, exc.reason, exc)
            return
        good: list[tuple[str, bytes]] = []
        with self._changed:
            now = self.clock()
            try:
                if msg.topic == ANCHOR_TOPIC:
                    for topic, reason in self.verifier.on_anchor(body, None, now):
                        self._reject(topic, reason, "dropped with its time bound or chain")
                    if self.verifier.synced:
                        self.ready.set()
                    self._changed.notify_all()
                elif msg.topic == KEY_TOPIC:
                    self.keys_received += 1
                    good, bad = self.verifier.on_key(body, now)
                    for topic, reason in bad:
                        self._reject(topic, reason, self.verifier.violation
                                     if reason is Reason.BAD_CONFIGURATION
                                     else "tag does not match")
            except TesseraError as exc:
                self._reject(msg.topic, exc.reason, exc)
            hello = self._hello_if_due(now)
        if hello is not None:
            self._publish_hello(hello)
        for topic, payload in good:
            self.callback(topic, payload)
