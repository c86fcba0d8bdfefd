"""What a factory station writes for a device's agent: ``--out DIR``, checked before the
service is asked, staged with a journal so that an interrupted run is finished by the
next one, then renamed into place (credentials, agent.json, agent.toml, the broker's
CA). Shared by the network path (:mod:`provisioning.cli`) and the BLE station
(:mod:`provisioning.ble_cli`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from provisioning.cli_support import CliError, Refused, _check_pem, _crash_point, _why
from structauth.errors import TesseraError

JOURNAL = ".tessera-enroll.json"


#: bytes a credential directory needs (four PEM files are ~3 KiB): written and removed
#: before enrolling, so a full disk refuses the device before the service records it
_SPACE_PROBE = 16 * 1024


def _journal_read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


AGENT_TOML = "agent.toml"


AGENT_JSON = "agent.json"


BROKER_CA = "broker-ca.pem"


def _agent_broker(args: argparse.Namespace) -> dict[str, Any] | None:
    """--broker / --broker-identity / --broker-cafile, checked before anything is
    enrolled: the [mqtt] table of the agent.toml that --out gets (None: not given, the
    file is then a template with those keys marked)."""
    from urllib.parse import urlsplit

    from structauth.credentials import Identity

    url, ident, cafile = (getattr(args, "broker", None), getattr(args, "broker_identity", None),
                          getattr(args, "broker_cafile", None))
    if not (url or ident or cafile):
        return None
    if not (url and ident):
        raise CliError("--broker and --broker-identity go together (the agent connects to "
                       "that broker only): pass both, or neither for an agent.toml template")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        host = port = None
        parts = urlsplit("")
    if parts.scheme not in ("mqtt", "mqtts") or not host or parts.path not in ("", "/"):
        raise CliError(f"--broker {url!r}: expected mqtt://HOST[:PORT] or "
                       "mqtts://HOST[:PORT] (TLS, with --broker-cafile)")
    tls = parts.scheme == "mqtts"
    if tls and not cafile:
        raise CliError(f"--broker {url}: TLS needs --broker-cafile, the CA certificate (PEM) "
                       "that signed the broker's TLS certificate")
    if cafile and not tls:
        raise CliError("--broker-cafile is for TLS: use an mqtts:// --broker URL")
    try:
        broker = Identity.parse(ident)
        if broker.kind != "broker":
            raise ValueError
    except (TesseraError, ValueError):
        raise CliError(f"--broker-identity {ident!r} is not a broker identity; pass the "
                       "broker's SPIFFE ID, spiffe://<trust domain>/broker/<name>") from None
    mqtt: dict[str, Any] = {"host": host, "port": port or (8883 if tls else 1883),
                            "broker_identity": ident}
    out: dict[str, Any] = {"mqtt": mqtt, "trust_domain": broker.trust_domain}
    if cafile:
        _check_pem(cafile, "--broker-cafile", "the CA certificate of the broker's TLS "
                   "certificate")
        mqtt["tls_cafile"] = BROKER_CA
        out["cafile_pem"] = Path(cafile).read_bytes()
    return out


def _check_broker_domain(client: Any, broker: dict[str, Any] | None) -> None:
    """The broker must be in the fleet's trust domain, or the agent would refuse it at
    every start: asked of the service before anything is enrolled."""
    if broker is None:
        return
    served = client.call("GET", "/healthz").get("trust_domain")
    if served and served != broker["trust_domain"]:
        raise CliError(f"--broker-identity {broker['mqtt']['broker_identity']} is in trust "
                       f"domain {broker['trust_domain']!r}, the fleet in {served!r}; pass the "
                       f"broker's identity, spiffe://{served}/broker/<name>")


def _agent_toml(broker: dict[str, Any] | None) -> bytes:
    """agent.toml for ``tessera-agent run --state DIR`` (docs/AGENT.md): the state
    directory is DIR itself, relative file names are read from DIR."""
    import tomli_w

    head = ("# tessera-agent configuration, written by 'tessera enroll --out' "
            "(docs/AGENT.md)\n# start the agent with: tessera-agent run --state "
            "<this directory>\n")
    # the agent's liveness message, on the topic the documented fleet policy grants
    # (docs/MQTT.md); remove the table to publish only what applications send
    heartbeat = {"heartbeat": {"topic": "devices/{id}/telemetry/heartbeat", "interval_s": 60}}
    if broker is not None:
        return (head + tomli_w.dumps({"mqtt": broker["mqtt"], **heartbeat})).encode()
    return (head + tomli_w.dumps(heartbeat) + "\n[mqtt]\n"
            "# REQUIRED: the station did not know the broker ('tessera enroll --broker URL "
            "--broker-identity ID'\n# writes these); uncomment and fill in before "
            "'tessera-agent run --state DIR':\n"
            "# host = \"broker.example.com\"\n"
            "# port = 8883\n"
            "# broker_identity = \"spiffe://<trust domain>/broker/<name>\"\n"
            "# tls_cafile = \"broker-ca.pem\"   # TLS: the broker's CA, a file in this "
            "directory\n").encode()


def _delivery_fields(broker: dict[str, Any] | None) -> dict[str, str]:
    """What a device receives with its credentials, by network or BLE (inside what the
    station binding covers), to write beside them: ``agent_toml`` (a template without
    broker facts) and, for an mqtts:// broker, ``broker_ca``, the file agent.toml names."""
    fields = {"agent_toml": _agent_toml(broker).decode()}
    if broker is not None and "cafile_pem" in broker:
        fields["broker_ca"] = broker["cafile_pem"].decode()
    return fields


