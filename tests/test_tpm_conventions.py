"""TPM ecosystem conventions, against a real swtpm (issue 14, point 6).

* A lost TPM connection (swtpm killed, a resource manager restarted, the link cut in the
  middle of a command) fails the call in flight only: the FIRST retry works, and
  nothing the broken connection had loaded is left holding the TPM's few slots.
* Key files are TSS2 PRIVATE KEY PEM: tpm2-tools loads and signs with a key we made.
  Files in the container of Tessera <= 0.1 are still read.
* libtss2's own ERROR/WARNING lines stay off stderr for conditions the backend handles,
  unless the operator set TSS2_LOG.

The connection cuts go through a TCP relay between the TCTI and swtpm that drops the
connection when a chosen TPM command passes (a real network fault at an exact command;
swtpm itself keeps running, so objects loaded before the cut are still in it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_HT, TCTILdr

from hw.tpm import KEY_FILE_SUFFIX, TpmBackend, _KeyFile, parse_tcti
from simulator.swtpm import Swtpm, _port_pair
from structauth.errors import KeyBackendError, Reason

PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
DIGEST = hashlib.sha256(b"tessera conventions").digest()
ROOT = Path(__file__).resolve().parent.parent

# TPM command codes the relay can cut at
TPM_CC_CREATE_PRIMARY = 0x131
TPM_CC_LOAD = 0x157
TPM_CC_QUOTE = 0x158
TPM_CC_SIGN = 0x15D


class CuttingRelay:
    """Relays swtpm's TPM port (raw TPM commands) and control port; when ``cut_on`` is
    set, the connection carrying that command is closed instead of forwarding it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = _port_pair("127.0.0.1")
        self.cut_on: int | None = None
        self.cuts = 0
        self._servers = [
            socket.create_server(("127.0.0.1", self.port)),
            socket.create_server(("127.0.0.1", self.port + 1)),
        ]
        for server, serve in zip(self._servers, (self._tpm, self._ctrl), strict=True):
            threading.Thread(target=self._accept, args=(server, serve), daemon=True).start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def close(self) -> None:
        for server in self._servers:
            server.close()

    def _accept(self, server: socket.socket, serve: object) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()  # type: ignore[arg-type]

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _ctrl(self, conn: socket.socket) -> None:
        upstream = socket.create_connection((self.target[0], self.target[1] + 1))
        threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()
        self._pump(conn, upstream)

    def _tpm(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()
        buf = b""
        try:
            while data := conn.recv(65536):
                buf += data
                while len(buf) >= 10:  # tag(2) size(4) command code(4)
                    size = struct.unpack(">I", buf[2:6])[0]
                    if len(buf) < size:
                        break
                    command, buf = buf[:size], buf[size:]
                    if struct.unpack(">I", command[6:10])[0] == self.cut_on:
                        self.cut_on = None
                        self.cuts += 1
                        raise OSError("cut")
                    upstream.sendall(command)
        except OSError:
            pass
        for sock in (conn, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def bare_swtpm() -> Iterator[Swtpm]:
    with Swtpm(ek_certs=False) as tpm:
        yield tpm


@pytest.fixture
def relay(bare_swtpm: Swtpm) -> Iterator[CuttingRelay]:
    assert bare_swtpm.port is not None
    r = CuttingRelay(bare_swtpm.host, bare_swtpm.port)
    try:
        yield r
    finally:
        r.close()


def _transient_handles(tpm: Swtpm) -> list[int]:
    name, conf = parse_tcti(tpm.tcti)
    esapi = ESAPI(TCTILdr(name, conf))
    try:
        _, data = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 16)
        handles = data.data.handles
        return [int(handles.handle[i]) for i in range(handles.count)]
    finally:
        esapi.close()


# -- the first retry works ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cut_at", "what"),
    [
        (TPM_CC_SIGN, "sign"),
        (TPM_CC_LOAD, "sign"),  # the key is reloaded from its file: cut at TPM2_Load
        (TPM_CC_CREATE_PRIMARY, "sign"),  # ... or while the parent is derived
        (TPM_CC_LOAD, "quote"),  # the attestation key is loaded for the quote
        (TPM_CC_QUOTE, "quote"),
    ],
)
def test_first_retry_after_a_lost_connection_works(
    bare_swtpm: Swtpm, relay: CuttingRelay, tmp_path: Path, cut_at: int, what: str
) -> None:
    backend = TpmBackend(relay.tcti, tmp_path)
    try:
        signer = backend.create_signing_key("device")
        backend.create_attestation_key("ak")
        signer.sign_digest(DIGEST)
        signer.close()  # unloaded: the next signature loads it again (TPM2_Load)

        def call() -> None:
            if what == "sign":
                signer.public_key().verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)
            else:
                backend.quote("ak", b"nonce")

        relay.cut_on = cut_at
        with pytest.raises(KeyBackendError) as lost:
            call()
        assert relay.cuts == 1
        assert lost.value.reason == Reason.BACKEND_UNAVAILABLE
        # the first retry, not the second; before the fix it failed with ESAPI's
        # "Function called in the wrong order" (a context poisoned by the TCTI error)
        call()
        call()
    finally:
        backend.close()
    # what the broken connection had loaded (parent, key) was flushed through the new
    # one: swtpm has no resource manager, so leftovers would fill its slots
    assert _transient_handles(bare_swtpm) == []


