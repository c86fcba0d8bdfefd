"""The CoAP attack world: a real gateway (tests/attacks/gateway.py) in its own process on
UDP 127.0.0.1, and legitimate devices speaking raw CoAP (tests/attacks/coap.py) with
structauth producing their SA1 messages and proofs (docs/COAP.md):

* ``POST /.well-known/sa1`` msg1 (Block1) -> ``2.04`` msg2 (Block2, fetched with POST and
  Block2 on the same endpoint);
* the first proven request carries msg3 in option 65007 beside its proof (65003);
* a request's proof covers its action (``request_action``); a Block1 upload proves each
  block over ``block_action`` chained to the previous block's header; a response is
  proven over ``response_action`` of the request's (last block's) header.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from hw.software import InsecureSoftwareSigner
from simulator.fleet import Fleet, Member
from structauth.coap_binding import (
    HANDSHAKE_PATH,
    NO_PREVIOUS,
    block_action,
    request_action,
    response_action,
)
from structauth.handshake import Initiator
from structauth.session import Session
from tests.attacks import coap as c
from tests.attacks.world import now_policy
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[2]


class GatewayProcess:
    """The gateway subprocess and what it leaves behind."""

    def __init__(self, directory: Path, fleet: Fleet, devices: Sequence[str],
                 site_options: dict[str, Any] | None = None) -> None:
        self.directory = directory
        self.fleet = fleet
        directory.mkdir(parents=True, exist_ok=True)
        signer = InsecureSoftwareSigner.generate()
        self.member = fleet.member("broker", "gw-1", signer=signer)
        (directory / "bundle.pem").write_bytes(fleet.root.public_bytes(Encoding.PEM))
        (directory / "gw.pem").write_bytes(
            self.member.credential.chain[0].public_bytes(Encoding.PEM))
        signer.save(directory / "gw-key.pem")
        (directory / "gateway.json").write_text(json.dumps({
            "trust_domain": fleet.trust_domain, "bundle": str(directory / "bundle.pem"),
            "credential": str(directory / "gw.pem"), "key": str(directory / "gw-key.pem"),
            "devices": list(devices), "site": site_options or {}}))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.out = (directory / "gateway.out").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.attacks.gateway", str(directory)], cwd=REPO,
            env=env, stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        port_file = directory / "port"
        try:
            wait_for(lambda: port_file.exists() or self.proc.poll() is not None, 20,
                     "the gateway to listen")
        except AssertionError:
            self.close()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {(directory / 'gateway.out').read_text()}")
        self.port = int(port_file.read_text())
        self.identity = self.member.identity

    def state(self) -> dict[str, Any]:
        """Sessions, counters and table sizes from the gateway's control socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.directory / "control.sock"))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        result: dict[str, Any] = json.loads(data)
        return result

    def served(self) -> list[dict[str, Any]]:
        path = self.directory / "served.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def audit(self) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def log(self) -> str:
        text = ""
        for name in ("gateway.log", "gateway.out"):
            path = self.directory / name
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


class Refused(AssertionError):
    def __init__(self, how: str, reply: c.Message | None) -> None:
        super().__init__(how)
        self.reply = reply


@dataclass
class Answer:
    reply: c.Message
    payload: bytes  # verified response payload (empty if unproven)
    proven: bool


