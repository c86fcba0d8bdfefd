"""How a message can enter Mosquitto besides an ordinary PUBLISH, and what the shim tells
the host about each ACL check so that :meth:`broker_plugin.enforcer.Enforcer.acl` can
judge it. docs/MQTT.md ("Every path into the broker") lists every path with its test.

Mosquitto 2.0 asks a plugin's ACL callback for WRITE access in three situations, and
only the first is followed by the message callback, where the SA1 proof is checked:

* a PUBLISH from a connected client (handle_publish.c: WRITE check, then
  ``plugin__handle_message``, except for ``$CONTROL/...`` topics, which go to
  ``control__process`` and are acknowledged with success without the message callback);
* a Will (context.c ``context__send_will``): on an abrupt close or a DISCONNECT with
  reason 0x04 (after the disconnect event), when the Will Delay Interval or the session
  ends (later), when a new connection takes the client id over (inside the new
  connection's ``connect__on_authorised``, before the old one's disconnect event) and
  for every connected client when the broker shuts down. A Will is never checked at
  CONNECT (eclipse-mosquitto issue 3552) and never reaches the message callback;
* a retained message's original publisher when ``check_retain_source`` is true (a fake
  context; ``tessera broker config --check`` refuses that setting).

The shim (broker_plugin/shim/tessera_mosquitto.c, ``handle_acl_check``) tells them apart
by the connection: a WRITE from the connection that currently holds its client id after
the host accepted it, while the broker runs, is a PUBLISH; any other WRITE is a Will. It
passes what it knows as flags above Mosquitto's access bits (``MOSQ_ACL_READ`` 1,
``WRITE`` 2, ``SUBSCRIBE`` 4, ``UNSUBSCRIBE`` 8):
"""

from __future__ import annotations

from dataclasses import dataclass

from structauth.errors import ConfigurationError

#: the message (PUBLISH or Will) has the retain flag set (WRITE checks only)
ACL_RETAIN = 0x100
#: this WRITE check is for a Will, not for a PUBLISH
ACL_WILL = 0x200
#: the connection that set the Will was accepted by the host (for Tessera: it completed
#: SA1 key confirmation); absent for a connection refused or abandoned mid-handshake
ACL_CONFIRMED = 0x400
#: the Will is sent later than its connection's end (Will Delay Interval, session end)
ACL_DELAYED = 0x800
#: Mosquitto's own access bits
ACL_ACCESS_MASK = 0xFF

#: first topic levels no client may publish to, whatever the policy says: ``$CONTROL``
#: goes to Mosquitto's control plane without the message callback (no proof is ever
#: checked there), ``$SYS`` is the broker's own tree
RESERVED_LEVELS = ("$CONTROL", "$SYS")


def reserved_topic(topic: str) -> str | None:
    """Why a client may never publish to ``topic``, or None."""
    first = topic.split("/", 1)[0]
    if first in RESERVED_LEVELS:
        return (f"{first}/... is the broker's own; no client publishes there "
                "(the message callback never sees $CONTROL, so no proof could be checked)")
    return None


# -- what an unauthenticated client can cost the broker ------------------------------------
#: (lowest, highest) value ``tessera broker config --check`` accepts for each bound; 0 and
#: -1 mean "unlimited" to Mosquitto and are refused
CONF_LIMITS: dict[str, tuple[int, int]] = {
    # a CONNECT carries msg1 (about 2 KB; at most 65,535 bytes of authentication data)
    # and every proven PUBLISH must fit; Mosquitto checks the declared remaining length
    # against it before it allocates the packet (lib/packet_mosq.c, packet__read)
    "max_packet_size": (8192, 1 << 20),
    # per listener; with no CONNECT timeout in 2.0.11 this is what bounds idle sockets
    "max_connections": (1, 100_000),
    "max_inflight_messages": (1, 1000),
    "max_queued_messages": (1, 100_000),
    "max_queued_bytes": (1, 1 << 30),
}


@dataclass(frozen=True)
class ConfBounds:
    """The pre-authentication bounds ``tessera broker config`` and the test brokers
    (simulator/mosquitto.py) write into mosquitto.conf. What they bound, measured on
    Mosquitto 2.0.11: docs/MQTT.md ("Pre-authentication bounds")."""

    max_packet_size: int = 262_144
    max_connections: int = 1000
    max_inflight_messages: int = 20
    max_queued_messages: int = 1000
    max_queued_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        for name, (low, high) in CONF_LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigurationError(f"{name} {value} is outside {low}..{high}")

    def global_lines(self) -> list[str]:
        """Global settings (before or after the listeners)."""
        return [
            f"max_packet_size {self.max_packet_size}",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.max_queued_bytes}",
            "set_tcp_nodelay true",
        ]

    def listener_lines(self) -> list[str]:
        """Right after each ``listener`` line."""
        return [f"max_connections {self.max_connections}"]