def test_first_retry_after_swtpm_restart_works(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend:
        signer = backend.create_signing_key("device")
        signer.sign_digest(DIGEST)
        bare_swtpm.stop()
        with pytest.raises(KeyBackendError) as down:
            signer.sign_digest(DIGEST)
        assert down.value.reason == Reason.BACKEND_UNAVAILABLE
        bare_swtpm.start()
        signer.public_key().verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)


def test_device_key_survives_repeated_power_cuts(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    """Each swtpm kill is a non-orderly shutdown; a DA-protected key used before it counts
    as a failed authorization, and after maxTries (3 on swtpm) such a key is locked out.
    Our keys have empty auth and noDA, so a device that loses power keeps signing."""
    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend:
        signer = backend.create_signing_key("device")
        for _ in range(5):
            signer.public_key().verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)
            assert bare_swtpm.pid is not None
            os.kill(bare_swtpm.pid, signal.SIGKILL)  # no TPM2_Shutdown: a power cut
            bare_swtpm.stop()  # reaps it
            bare_swtpm.start()
        signer.public_key().verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)


# -- TSS2 PRIVATE KEY files ----------------------------------------------------------------


def test_key_file_is_tss2_private_key_pem(tpm_backend: TpmBackend) -> None:
    tpm_backend.create_signing_key("device")
    path = tpm_backend.key_dir / f"device{KEY_FILE_SUFFIX}"
    text = path.read_text()
    assert text.startswith("-----BEGIN TSS2 PRIVATE KEY-----\n")
    # read by OpenSSL's generic ASN.1 parser, not by our code: the TPMKey sequence
    parsed = subprocess.run(
        ["openssl", "asn1parse", "-in", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "OBJECT            :2.23.133.10.1.3" in parsed  # id-loadablekey
    assert "BOOLEAN           :255" in parsed  # emptyAuth TRUE
    assert "INTEGER           :40000001" in parsed  # parent TPM_RH_OWNER
    assert parsed.count("OCTET STRING") == 2  # pubkey, privkey


@pytest.mark.skipif(shutil.which("tpm2_load") is None, reason="tpm2-tools not installed")
def test_tpm2_tools_sign_with_a_key_we_created(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    with TpmBackend(bare_swtpm.tcti, keys) as backend:
        public = backend.create_signing_key("device").public_key()
    pem = tmp_path / "device.pem"  # what an operator would do: it is an ordinary PEM
    shutil.copy(keys / f"device{KEY_FILE_SUFFIX}", pem)
    (tmp_path / "digest").write_bytes(DIGEST)
    env = dict(os.environ, TPM2TOOLS_TCTI=bare_swtpm.tcti)
    for command in (
        ["tpm2_load", "-r", "device.pem", "-c", "device.ctx"],
        ["tpm2_sign", "-c", "device.ctx", "-g", "sha256", "-d", "-f", "plain",
         "-o", "signature", "digest"],
        ["tpm2_flushcontext", "-t"],
    ):  # fmt: skip
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stderr}"
    public.verify((tmp_path / "signature").read_bytes(), DIGEST, PREHASHED)


def test_old_container_files_still_load(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    """A key written by Tessera <= 0.1 (its own container, under the TCG SRK) works."""
    from tpm2_pytss import TPM2B_SENSITIVE_CREATE

    from hw.tpm import _KIND_SIGNING, _child_template

    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend:
        with backend._tpm("legacy creation") as esapi, backend._srk(esapi, tss=False) as (
            srk,
            srk_name,
        ):
            private, public, *_ = esapi.create(
                srk, TPM2B_SENSITIVE_CREATE(), _child_template(_KIND_SIGNING)
            )
        legacy = _KeyFile(_KIND_SIGNING, srk_name, public.marshal(), private.marshal())
        path = tmp_path / f"old{KEY_FILE_SUFFIX}"
        path.write_bytes(legacy.to_bytes())
        signer = backend.load_signing_key("old")
        signer.public_key().verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)
        assert path.read_bytes().startswith(b"TESSERA-TPMKEY\n")  # read, never rewritten


def test_tss2_key_with_another_parent_or_a_password_is_refused(tpm_backend: TpmBackend) -> None:
    from tpm2_pytss.tsskey import TSSPrivKey

    signer = tpm_backend.create_signing_key("device")
    good = (tpm_backend.key_dir / f"device{KEY_FILE_SUFFIX}").read_bytes()
    key = TSSPrivKey.from_pem(good)
    for name, variant, why in (
        ("persistent", TSSPrivKey(key.private, key.public, True, 0x81000001), "parent"),
        ("password", TSSPrivKey(key.private, key.public, False, 0x40000001), "authorization"),
    ):
        (tpm_backend.key_dir / f"{name}{KEY_FILE_SUFFIX}").write_bytes(variant.to_pem())
        with pytest.raises(KeyBackendError) as refused:
            tpm_backend.load_signing_key(name)
        assert refused.value.reason == Reason.KEY_NOT_FOUND
        assert why in refused.value.detail
    # the good key is untouched and still signs
    assert (tpm_backend.key_dir / f"device{KEY_FILE_SUFFIX}").read_bytes() == good
    signer.public_key().verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)


# -- libtss2 logging -----------------------------------------------------------------------

_HANDLED = textwrap.dedent(
    """
    import hashlib, sys, tempfile
    from hw.tpm import TpmBackend
    from simulator.swtpm import Swtpm
    from structauth.errors import KeyBackendError, Reason
    digest = hashlib.sha256(b"x").digest()
    with Swtpm(ek_certs=False) as tpm, tempfile.TemporaryDirectory() as keys:
        with TpmBackend(tpm.tcti, keys) as backend:
            signer = backend.create_signing_key("device")
            signer.sign_digest(digest)
            tpm.stop()
            try:
                signer.sign_digest(digest)  # handled: a KeyBackendError, said once
            except KeyBackendError as exc:
                print("handled:", exc.reason == Reason.BACKEND_UNAVAILABLE)
            tpm.start()
            signer.sign_digest(digest)  # handled: stale handle, reloaded, signed
            print("signed after restart")
        try:
            TpmBackend(tpm.tcti.replace(str(tpm.port), "1"), keys)
        except KeyBackendError as exc:
            print("handled:", exc.reason == Reason.BACKEND_UNAVAILABLE)
    """
)


@pytest.mark.parametrize("user_setting", [None, "all+WARNING"])
def test_libtss2_prints_nothing_for_handled_conditions(user_setting: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TSS2_LOG"}
    if user_setting:
        env["TSS2_LOG"] = user_setting
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _HANDLED], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("handled: True") == 2
    assert "signed after restart" in done.stdout
    if user_setting is None:
        assert done.stderr == ""
    else:  # the operator asked for libtss2's lines: they are not swallowed
        assert "WARNING:" in done.stderr or "ERROR:" in done.stderr


# -- a persistent handle chosen by the operator ---------------------------------------------

HANDLE = 0x81000010


def _persistent_handles(tpm: Swtpm) -> list[int]:
    name, conf = parse_tcti(tpm.tcti)
    esapi = ESAPI(TCTILdr(name, conf))
    try:
        _, data = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.PERSISTENT << 24, 16)
        handles = data.data.handles
        return [int(handles.handle[i]) for i in range(handles.count)]
    finally:
        esapi.close()