def _agent_files(settings: dict[str, Any] | None, broker: dict[str, Any] | None,
                 issued: dict[str, Any]) -> dict[str, bytes]:
    """What --out holds besides the credentials so that the agent starts from it:
    agent.json (how to reach the key; None when the key is on a remote device, which
    wrote its own), agent.toml and the broker's TLS CA."""
    files = {AGENT_TOML: _agent_toml(broker)}
    if settings is not None:
        files[AGENT_JSON] = json.dumps({**settings, "identity": issued["identity"]},
                                       indent=1).encode()
    if broker is not None and "cafile_pem" in broker:
        files[BROKER_CA] = broker["cafile_pem"]
    return files


class _OutPlan:
    """Where one device's credentials go (``--out``), checked before anything is asked
    of the service, and the journal that lets a re-run finish an interrupted one."""

    def __init__(self, out: Path, serial: str, *, replace: bool) -> None:
        self.out = out
        self.serial = serial
        self.replace = replace
        self.staging = out.absolute().parent / f".{out.name}.tessera-pending"
        self.journal: dict[str, Any] = {}
        self.resumable = False  # an interrupted run may have been recorded
        #: agent.json's content (how the agent reaches the key) and the broker facts
        self.settings: dict[str, Any] | None = None
        self.broker: dict[str, Any] | None = None

    def done_before(self) -> str | None:
        """The identity in --out if it already holds this serial's credentials."""
        identity = self.out / "identity"
        try:
            uri = identity.read_text().strip()
            (self.out / "operational.pem").read_bytes()
        except (OSError, UnicodeDecodeError):
            return None
        return uri if uri.rsplit("/", 1)[-1] == self.serial else None

    def preflight(self) -> None:
        out = self.out
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise CliError(f"--out {out} exists and is not a directory; name a new directory "
                           "for the credentials")
        parent = out.absolute().parent
        if not parent.is_dir():
            raise CliError(f"--out {out}: directory {parent} does not exist; create it first")
        if out.is_dir() and any(p for p in out.iterdir() if p.name != JOURNAL):
            held = self.done_before() or (out / "identity").exists()
            if not held:
                raise CliError(f"--out {out} is a directory that is not empty; name a new "
                               "directory for the credentials")
            if not self.replace:
                raise Refused(f"--out {out} already holds credentials; choose a new "
                              "directory, or pass --reenroll to replace them")
        (out / JOURNAL).unlink(missing_ok=True)  # left by a run killed after its rename
        previous = _journal_read(self.staging / JOURNAL)
        if previous is not None and previous.get("serial") not in (None, self.serial):
            raise CliError(f"--out {out}: {self.staging} belongs to an interrupted enrollment "
                           f"of {previous.get('serial')}; finish that one first (or remove it)")
        self.resumable = bool(previous and previous.get("phase") == "accepted")
        try:
            self.staging.mkdir(mode=0o700, exist_ok=True)
            for leftover in self.staging.iterdir():
                if leftover.name != JOURNAL:
                    leftover.unlink()
            self.mark("accepted" if self.resumable else "started")
            probe = self.staging / ".space-probe"
            try:
                from device.provisioner import write_synced

                write_synced(probe, b"\0" * _SPACE_PROBE)
            finally:
                probe.unlink(missing_ok=True)
        except OSError as exc:
            if not self.resumable:
                shutil.rmtree(self.staging, ignore_errors=True)
            raise CliError(f"--out {out}: cannot write there ({_why(exc)}); nothing was "
                           "enrolled. Free space or choose a writable directory") from None

    def mark(self, phase: str, **fields: Any) -> None:
        from device.provisioner import fsync_dir, write_synced

        self.journal.update(serial=self.serial, phase=phase, pid=os.getpid(), **fields)
        tmp = self.staging / f"{JOURNAL}.tmp"
        tmp.unlink(missing_ok=True)
        write_synced(tmp, json.dumps(self.journal).encode(), 0o600)
        os.replace(tmp, self.staging / JOURNAL)
        fsync_dir(self.staging)

    def save(self, issued: dict[str, Any]) -> None:
        from device.provisioner import CredentialStore

        store = CredentialStore(self.out)
        store.stage(issued, self.staging)
        from device.provisioner import fsync_dir, write_synced

        for name, data in _agent_files(self.settings, self.broker, issued).items():
            (self.staging / name).unlink(missing_ok=True)  # left by an interrupted run
            write_synced(self.staging / name, data)
        fsync_dir(self.staging)
        _crash_point("enroll:staged")
        if self.out.exists() and not any(self.out.iterdir()):
            self.out.rmdir()  # an empty --out: the staging directory takes its place
        if self.out.exists():
            store.install(self.staging)  # replaced file by file (--reenroll)
            shutil.rmtree(self.staging)
        else:
            # the journal travels with the rename: until it is removed below, a crash
            # leaves complete credentials, which the next run recognises as done
            self.staging.chmod(0o755)
            os.rename(self.staging, self.out)
            fsync_dir(self.out.parent)
        _crash_point("enroll:saved")
        (self.out / JOURNAL).unlink(missing_ok=True)

    def drop_staged(self) -> None:
        """Remove credential files written before a failure; keep the journal."""
        for leftover in self.staging.iterdir() if self.staging.is_dir() else ():
            if leftover.name != JOURNAL:
                leftover.unlink(missing_ok=True)

    def abort(self) -> None:
        """Nothing was recorded: leave no trace (unless an earlier run may have been)."""
        if self.resumable:
            self.drop_staged()
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