class CoapDevice:
    """A legitimate device over raw CoAP: handshake, then proven requests."""

    def __init__(self, gateway: GatewayProcess, member: Member) -> None:
        self.gateway = gateway
        self.member = member
        self.client = c.Client("127.0.0.1", gateway.port)
        self.session: Session | None = None
        self.msg1 = b""
        self.msg2 = b""
        self.msg3: bytes | None = None  # still to send (on the first proven request)
        self.lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.member.identity.name

    def handshake(self, msg1: bytes | None = None,
                  initiator: Initiator | None = None) -> None:
        if initiator is None:
            initiator = Initiator(signer=self.member.signer, credential=self.member.credential,
                                  trust=self.gateway.fleet.trust,
                                  expected_peer=self.gateway.identity)
            msg1 = initiator.start()
        assert msg1 is not None
        self.msg1 = msg1
        reply = self.client.upload(c.POST, HANDSHAKE_PATH, msg1)
        if reply is None or reply.code != c.CHANGED:
            raise Refused(f"handshake answered {reply!r}", reply)
        last, msg2 = self.client.download(reply, c.POST, HANDSHAKE_PATH)
        if last.code != c.CHANGED:
            raise Refused(f"msg2 block answered {last!r}", last)
        self.msg2 = msg2
        done = initiator.receive(msg2, time.monotonic(), now_policy())
        self.session = done.session
        self.msg3 = done.reply

    def prove(self, mcode: int, path: Sequence[str], payload: bytes,
              content_format: int | None = None) -> tuple[bytes, list[c.Option]]:
        """(header, options) for a single-message request."""
        assert self.session is not None
        action = request_action(mcode, tuple(path), (), content_format, None, None)
        header, body = self.session.protect(action, payload, time.monotonic())
        assert body == payload  # tagged mode
        options: list[c.Option] = [(c.PROOF, header)]
        if content_format is not None:
            options.append((c.CONTENT_FORMAT, c.uint(content_format)))
        if self.msg3 is not None:
            options.append((c.CONFIRM, self.msg3))
        return header, options

    def verify(self, header: bytes, reply: c.Message, body: bytes | None = None) -> Answer:
        """Check the response's proof (over the whole ``body`` of a Block2 response)
        against the request's header."""
        assert self.session is not None
        proof = reply.opt(c.PROOF)
        if proof is None:
            return Answer(reply, b"", False)
        cf = reply.opt(c.CONTENT_FORMAT)
        action = response_action(header, reply.code, None if cf is None else c.parse_uint(cf))
        verified = self.session.verify(proof, action, reply.payload if body is None else body,
                                       time.monotonic())
        return Answer(reply, verified.payload, True)

    def request(self, mcode: int, path: Sequence[str], payload: bytes = b"",
                timeout: float = 5.0) -> Answer:
        with self.lock:
            header, options = self.prove(mcode, path, payload)
            reply = self.client.request(mcode, path, payload, options, timeout=timeout)
            if reply is None:
                raise AssertionError(f"no answer to {'/'.join(path)}")
            if reply.code < c.BAD_REQUEST:
                self.msg3 = None
            block2 = reply.block2
            if block2 is not None and block2.more:
                _, body = self.client.download(reply, mcode, path, [(c.PROOF, header)])
                return self.verify(header, reply, body)
            return self.verify(header, reply)

    def upload(self, path: Sequence[str], body: bytes, szx: int = 6) -> Answer:
        """A proven Block1 POST: each block proven over its chained block action."""
        assert self.session is not None
        with self.lock:
            action = request_action(c.POST, tuple(path), (), None, None, None)
            previous = [NO_PREVIOUS]
            session = self.session

            def per_block(block: c.Block, chunk: bytes) -> list[c.Option]:
                bound = block_action(action, block.num, block.szx, block.more, previous[0])
                header, _ = session.protect(bound, chunk, time.monotonic())
                previous[0] = header
                opts: list[c.Option] = [(c.PROOF, header)]
                if self.msg3 is not None and block.num == 0:
                    opts.append((c.CONFIRM, self.msg3))
                return opts

            reply = self.client.upload(c.POST, path, body, szx=szx, per_block=per_block)
            if reply is None:
                raise AssertionError("no answer to the upload")
            if reply.code < c.BAD_REQUEST:
                self.msg3 = None
            return self.verify(previous[0], reply)

    def close(self) -> None:
        self.client.close()


class LiveCoapDevice:
    """A device posting a numbered reading every period on its own thread; every one
    must be answered 2.04 (proven) and served exactly once."""

    def __init__(self, gateway: GatewayProcess, member: Member, period: float = 0.1) -> None:
        self.device = CoapDevice(gateway, member)
        self.device.handshake()
        self.period = period
        self.sent: list[int] = []
        self.ok: list[int] = []
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-coap", daemon=True)
        self._n = 0
        self._count_lock = threading.Lock()

    @property
    def path(self) -> tuple[str, str, str]:
        return ("sensors", self.device.name, "readings")

    def start(self) -> LiveCoapDevice:
        self._thread.start()
        return self

    def post_now(self) -> int:
        """Post one reading (from the thread or a test); its number once answered."""
        with self._count_lock:
            n = self._n
            self._n += 1
        try:
            answer = self.device.request(c.POST, self.path, f"live-{n}".encode())
        except Exception as exc:  # the thread records it; the checks fail on it
            self.problems.append(f"live-{n}: {exc!r}")
            answer = None
        if answer is not None:
            if answer.reply.code == c.CHANGED and answer.proven and answer.payload == b"ok":
                self.ok.append(n)
            else:
                self.problems.append(f"live-{n}: {answer.reply!r}")
        self.sent.append(n)  # completed (answered or failed)
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.post_now()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def check(self, gateway: GatewayProcess) -> None:
        """Every reading answered and served exactly once, in order."""
        assert not self.problems, self.problems[:5]
        served = [bytes.fromhex(r["payload"]).decode() for r in gateway.served()
                  if r["identity"] == self.device.member.identity.uri]
        numbers = [int(s[5:]) for s in served if s.startswith("live-")]
        assert len(numbers) == len(set(numbers)), "a reading was served twice"
        assert set(self.ok) <= set(numbers), "an acknowledged reading was not served"
        failed = sorted(set(self.sent) - set(self.ok))
        assert not failed, f"readings {failed[:10]} failed"
