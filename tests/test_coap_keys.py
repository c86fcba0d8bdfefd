"""Keys are erased on schedule at both ends of a CoAP session with nobody calling poll():
the gateway and the device each re-arm a timer to ``Session.next_deadline_at`` and poll
their sessions there. Captured afterwards, neither end's memory opens or forges what
was sent in the first epoch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiocoap.numbers import codes
from cryptography.exceptions import InvalidTag

from simulator.fleet import Fleet
from structauth.coap_binding import request_action
from structauth.errors import StaleMessage
from structauth.params import SessionParams
from structauth.session import Session
from tests.support import wait_for_async
from tests.test_coap import World, gateway, run

FAST = SessionParams(epoch_ms=200, skew_epochs=1, lifetime_s=60, sealed=True)


@pytest.fixture(scope="module")
def world() -> World:
    fleet = Fleet()
    return World(fleet, fleet.member("broker", "gw-1"),
                 {n: fleet.member("device", n) for n in ("pi-1", "pi-2")})



async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    await wait_for_async(predicate, timeout)


def first_epoch_erased(session: Session) -> bool:
    return all(
        chain.next_epoch >= 1 and min(chain.keys, default=chain.next_epoch) >= 1
        for chain in (session._send, session._recv)
    )


def test_both_ends_erase_keys_without_anyone_polling(world: World) -> None:
    async def scenario() -> None:
        async with gateway(world, params=FAST) as gw, gw.client() as device:
            # one request in epoch 0, captured as it went over the air
            session = await device.session_for_use()
            action = request_action(2, ("sensors", "pi-1", "temp"))
            msg, header = device._build(session, "POST", "sensors/pi-1/temp", b"secret 21.5",
                                        (), None, None, None)
            captured = (header, bytes(msg.payload))
            response = await device._send(msg)
            device.open_response(session, header, response)
            (peer,) = gw.site.sessions.values()
            served = peer.requests
            runs, polls = gw.site.stats["timer_runs"], device.polls
            # then silence: only the timers run
            await until(lambda: first_epoch_erased(peer.session)
                        and first_epoch_erased(session))
            assert peer.requests == served  # no request did it
            assert gw.site.stats["timer_runs"] > runs and device.polls > polls
            # the gateway's memory, captured now, cannot open the epoch-0 request ...
            with pytest.raises(StaleMessage):
                peer.session._recv.key(0)
            for key in peer.session._recv.keys.values():
                assert key.aead is not None
                with pytest.raises(InvalidTag):
                    key.aead.decrypt(captured[0][9:15] + bytes(6),
                                     captured[1] + captured[0][15:],
                                     captured[0][:15] + len(action).to_bytes(2, "big") + action)
            # ... nor can the device's forge one for epoch 0
            with pytest.raises(StaleMessage):
                session._send.key(0)
            # and the session still works in the current epoch
            reply = await device.request("POST", "sensors/pi-1/temp", b"later")
            assert reply.payload == b"pi-1:later"

    run(scenario())


def test_timers_end_sessions_at_their_lifetime(world: World) -> None:
    short = SessionParams(epoch_ms=200, skew_epochs=1, lifetime_s=1)
    audit: list[tuple[str, dict[str, object]]] = []

    async def scenario() -> None:
        async with gateway(world, params=short,
                           audit=lambda e, **f: audit.append((e, f))) as gw, \
                gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            (peer,) = gw.site.sessions.values()
            session = device.session
            assert session is not None
            await until(lambda: not gw.site.sessions and device.session is None)
            assert peer.session.state.value == "closed" and session.state.value == "closed"
            assert [f["detail"] for e, f in audit if e == "session_closed"] == [
                "session_expired"]
            assert not device._live and not device._unconfirmed
            # the next request simply runs a new handshake
            assert (await device.request("GET", "sensors/pi-1/temp")).payload == b"21.5"
            assert device.handshakes == 2

    run(scenario())


@pytest.fixture(params=[False, True], ids=["tagged", "sealed"])
def sealed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_tagged_sessions_verify_in_c_where_it_was_built(world: World, sealed: bool) -> None:
    """The C accelerator (structauth.accel) takes the receive direction of tagged
    sessions at both ends; sealed sessions, and a site or client told not to, stay in
    Python. Every other test in these files runs through it in tagged mode."""
    from structauth import accel

    if not accel.available():
        pytest.skip("structauth._accel was not built in this installation")

    async def scenario() -> None:
        params = SessionParams(sealed=sealed)
        async with gateway(world, params=params) as gw, gw.client() as device:
            await device.request("GET", "sensors/pi-1/temp")
            (peer,) = gw.site.sessions.values()
            assert device.session is not None
            assert peer.session.accelerated is (not sealed)
            assert device.session.accelerated is (not sealed)
            # a replay is refused with its reason by whichever path holds the session
            session = await device.session_for_use()
            msg, _ = device._build(session, "POST", "sensors/pi-1/temp", b"1", (), None,
                                   None, None)
            ctx = device._context
            assert ctx is not None
            first = await ctx.request(msg).response
            again = await ctx.request(msg.copy(mid=None, token=None)).response
            assert first.code.is_successful() and again.code == codes.UNAUTHORIZED
            assert b"replayed (300)" in again.payload
        async with gateway(world, params=params, accelerate=False) as gw, \
                gw.client(accelerate=False) as device:
            await device.request("GET", "sensors/pi-1/temp")
            (peer,) = gw.site.sessions.values()
            assert not peer.session.accelerated
            assert device.session is not None and not device.session.accelerated

    run(scenario())
