"""`tessera broker config`: the mosquitto.conf lines that load the Tessera plugin,
written only after checking that the broker will start with them (files present, key
usable, policy valid, what the plugin opens within reach of ``--user``, and with
``--check`` nothing in the configuration it joins that breaks it). docs/MQTT.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from provisioning.cli_support import CliError, _check_pem, _one_line, _write_atomic
from structauth.errors import TesseraError


def cmd_broker_config(args: argparse.Namespace) -> None:
    """Write a mosquitto.conf snippet that loads the Tessera plugin, after checking
    that the broker will be able to start with it."""
    from broker_plugin.build import BuildError, ensure_built, readable_by
    from broker_plugin.host import build_enforcer
    from broker_plugin.paths import ConfBounds

    try:
        bounds = ConfBounds(max_packet_size=args.max_packet_size,
                            max_connections=args.max_connections)
    except TesseraError as exc:
        raise CliError(f"--max-packet-size / --max-connections: {exc.detail}") from None
    host, _, port = args.listener.rpartition(":")
    if not host or not port.isdigit():
        raise CliError(f"--listener {args.listener!r}: expected HOST:PORT, e.g. 0.0.0.0:8883")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise CliError("TLS needs both --tls-cert and --tls-key")
    _check_pem(args.bundle, "--bundle", "the trust bundle 'tessera export-bundle' wrote")
    _check_pem(args.credential, "--credential", "this broker's credential PEM "
               "('tessera enroll --kind broker --out DIR' writes DIR/operational.pem)")
    options = {
        "python": sys.executable,
        "trust_domain": _broker_trust_domain(args),
        "bundle": args.bundle,
        "credential": args.credential,
        "key": _broker_key(args.key),
        "policy": args.policy,
    }
    for name in ("provisioner", "cafile", "audit_log", "pin_file", "key_dir"):
        value = getattr(args, name)
        if value:
            options[name] = value
    options.update(_step_up_options(args.plugin_opt or []))
    # Mosquitto resolves a relative path against its own working directory (/ under
    # systemd): every path goes into the conf absolute, as this shell meant it
    for name in _PATH_OPTIONS:
        if options.get(name):
            options[name] = _absolute(options[name])
    options["key"] = _absolute_key(options["key"])
    if not args.user or any(c.isspace() or c == "#" for c in args.user):
        raise CliError(f"--user {args.user!r}: not an account name; pass the account "
                       "mosquitto runs as (default mosquitto)")
    output = _own_output_or_refuse(args.output, args.check)
    joined = _read_mosquitto_conf(Path(args.check), skip=output) if args.check else []
    # started as root, Mosquitto drops to the account its 'user' line names (to
    # 'mosquitto' without one) before it loads the plugin, and refuses a second 'user'
    # line: the snippet carries it unless the conf it joins already names that account
    for where, key, rest in joined:
        if key == "user" and rest[:1] != [args.user]:
            raise CliError(f"{where}: user {' '.join(rest) or '(none)'}, but --user is "
                           f"{args.user} (the account checked for read access): pass --user "
                           f"{' '.join(rest)} or change this line")
    user_line = [] if any(key == "user" for _, key, _ in joined) else [f"user {args.user}"]
    # --state-dir: the plugin is built into DIR/plugin (as 'python -m broker_plugin.build
    # --state-dir DIR'), so the conf never points into a source checkout or site-packages
    plugin_dir = Path(_absolute(args.state_dir)) / "plugin" if args.state_dir else None
    try:
        plugin = ensure_built(plugin_dir)
    except BuildError as exc:
        raise CliError(exc.detail) from None
    # the broker starts with these options: refuse here, in one line, what it would refuse
    try:
        enforcer, signer = build_enforcer(options)
    except (ValueError, OSError) as exc:
        raise CliError(f"the plugin would refuse these options: {_one_line(exc)}") from None
    getattr(signer, "close", lambda: None)()
    if args.user:
        read, write = _broker_files(options)
        try:
            blocked = readable_by(args.user, plugin_dir, read=read, write=write)
        except KeyError:
            raise CliError(f"--user {args.user}: no such user; pass the account mosquitto "
                           "runs as") from None
        if blocked:  # all of them in the one line: fixed together, not one per run
            unread = [b for b in blocked if "cannot write" not in b]
            unwritten = [b.replace("cannot write: ", "") for b in blocked if b not in unread]
            what = "; ".join(
                [*([f"cannot read {', '.join(unread)}"] if unread else []),
                 *([f"cannot write {', '.join(unwritten)}"] if unwritten else [])])
            raise CliError(
                f"mosquitto drops to user {args.user} before it loads plugins, and that user "
                f"{what}: give {args.user} access (chown or chmod, or install Tessera where "
                f"{args.user} can read it), or pass --user with the account mosquitto runs as"
            )
    lines = [
        _CONF_HEADER,
        *user_line,
        "per_listener_settings false",
        "allow_anonymous false  # clients without the tessera-sa1 method are refused too",
        # step-up requests and AUTH answers are small packets: without this, Nagle and
        # delayed ACKs add ~40 ms to every step-up round trip (52 ms vs 7 ms measured)
        "# pre-authentication bounds (docs/MQTT.md): Mosquitto refuses a packet whose",
        "# declared length exceeds max_packet_size before buffering it; 2.0.11 has no",
        "# CONNECT timeout, so max_connections is what bounds idle and half-open sockets",
        *bounds.global_lines(),
        "# never set memory_limit: 2.0.x's memory count underflows with extended auth",
        f"listener {port} {host}",
        *bounds.listener_lines(),
    ]
    if args.tls_cert:
        lines += [f"certfile {_absolute(args.tls_cert)}",
                  f"keyfile {_absolute(args.tls_key)}"]
    lines.append(f"plugin {plugin}")
    lines += [f"plugin_opt_{k} {v}" for k, v in options.items()]
    # the broker runs with the conf it joins plus this snippet: check them together
    snippet = [(f"<snippet>:{n}", *_words(line)) for n, line in enumerate(lines, 1)
               if _words(line)]
    problems = _conf_problems(joined, snippet)
    if problems:
        raise CliError(problems[0])
    text = "\n".join(lines) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:  # a new file, or this command's own earlier output: replaced atomically
        _write_atomic(output, text.encode(), "-o")
        if not args.json:
            print(f"mosquitto configuration written to {args.output} "
                  f"(policy {enforcer.policy.digest.hex()[:12]}; started as root, mosquitto "
                  f"runs as user {args.user})")


def _broker_files(options: dict[str, str]) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """What the plugin reads (its identity files, policy, PIN, CA, a software key, the
    attestation keys; SoftHSM2's configuration and token directory for a SoftHSM2 key)
    and writes (the audit log, the nonce and revocation files) as the broker's user."""
    read = [Path(options[k]) for k in ("bundle", "credential", "policy", "pin_file",
                                       "cafile", "attestation_keys", "key_dir")
            if options.get(k)]
    key = options["key"]
    if key.startswith("insecure-software:"):
        read.append(Path(key.removeprefix("insecure-software:")))
    elif key.startswith("pkcs11:") and "softhsm" in key.split("#", 1)[0].lower():
        conf = os.environ.get("SOFTHSM2_CONF")
        if conf:  # the broker needs the same SOFTHSM2_CONF (docs/MQTT.md)
            read.append(Path(conf))
            tokens = _softhsm_token_dir(Path(conf))
            if tokens is not None:  # and its tokens
                read.append(tokens)
    write = [Path(options[k]) for k in ("audit_log", "nonce_file", "revocation_file")
             if options.get(k)]
    return tuple(read), tuple(write)


def _softhsm_token_dir(conf: Path) -> Path | None:
    try:
        for line in conf.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "directories.tokendir":
                return Path(value.strip())
    except (OSError, UnicodeDecodeError):
        pass
    return None


#: the first line of every file 'broker config' writes: how it knows its own output,
#: which a later run replaces (and --check does not count as joined configuration)
_CONF_HEADER = "# Tessera: written by 'tessera broker config'"
#: plugin options that name a file or directory (written absolute)
_PATH_OPTIONS = ("bundle", "credential", "policy", "pin_file", "key_dir", "cafile",
                 "audit_log", "attestation_keys", "nonce_file", "revocation_file")


def _absolute(path: str | Path) -> str:
    """``path`` made absolute against this process's working directory; symlinks are
    kept (a 'current' link stays a link)."""
    return os.path.abspath(path)


def _absolute_key(spec: str) -> str:
    """--key with its file made absolute: the PEM of ``insecure-software:``, the module
    of ``pkcs11:`` when given as a relative path (a bare library name is left to the
    loader's search path); a ``tpm:`` TCTI is not a path."""
    if spec.startswith("insecure-software:"):
        return "insecure-software:" + _absolute(spec.removeprefix("insecure-software:"))
    if spec.startswith("pkcs11:"):
        module, sep, rest = spec.removeprefix("pkcs11:").rpartition("#")
        if sep and "/" in module and not module.startswith("/"):
            return f"pkcs11:{_absolute(module)}#{rest}"
    return spec


def _is_own_output(path: Path) -> bool:
    """Whether ``path`` is a file 'broker config' wrote: its first line is the header."""
    try:
        with open(path, "rb") as f:
            first = f.readline(len(_CONF_HEADER) + 2)
    except OSError:
        return False
    return first.rstrip(b"\r\n") == _CONF_HEADER.encode()


def _own_output_or_refuse(output: str, check: str | None) -> Path | None:
    """The -o file (None: stdout). An existing one must be this command's earlier
    output (it is replaced); anything else is refused before anything is built."""
    if output == "-":
        return None
    path = Path(output)
    if path.is_dir():
        raise CliError(f"-o {path} is a directory; name a file")
    if (path.exists() or path.is_symlink()) and not _is_own_output(path):
        raise CliError(f"-o {path} exists and was not written by 'tessera broker config'; "
                       "nothing was changed: pass a different -o or remove that file")
    if check and path.exists() and Path(check).exists() and path.samefile(check):
        raise CliError(f"--check {check} is the -o file; pass the mosquitto.conf that "
                       "includes it (its include_dir)")
    return path


#: plugin options 'broker config' sets from its own flags (--plugin-opt refers to them)
_FLAG_OPTIONS = {"python": None, "trust_domain": "--trust-domain", "bundle": "--bundle",
                 "credential": "--credential", "key": "--key", "pin_file": "--pin-file",
                 "key_dir": "--key-dir", "policy": "--policy", "provisioner": "--provisioner",
                 "cafile": "--cafile", "audit_log": "--audit-log"}
#: the other options the plugin reads (broker_plugin/host.py's module doc; the step-up
#: and quarantine knobs come from broker_plugin.stepup, fan-out from broker_plugin.host):
#: listed here because the plugin has no registry of them; test_cli_broker_config's
#: check against the host's documentation keeps the two in step
_PLAIN_OPTIONS = ("direct", "metrics_port", "attestation_keys", "nonce_file",
                  "nonce_database", "nonce_poll_s", "quarantine_database", "revocation_file",
                  "revocation_grace_s", "revocation_stale", "session_epoch_ms",
                  "session_skew_epochs", "session_lifetime_s", "session_replay_window",
                  "pending_timeout_s", "pending_max", "pending_per_source",
                  "pending_per_client")


def _known_plugin_options() -> list[str]:
    from broker_plugin.host import FANOUT_OPTIONS
    from broker_plugin.stepup import STEP_UP_OPTIONS

    return sorted({*_PLAIN_OPTIONS, *FANOUT_OPTIONS, *STEP_UP_OPTIONS})


def _step_up_options(pairs: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` plugin options: known names only (each flag's own option through
    its flag), the step-up / quarantine knobs checked by the plugin's own parser, the
    others by build_enforcer (or here, for what only the running plugin reads)."""
    from broker_plugin.stepup import STEP_UP_OPTIONS, parse_settings

    known = _known_plugin_options()
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().removeprefix("plugin_opt_")
        if sep and name in _FLAG_OPTIONS:
            flag = _FLAG_OPTIONS[name]
            raise CliError(f"--plugin-opt {pair!r}: {name} is set by "
                           f"{flag or 'this command (the running Python)'}; use that")
        if not sep or name not in known or not value.strip():
            raise CliError(f"--plugin-opt {pair!r}: expected NAME=VALUE with NAME one of "
                           f"{', '.join(known)}")
        out[name] = value.strip()
    port = out.get("metrics_port")
    if port is not None and not (port.isdigit() and 0 <= int(port) <= 65535):
        raise CliError(f"--plugin-opt metrics_port={port}: a TCP port 1..65535, or 0 for a "
                       "free one")
    parse_settings({k: v for k, v in out.items() if k in STEP_UP_OPTIONS})
    return out


def _broker_key(spec: str) -> str:
    """--key as other commands take a key: ``pkcs11:<module>#<token>/<label>`` or
    without the prefix (as --pkcs11 takes it), ``tpm:<tcti>#<name>``, and for
    development ``insecure-software:<pem>``."""
    if spec.startswith(("pkcs11:", "tpm:", "insecure-software:")):
        return spec
    module, sep, rest = spec.rpartition("#")
    if sep and module and "/" in rest:
        return f"pkcs11:{spec}"
    raise CliError(f"--key {spec!r}: expected [pkcs11:]<module>#<token>/<label> (as "
                   "'tessera enroll --pkcs11' takes it) or tpm:<tcti>#<name>")


def _broker_trust_domain(args: argparse.Namespace) -> str:
    """The credential's trust domain; --trust-domain, when given, must be that one (a
    broker in another domain would refuse every device of this fleet)."""
    from structauth.credentials import Credential

    try:
        cred = Credential.from_pem(Path(args.credential).read_bytes())
    except (TesseraError, ValueError) as exc:
        raise CliError(f"--credential {args.credential}: not a Tessera credential "
                       f"({_one_line(exc)}); pass the broker's operational.pem") from None
    identity = cred.identity
    if identity.kind != "broker":
        raise CliError(f"--credential {args.credential} is {identity}, not a broker; enroll "
                       "the broker with 'tessera enroll --kind broker' and pass its "
                       "operational.pem")
    domain = str(identity.trust_domain)
    if args.trust_domain and args.trust_domain != domain:
        raise CliError(f"--trust-domain {args.trust_domain} is not the trust domain of "
                       f"--credential {args.credential} ({identity}); pass "
                       f"--trust-domain {domain} or leave it out")
    return domain


def _words(line: str) -> tuple[str, ...]:
    return tuple(line.split("#", 1)[0].split())


def _read_mosquitto_conf(path: Path, skip: Path | None = None
                         ) -> list[tuple[str, str, list[str]]]:
    """(file:line, key, arguments) of every setting, in the order Mosquitto reads them
    (an ``include_dir``'s ``*.conf`` files in place, sorted). ``skip``, the file being
    replaced (this command's earlier output), is left out: the new snippet takes its
    place."""
    entries: list[tuple[str, str, list[str]]] = []
    seen: set[Path] = set()
    replaced = skip if skip is not None and skip.exists() else None

    def read(conf: Path) -> None:
        if conf in seen:
            return
        seen.add(conf)
        if replaced is not None and conf != path and conf.exists() and conf.samefile(replaced):
            return
        try:
            lines = conf.read_text(errors="replace").splitlines()
        except OSError as exc:
            raise CliError(f"--check {conf}: cannot read it ({exc.strerror})") from None
        for number, raw in enumerate(lines, 1):
            words = _words(raw)
            if not words:
                continue
            entries.append((f"{conf}:{number}", words[0], list(words[1:])))
            if words[0] == "include_dir" and len(words) > 1:
                directory = Path(words[1])
                if not directory.is_absolute():
                    directory = conf.parent / directory
                for included in sorted(directory.glob("*.conf")):
                    read(included)

    read(path)
    return entries


def _conf_problems(joined: list[tuple[str, str, list[str]]],
                   snippet: list[tuple[str, ...]]) -> list[str]:
    """What would make the broker unsafe with the mosquitto.conf it joins (``joined``,
    possibly empty) plus the snippet: settings that break the plugin, and missing or
    unlimited pre-authentication bounds (broker_plugin.paths.CONF_LIMITS), each as
    "file:line: what; the fix"."""
    from broker_plugin.paths import CONF_LIMITS

    problems: list[str] = []
    entries: list[tuple[str, str, list[str]]] = [(w, k, list(a)) for w, k, a in joined]
    entries += [(e[0], e[1], list(e[2:])) for e in snippet]
    # listener sections: the settings before the first "listener" belong to the default
    # listener ("port"); max_connections applies to the listener it follows
    sections: list[tuple[str, bool]] = []  # (where the listener is declared, bounded)
    default: str | None = None
    default_bounded = False
    seen: set[str] = set()
    for index, (where, key, rest) in enumerate(entries):
        ours = index >= len(joined)
        seen.add(key)
        value = rest[0] if rest else ""
        if key == "memory_limit":
            problems.append(f"{where}: remove memory_limit: Mosquitto 2.0.x's memory "
                            "accounting underflows with extended auth and then refuses "
                            "every allocation")
        elif key == "per_listener_settings" and value == "true":
            problems.append(f"{where}: per_listener_settings true stops Mosquitto 2.0.x "
                            "from ticking the plugin (revocation and step-up stall); set "
                            "it to false")
        elif key == "plugin" and value.endswith("tessera_mosquitto.so") and not ours:
            problems.append(f"{where}: the Tessera plugin is already loaded here; "
                            "remove this line or do not include the new snippet")
        elif key == "check_retain_source" and value == "true":
            problems.append(f"{where}: remove check_retain_source true: it re-checks a "
                            "retained message's publisher through a fake connection, which "
                            "the plugin refuses as a Will (retained messages would never "
                            "be delivered)")
        elif key == "set_tcp_nodelay" and value != "true":
            problems.append(f"{where}: set_tcp_nodelay must stay true (step-up and AUTH "
                            "round trips wait for delayed ACKs without it)")
        elif key == "allow_anonymous" and value != "false":
            problems.append(f"{where}: allow_anonymous must be false (clients without "
                            "the tessera-sa1 method must never be let in)")
        elif key in CONF_LIMITS:
            low, high = CONF_LIMITS[key]
            try:
                number = int(value)
            except ValueError:
                number = None
            if number is None or not low <= number <= high:
                what = "unlimited" if number is not None and number <= 0 else "out of bounds"
                problems.append(f"{where}: {key} {value or '(none)'} is {what}; use "
                                f"{low}..{high} (it bounds what an unauthenticated client "
                                "can cost the broker)")
            elif key == "max_connections":
                if sections:
                    sections[-1] = (sections[-1][0], True)
                else:
                    default_bounded = True
        if key == "listener":
            sections.append((where, False))
        elif key == "port" and not sections:
            default = where
    for where, bounded in sections + ([(default, default_bounded)] if default else []):
        if not bounded:
            problems.append(f"{where}: this listener has no max_connections; add "
                            "'max_connections N' after it (2.0.11 has no CONNECT timeout, "
                            "so nothing else bounds idle or half-open connections)")
    for key in ("max_packet_size", "max_inflight_messages", "max_queued_messages",
                "max_queued_bytes", "set_tcp_nodelay"):
        if key not in seen:
            problems.append(f"<snippet>: {key} is missing (a pre-authentication bound)")
    return problems
