"""The gateway's policy for SA1 over GATT: the third enforcement point over the shared
policy (:mod:`broker_plugin.policy`), beside Mosquitto and the CoAP gateway.

A BLE gateway runs :class:`device.ble_session.Sa1Peripheral` (the GATT loop: bumble
lives there with the rest of the BLE plumbing, and a role may not import another) and
passes it a :class:`GattPolicy` as ``authorize=``. The peripheral asks it about every
proven message *after* the proof checked out:

* a message from the device (``"in"``) is a publish: allowed where
  ``[classes.X] publish`` allows it (:meth:`Policy.may_publish`, so will topics are
  refused too); a topic with a ``step_up`` rule is refused, because GATT carries no
  step-up exchange (fail closed: such topics are for MQTT);
* a message to the device (``"out"``) is a delivery: allowed where ``subscribe``
  allows it (:meth:`Policy.may_subscribe` of the concrete topic, as for one MQTT
  delivery).

A refusal is one audit record (``gatt_denied``: identity, direction, topic, the
policy's reason) and a count (``rejections``/``not_authorized``); the device is told
``NOT_AUTHORIZED`` with a fixed detail (the policy's reason names classes and templates
and stays here). A policy reload (``PolicyHolder``) applies to the next message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from structauth.credentials import Identity

from .policy import Decision, Policy

#: the detail for a topic with a step-up rule (GATT has no step-up exchange)
STEP_UP_OVER_GATT = "needs step-up, which GATT does not carry: publish it over MQTT"


class GattPolicy:
    """``authorize(peer, direction, topic)`` for :class:`structauth.gatt_session.
    ResponderConnection`: None if the policy allows it, else the reason (audited).

    ``policy`` is a :class:`Policy` or a ``PolicyHolder`` (its ``current`` policy is
    read per message); ``device_class_of`` gives a device's class (its registry
    record), as for the CoAP gateway; ``audit(event, **fields)`` and
    ``count(metric, label)`` as for :class:`broker_plugin.coap.site.TesseraSite`.
    """

    def __init__(
        self,
        policy: Any,
        *,
        device_class_of: Callable[[Identity], str] = lambda identity: "default",
        audit: Callable[..., None] = lambda event, **fields: None,
        count: Callable[[str, str], None] = lambda metric, label: None,
    ) -> None:
        self._policy = policy
        self.device_class_of = device_class_of
        self.audit = audit
        self.count = count
        #: refusals by direction ("in", "out"), also reported through ``count``
        self.denied = {"in": 0, "out": 0}

    @property
    def policy(self) -> Policy:
        current: Policy = getattr(self._policy, "current", self._policy)
        return current

    def decide(self, peer: Identity, direction: str, topic: str) -> Decision:
        policy = self.policy
        device_class = self.device_class_of(peer)
        if direction == "in":
            decision = policy.may_publish(peer, device_class, topic)
            if decision and policy.step_up_for(peer, device_class, topic) is not None:
                return Decision(False, f"{topic!r} {STEP_UP_OVER_GATT}")
            return decision
        if direction == "out":
            return policy.may_subscribe(peer, device_class, topic)
        return Decision(False, f"unknown direction {direction!r}")

    def __call__(self, peer: Identity, direction: str, topic: str) -> str | None:
        decision = self.decide(peer, direction, topic)
        if decision.allowed:
            return None
        self.denied[direction] = self.denied.get(direction, 0) + 1
        self.audit("gatt_denied", identity=peer.uri, direction=direction, topic=topic,
                   detail=decision.reason)
        self.count("rejections", "not_authorized")
        return f"{decision.reason} (topic {topic!r}, {direction})"


__all__ = ["STEP_UP_OVER_GATT", "GattPolicy"]