@pytest.mark.skipif(shutil.which("tpm2_sign") is None, reason="tpm2-tools not installed")
def test_key_at_a_persistent_handle_serves_tpm2_tools_and_us(
        bare_swtpm: Swtpm, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    with TpmBackend(bare_swtpm.tcti, keys) as backend:
        signer = backend.create_signing_key("device")
        backend.persist_key("device", HANDLE)
        backend.persist_key("device", HANDLE)  # idempotent
        public = signer.public_key()
        public.verify(signer.sign_digest(DIGEST), DIGEST, PREHASHED)
    assert (keys / "device.handle").read_text() == "0x81000010\n"
    assert _persistent_handles(bare_swtpm) == [HANDLE]
    (tmp_path / "digest").write_bytes(DIGEST)
    done = subprocess.run(
        ["tpm2_sign", "-c", "0x81000010", "-g", "sha256", "-d", "-f", "plain", "-o",
         "signature", "digest"], cwd=tmp_path, capture_output=True, text=True,
        env=dict(os.environ, TPM2TOOLS_TCTI=bare_swtpm.tcti))
    assert done.returncode == 0, done.stderr
    public.verify((tmp_path / "signature").read_bytes(), DIGEST, PREHASHED)
    # a new backend (the agent after a restart) signs at the handle: nothing is loaded
    with TpmBackend(bare_swtpm.tcti, keys) as backend:
        again = backend.load_signing_key("device")
        public.verify(again.sign_digest(DIGEST), DIGEST, PREHASHED)
        assert _transient_handles(bare_swtpm) == []
    assert _persistent_handles(bare_swtpm) == [HANDLE]  # closing did not evict it


def test_persistent_handle_refusals(bare_swtpm: Swtpm, tmp_path: Path) -> None:
    from structauth.errors import StateError

    with TpmBackend(bare_swtpm.tcti, tmp_path) as backend:
        backend.create_signing_key("one")
        backend.create_signing_key("two")
        with pytest.raises(StateError, match="outside the owner range"):
            backend.persist_key("one", 0x81800001)  # the platform's range
        backend.persist_key("one", HANDLE)
        with pytest.raises(KeyBackendError) as taken:
            backend.persist_key("two", HANDLE)
        assert taken.value.reason == Reason.BAD_PARAMETERS
        assert "already holds another object" in taken.value.detail
        assert not (tmp_path / "two.handle").exists()
        # a handle file naming a handle that holds another key: refused, not used
        (tmp_path / "two.handle").write_text("0x81000010\n")
        with pytest.raises(KeyBackendError) as wrong:
            backend.load_signing_key("two")
        assert wrong.value.reason == Reason.KEY_NOT_FOUND
        assert "holds another key than 'two'" in wrong.value.detail
        (tmp_path / "two.handle").write_text("0x81000011\n")  # empty handle
        with pytest.raises(KeyBackendError, match="which is empty"):
            backend.load_signing_key("two")
    assert _persistent_handles(bare_swtpm) == [HANDLE]
