"""Property tests for the parsers at the edges that are not SA1 wire formats: whatever
arrives, it parses into a valid object or is refused with our own error type
(``structauth.errors.TesseraError`` subclasses); over HTTP, with a 4xx JSON error and
nothing recorded. tests/test_fuzz.py does the same for SA1 messages, headers,
credentials and fan-out.

Targets:

* policy files (broker_plugin/policy.py): random text, random bytes through
  ``load_policy``, and valid-looking policies (a TOML writer below) with wrong types,
  huge or non-finite numbers, deep nesting, NUL, lone surrogates, huge strings, "false"
  for false; a policy that parses must answer every check with a Decision;
* the Mosquitto plugin's options (broker_plugin/host.py ``parse_settings``,
  ``parse_session``, ``parse_fanout``): a valid object within the documented bounds, or
  one line of ConfigurationError naming the option;
* the provisioning API's request bodies (provisioning/service.py and enrollment.py)
  through the ASGI app with httpx: every POST endpoint, random bytes, random JSON and
  objects with the right keys and wild values, genuine proofs mutated; the revocation
  feed's query; answers are 4xx JSON ``{"error", "code", "detail"}``, never 5xx, nothing
  logged at ERROR, the registry unchanged by a refusal;
* with swtpm (``hardware``): TPM evidence and activation answers mutated from genuine
  ones, and the device's enrollment endpoint (device/enrollment_endpoint.py) over real
  HTTP on 127.0.0.1 with the device's real TPM: raw bodies and headers, mutated
  activation challenges and mutated issued credentials.

Bounded for CI (``TESSERA_FUZZ_EXAMPLES``, default 300, per target; the targets that
cost a TPM command or an HTTP round trip run a share of it, at least 100). For a long
run outside CI::

    TESSERA_FUZZ_EXAMPLES=60000 TESSERA_FUZZ_INPUTS_REPORT=/tmp/fuzz-inputs.json \\
        nice -n 19 .venv/bin/pytest tests/test_fuzz_inputs.py -q -p no:cacheprovider

``TESSERA_FUZZ_INPUTS_REPORT`` names a JSON file that receives the number of inputs each
target ran (every call of a test body, including hypothesis's shrinking and replays).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import math
import os
import socket
import traceback
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tpm2_pytss import TPM2B_PUBLIC

from broker_plugin.host import (
    _SETTINGS,
    FANOUT_OPTIONS,
    parse_fanout,
    parse_session,
    parse_settings,
)
from broker_plugin.policy import (
    COAP_METHODS,
    Decision,
    Policy,
    StepUp,
    load_policy,
    parse_policy,
)
from device.attestation import ActivationChallenge, TpmEvidence
from device.enrollment_endpoint import EnrollmentEndpoint
from device.provisioner import LocalTpm, pop_signature
from hw.software import InsecureSoftwareSigner
from hw.tpm import TpmBackend
from provisioning.attestation import (
    TpmMakerRoots,
    _area_key,
    make_challenge,
    verify_evidence,
)
from provisioning.authority import FleetAuthority
from provisioning.enrollment import EnrollmentService
from provisioning.operators import Operators
from provisioning.registry import Registry, open_registry
from provisioning.service import build_app
from simulator.swtpm import Swtpm
from structauth.credentials import Identity
from structauth.errors import ConfigurationError, Reason, TesseraError
from structauth.possession import LABEL_ENROLL, LABEL_RENEW
from tests.test_fuzz import mutate
from tests.test_fuzz import ops as byte_ops

EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "300"))
#: a few inputs are strings of 5,000 characters on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


def budget(share: float = 1.0) -> settings:
    """Hypothesis settings for a target that runs ``share`` of EXAMPLES (at least 100,
    or EXAMPLES if that is smaller)."""
    return settings(
        max_examples=max(min(EXAMPLES, 100), int(EXAMPLES * share)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


FAST = budget()
#: inputs each target ran, written to $TESSERA_FUZZ_INPUTS_REPORT at the end of the module
COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    path = os.environ.get("TESSERA_FUZZ_INPUTS_REPORT")
    if path:
        data = {"examples_setting": EXAMPLES, "total": sum(COUNTS.values()), **COUNTS}
        with open(path, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)


def count(name: str) -> None:
    COUNTS[name] += 1


def refused(call: Callable[[], object]) -> TesseraError | None:
    """Run ``call``; return our error if it raised one, None if it returned. Anything
    that is not a TesseraError propagates and fails the test."""
    try:
        call()
    except TesseraError as exc:
        assert isinstance(exc.reason, Reason)
        assert exc.detail and isinstance(exc.detail, str)
        return exc
    return None


# -- generic inputs ---------------------------------------------------------------------

#: strings that have broken parsers somewhere: NUL, lone surrogates, bidi, braces,
#: wildcards, numbers that are not numbers, "false" where a bool belongs, huge text
NASTY = [
    "", " ", "\x00", "a\x00b", "\ud800", "x\udfff", "\U0001f600", "é", "\u202e", "\r", "\n",
    "\x7f", "$SYS/#", "{id}", "{", "}", "{{id}}", "{id:>3}", "{id!r}", "{0}", "{}", "+", "#",
    "a/#/b", "a+/b", "/", "//", "false", "true", "False", "0", "1", "-1", "nan", "NaN", "inf",
    "-Infinity", "1e999", "0x10", "1_000", "\u0661\u0662", "\uff19", " 5 ", "5\n",
    "x" * 5000, "9" * 5000,
]
nasty = st.sampled_from(NASTY)
#: text including what st.text() leaves out by default: surrogates and control characters
any_text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None, categories=None), max_size=20),
    nasty,
    st.lists(st.one_of(nasty, st.text(max_size=4)), max_size=5).map("".join),
)
wild_numbers = st.one_of(
    st.integers(),
    st.floats(),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 10**400, -(2**63), 2**64,
                     0, -1, 1.5, -0.0, 1e308]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), wild_numbers, any_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(any_text, inner, max_size=5)),
    max_leaves=10,
)


def text_ops() -> st.SearchStrategy[list[tuple[str, int, str]]]:
    """Edits of a text: set, insert or delete at a position, cut the tail."""
    pos = st.integers(0, 1 << 16)
    piece = st.one_of(nasty, st.text(max_size=6),
                      st.sampled_from(['"', "'", "[", "]", "{", "}", "=", ",", "\n", "#", "."]))
    return st.lists(
        st.one_of(
            st.tuples(st.just("set"), pos, piece),
            st.tuples(st.just("insert"), pos, piece),
            st.tuples(st.just("delete"), pos, st.integers(1, 12).map(str)),
            st.tuples(st.just("cut"), pos, st.just("")),
        ),
        min_size=1,
        max_size=4,
    )


def edit_text(text: str, edits: list[tuple[str, int, str]]) -> str:
    for kind, pos, arg in edits:
        at = pos % (len(text) + 1)
        if kind == "set":
            text = text[:at] + arg + text[at + 1 :]
        elif kind == "insert":
            text = text[:at] + arg + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + int(arg) :]
        else:
            text = text[:at]
    return text


# -- policy files -----------------------------------------------------------------------


class Raw(str):
    """TOML text written as is (dates, bare words, deep nesting, numbers TOML spells)."""


def toml_value(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # a JSON string is a TOML basic string, except that raw DEL and lone surrogates
        # pass through here (TOML refuses both: good inputs for the parser)
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)} = {toml_value(v)}"
                               for k, v in value.items() if v is not None) + "}"
    return '""'


def toml_document(doc: dict[str, Any], path: tuple[str, ...] = ()) -> str:
    """``doc`` as TOML: scalars and arrays as ``key = value``, tables as ``[a."b"]``
    sections, arrays of tables as ``[[...]]``."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in doc.items():
        if value is None:
            continue
        is_table = isinstance(value, dict) and not isinstance(value, Raw)
        if is_table or (isinstance(value, list) and value and all(
                isinstance(v, dict) for v in value)):
            tables.append((key, value))
        else:
            lines.append(f"{json.dumps(key, ensure_ascii=False)} = {toml_value(value)}")
    for key, value in tables:
        here = (*path, key)
        name = ".".join(json.dumps(k, ensure_ascii=False) for k in here)
        for table in value if isinstance(value, list) else [value]:
            lines.append(f"[[{name}]]" if isinstance(value, list) else f"[{name}]")
            lines.append(toml_document(table, here))
    return "\n".join(lines) + "\n"


VALID_TEMPLATES = [
    "devices/{id}/telemetry/#", "devices/{id}/events/+", "devices/{id}/commands/#",
    "fleet/announcements", "devices/{id}/state", "devices/{id}/will", "sites/{id}/+/t/#",
    "{td}/{class}/x", "sensors/{id}/#", "#", "+/x", "a/b", "$SYS/broker/#",
]
CLASS_NAMES = ["default", "gateway", "a.b", "x-1", "sensor_2"]
toml_oddities = st.sampled_from([
    Raw("1979-05-27T07:32:00Z"), Raw("07:32:00"), Raw("1979-05-27"), Raw("0x10"),
    Raw("0o7"), Raw("0b1"), Raw("+inf"), Raw("-nan"), Raw("1_000"), Raw("9" * 5000),
    Raw("[" * 3000 + "]" * 3000), Raw("{a=" * 600 + "1" + "}" * 600), Raw("'''x'''"),
    Raw('"\\ud800"'), Raw('"\\u0000"'), Raw('"\\U0010ffff"'), Raw("[1, 'a', [], {}]"),
])
wild = st.one_of(json_values, toml_oddities, nasty)
templates = st.one_of(
    st.sampled_from(VALID_TEMPLATES),
    st.sampled_from(VALID_TEMPLATES),
    nasty,
    st.text(st.sampled_from("ab/+#{}$\x00 idclasstd:!"), max_size=24),
    any_text,
)
template_lists = st.one_of(st.lists(templates, max_size=4), st.lists(templates, max_size=4),
                           wild)
switch = st.one_of(st.booleans(), st.booleans(), wild)
step_table = st.fixed_dictionaries(
    {"publish": template_lists}, optional={"quote": switch, "extra": wild})
coap_table = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(COAP_METHODS), any_text), template_lists,
                    max_size=3),
    wild,
)
class_body = st.fixed_dictionaries({}, optional={
    "inherits": st.one_of(st.sampled_from(CLASS_NAMES), wild),
    "publish": template_lists, "subscribe": template_lists, "retain": template_lists,
    "will": template_lists, "will_delay": switch,
    "step_up": st.one_of(step_table, st.lists(step_table, max_size=3), wild),
    "coap": coap_table,
    "unknown": wild,
})
brokers_body = st.fixed_dictionaries({}, optional={
    "publish": template_lists, "subscribe": template_lists, "retain": template_lists,
    "will": template_lists, "will_delay": switch, "coap": coap_table, "inherits": wild,
})
policy_documents = st.fixed_dictionaries(
    {"version": st.one_of(st.just(1), st.just(1), st.just(1), wild)},
    optional={
        "classes": st.one_of(
            st.dictionaries(st.one_of(st.sampled_from(CLASS_NAMES), any_text), class_body,
                            max_size=4),
            st.dictionaries(st.sampled_from(CLASS_NAMES), class_body, min_size=1, max_size=3),
            wild,
        ),
        "brokers": st.one_of(brokers_body, wild),
        "extra": wild,
    },
)

DEVICE = Identity.parse("spiffe://fz.example/device/dev-1")
BROKER = Identity.parse("spiffe://fz.example/broker/b-1")
topics = st.one_of(
    st.sampled_from(["devices/dev-1/telemetry/x", "devices/dev-1/will", "fleet/announcements",
                     "", "#", "+", "$SYS/x", "$share/g/devices/dev-1/commands/#", "a/+/b",
                     "\x00", "a//b", "/", "fz.example/default/x"]),
    any_text,
)


def exercise(policy: Policy, topic: str, device_class: str) -> None:
    """Every check of a policy that parsed answers with a Decision (or a StepUp/None)."""
    assert len(policy.digest) == 32
    for who in (DEVICE, BROKER):
        for cls in (device_class, "default", "nope"):
            for check in (policy.may_publish, policy.may_subscribe, policy.may_retain):
                assert isinstance(check(who, cls, topic), Decision)
            for retain in (False, True):
                decision = policy.may_will(who, cls, topic, retain=retain, delayed=retain)
                assert isinstance(decision, Decision)
            step = policy.step_up_for(who, cls, topic)
            assert step is None or isinstance(step, StepUp)
            for method in ("GET", "POST", "iPATCH", "BREW"):
                decision = policy.may_request(who, cls, method, topic.split("/"))
                assert isinstance(decision, Decision)


def policy_refused(text: str) -> Policy | None:
    """Parse ``text``; a refusal must be one line of ConfigurationError naming the
    source. Returns the policy if it parsed."""
    result: list[Policy] = []
    err = refused(lambda: result.append(parse_policy(text, "fz.toml")))
    if err is not None:
        assert isinstance(err, ConfigurationError), repr(err)
        assert str(err).startswith("fz.toml: ") and "\n" not in str(err), str(err)
        return None
    return result[0]


@given(st.one_of(any_text, st.binary(max_size=400).map(lambda b: b.decode("latin-1"))))
@FAST
def test_policy_random_text(text: str) -> None:
    count("parse_policy random text")
    policy_refused(text)


@given(policy_documents, st.one_of(st.just([]), text_ops()), topics,
       st.one_of(st.sampled_from(CLASS_NAMES), any_text))
@FAST
def test_policy_structured(doc: dict[str, Any], edits: list[tuple[str, int, str]], topic: str,
                           device_class: str) -> None:
    count("parse_policy valid-looking, mutated")
    text = edit_text(toml_document(doc), edits)
    policy = policy_refused(text)
    if policy is not None:
        exercise(policy, topic, device_class)
        again = policy_refused(text)
        assert again is not None and again.digest == policy.digest


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policy") / "policy.toml"


GOOD_POLICY = toml_document({
    "version": 1,
    "classes": {"default": {"publish": ["devices/{id}/telemetry/#", "devices/{id}/will"],
                            "subscribe": ["devices/{id}/commands/#"],
                            "will": ["devices/{id}/will"],
                            "step_up": [{"publish": ["devices/{id}/telemetry/fw"],
                                         "quote": True}],
                            "coap": {"GET": ["sensors/{id}/#"]}},
                "gateway": {"inherits": "default", "publish": ["sites/{id}/+/t/#"]}},
    "brokers": {"publish": ["#"], "subscribe": ["#"]},
})


@given(st.one_of(
    st.binary(max_size=600),
    byte_ops.map(lambda edits: mutate(GOOD_POLICY.encode(), edits)),
    policy_documents.map(lambda d: toml_document(d).encode("utf-8", "surrogatepass")),
), topics)
@FAST
def test_policy_file_random_bytes(policy_file: Path, data: bytes, topic: str) -> None:
    count("load_policy random bytes")
    policy_file.write_bytes(data)
    result: list[Policy] = []
    err = refused(lambda: result.append(load_policy(policy_file)))
    if err is not None:
        assert isinstance(err, ConfigurationError) and "\n" not in str(err), repr(err)
        assert str(err).startswith(f"{policy_file}: "), str(err)
    else:
        exercise(result[0], topic, "default")


def test_good_policy_parses() -> None:
    """The structured strategies start from policies that parse."""
    policy = parse_policy(GOOD_POLICY)
    assert policy.may_publish(DEVICE, "gateway", "sites/dev-1/x/t/1")


# -- the plugin's options ---------------------------------------------------------------

SETTINGS_OPTIONS = sorted(_SETTINGS)
SESSION_OPTIONS = ["session_epoch_ms", "session_skew_epochs", "session_lifetime_s",
                   "session_replay_window", "pending_timeout_s", "pending_max",
                   "pending_per_source", "pending_per_client"]
option_values = st.one_of(
    nasty,
    any_text,
    st.integers().map(str),
    st.integers(-5, 70_000).map(str),
    st.floats().map(repr),
    st.floats(0, 1e6).map(str),
    st.sampled_from(["on", "off", "yes", "no", "TRUE", " off ", "10", "0.1", "1e-9", "60",
                     "60.0000001", "3600000", "604800", "65535", "1024", "50", "60000", "16",
                     "17"]),
)


def options_for(names: list[str]) -> st.SearchStrategy[dict[str, str]]:
    return st.dictionaries(st.one_of(st.sampled_from(names), st.sampled_from(names), any_text),
                           option_values, max_size=6)


def option_error(err: TesseraError | None) -> None:
    if err is not None:
        assert isinstance(err, ConfigurationError), repr(err)
        assert "plugin_opt_" in err.detail, err.detail
        assert "\n" not in str(err) and "\r" not in str(err), repr(str(err))


@given(options_for(SETTINGS_OPTIONS))
@FAST
def test_plugin_settings_options(options: dict[str, str]) -> None:
    count("host.parse_settings")
    result: list[Any] = []
    err = refused(lambda: result.append(parse_settings(options)))
    option_error(err)
    if err is None:
        [s] = result
        for option, (name, kind, minimum) in _SETTINGS.items():
            value = getattr(s, name)
            if kind == "switch":
                assert type(value) is bool
            else:
                assert math.isfinite(value) and value >= minimum, (option, value)
                if kind == "count":
                    assert type(value) is int


@given(options_for(SESSION_OPTIONS))
@FAST
def test_plugin_session_options(options: dict[str, str]) -> None:
    count("host.parse_session")
    result: list[Any] = []
    err = refused(lambda: result.append(parse_session(options)))
    option_error(err)
    if err is None:
        [s] = result
        assert s.params.problem() is None and s.pending.problem() is None
        assert 0 < s.pending_timeout <= 60


@given(options_for(list(FANOUT_OPTIONS)), st.floats(-1e9, 1e9))
@FAST
def test_plugin_fanout_options(options: dict[str, str], now: float) -> None:
    count("host.parse_fanout")
    result: list[Any] = []
    err = refused(lambda: result.append(parse_fanout(options, now)))
    option_error(err)
    if err is None:
        [signer] = result
        assert (signer is None) == ("fanout_interval_ms" not in options)
        if signer is not None:
            assert 0.05 <= signer.interval_s <= 60 and 1 <= signer.delay <= 16


def test_policy_huge_number_deep_nesting_and_surrogates_are_configuration_errors(
    policy_file: Path,
) -> None:
    """Found by the fuzzer: an integer of more than 4300 digits made tomllib raise a plain
    ValueError, arrays or inline tables nested a few thousand deep a RecursionError, and a
    template holding a lone surrogate (possible in a str given to parse_policy) a
    UnicodeEncodeError from the digest. Each is a ConfigurationError of one line now."""
    cases = [
        ("version = 1" + "0" * 5000, "TOML value error"),
        ("version = 1\nx = " + "[" * 5000 + "]" * 5000, "nested too deep"),
        ("version = 1\nx = " + "{a=" * 2000 + "1" + "}" * 2000, "nested too deep"),
        ('version = 1\n[classes.a]\npublish = ["a/\ud800"]', "lone surrogate"),
        ('version = 1\n[brokers]\nsubscribe = ["\udfff/#"]', "lone surrogate"),
    ]
    for text, expected in cases:
        err = refused(lambda t=text: parse_policy(t, "fz.toml"))  # type: ignore[misc]
        assert isinstance(err, ConfigurationError), text[:40]
        assert expected in err.detail and "\n" not in str(err), err.detail
        assert err.reason is Reason.BAD_CONFIGURATION
    policy_file.write_bytes(cases[0][0].encode())
    err = refused(lambda: load_policy(policy_file))
    assert isinstance(err, ConfigurationError) and "TOML value error" in err.detail
    with pytest.raises(ConfigurationError, match="lone surrogate"):
        Policy({"a": parse_policy(GOOD_POLICY).classes["default"].__class__(
            publish=("x/\ud800",))})


def test_fanout_interval_too_large_for_a_float_is_a_configuration_error() -> None:
    """Found by the fuzzer: plugin_opt_fanout_interval_ms of 400 digits parsed as an int
    and overflowed the float division (OverflowError out of plugin_init)."""
    for raw in ("9" * 400, str(2**1100), "-" + "9" * 400):
        err = refused(lambda r=raw: parse_fanout({"fanout_interval_ms": r}, 0.0))  # type: ignore[misc]
        assert isinstance(err, ConfigurationError)
        assert "plugin_opt_fanout_interval_ms" in err.detail and "50..60000" in err.detail
    assert parse_fanout({"fanout_interval_ms": "50", "fanout_delay": "16"}, 0.0) is not None


def test_session_option_errors_are_one_line() -> None:
    """Found by the fuzzer: a session or pending option whose value carried a newline
    ("5\\n": int() strips it) was echoed raw, so the one-line error had two. The message
    names the parsed value now."""
    for options, expected in (
        ({"session_epoch_ms": "5\n"}, "plugin_opt_session_epoch_ms 5: epoch_ms 5 outside"),
        ({"pending_per_client": " 0\r\n"}, "plugin_opt_pending_per_client 0: pending"),
        ({"session_lifetime_s": "\t0 "}, "plugin_opt_session_lifetime_s 0: lifetime_s 0"),
    ):
        err = refused(lambda o=options: parse_session(o))  # type: ignore[misc]
        assert isinstance(err, ConfigurationError)
        assert err.detail.startswith(expected) and "\n" not in str(err), err.detail


# -- the provisioning API's request bodies ----------------------------------------------

SERIAL = "fz-enrolled"  # an active device: renewals and revocations have someone to act on


class _Errors(logging.Handler):
    """Log records at ERROR or with a traceback (none may appear)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@dataclass
class Api:
    """The provisioning service in process (insecure file key, SQLite in memory) behind
    its ASGI app, driven by httpx."""

    service: EnrollmentService
    registry: Registry
    runner: asyncio.Runner
    client: httpx.AsyncClient
    token: str
    device: InsecureSoftwareSigner
    errors: _Errors

    @property
    def spki(self) -> bytes:
        return self.device.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def call(self, method: str, path: str, content: bytes = b"",
             params: dict[str, str] | None = None, auth: bool = True) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.token}"} if auth else {}
        request = self.client.request(method, path, content=content, params=params,
                                      headers=headers)
        # a request that is still running after 10 s is a hang (a long poll that never ends)
        return self.runner.run(asyncio.wait_for(request, 10))

    def snapshot(self) -> dict[str, list[Any]]:
        """What the registry holds: devices and counters in full; credentials and
        revocation events by count (they grow with every enrollment a test makes, and
        rows are never rewritten but for revoked_at); pending ids."""
        queries = {
            "devices": "SELECT * FROM devices ORDER BY serial",
            "counters": "SELECT * FROM counters ORDER BY name",
            "credentials": "SELECT count(*), count(revoked_at) FROM credentials",
            "revocations": "SELECT count(*), max(id) FROM revocations",
            "pending": "SELECT token FROM pending ORDER BY token",
        }
        conn = self.registry._conn
        return {name: [tuple(row) for row in conn.execute(sql).fetchall()]
                for name, sql in queries.items()}

    def forget(self, token: Any) -> None:
        """Use up a pending id a test made or a success answered with, so the pending
        table stays small."""
        if isinstance(token, str):
            self.registry.take_pending(token, dt.datetime.now(dt.UTC))

    def witnessed(self, serial: str, *, reenroll: bool = True) -> tuple[str, bytes]:
        """A fresh witnessed start (in process): (enrollment id, the genuine signature)."""
        start = self.service.witnessed_start(
            {"serial": serial, "public_key": b64(self.spki), "reenroll": reenroll,
             "key_backend": "insecure-software"}, operator="fz")
        nonce = base64.b64decode(start["nonce"])
        return start["enrollment_id"], pop_signature(self.device, LABEL_ENROLL, nonce, serial)

    def enroll(self, serial: str) -> None:
        token, signature = self.witnessed(serial)
        self.service.witnessed_finish({"enrollment_id": token, "signature": b64(signature)})


def _dummy_maker_root() -> x509.Certificate:
    """A self-signed root, so that tpm/start works without swtpm (no evidence can chain
    to it: nobody has its key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz TPM maker")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def _api(directory: Path, maker_roots: TpmMakerRoots, registry: Registry
         ) -> Generator[Api, None, None]:
    now = dt.datetime.now(dt.UTC)
    authority = FleetAuthority.init(directory / "authority", "fz.example", pkcs11_module=None,
                                    token_label=None, insecure_file_key=True, now=now)
    service = EnrollmentService(authority, registry, maker_roots)
    operators = Operators(directory / "operators.json")
    token = operators.add("fz")
    transport = httpx.ASGITransport(app=build_app(service, operators),
                                    raise_app_exceptions=False)
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    runner = asyncio.Runner()
    client = httpx.AsyncClient(transport=transport, base_url="http://fz")
    api = Api(service, registry, runner, client, token,
              InsecureSoftwareSigner.from_seed(b"fuzz inputs device key"), errors)
    api.enroll(SERIAL)
    try:
        yield api
    finally:
        runner.run(client.aclose())
        runner.close()
        logging.getLogger().removeHandler(errors)
        registry.close()
        authority.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from _api(tmp_path_factory.mktemp("api"), TpmMakerRoots([_dummy_maker_root()]),
                    open_registry(":memory:"))


def answered(api: Api, resp: httpx.Response, *, where: object = "") -> dict[str, Any]:
    """A 2xx or 4xx JSON answer; a refusal is {"error", "code", "detail"} with a Reason
    (or MALFORMED for what is not JSON); nothing was logged at ERROR."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:300], where)
    assert not api.errors.records, [r.getMessage() for r in api.errors.records]
    data = resp.json()
    assert isinstance(data, dict)
    if resp.status_code >= 300:
        assert 400 <= resp.status_code < 500
        assert set(data) == {"error", "code", "detail"}, data
        assert data["error"] == Reason(data["code"]).name.lower(), data
        assert isinstance(data["detail"], str) and data["detail"]
    return data


POST_PATHS = ["/v1/enroll/tpm/start", "/v1/enroll/tpm/evidence", "/v1/enroll/tpm/finish",
              "/v1/enroll/witnessed/start", "/v1/enroll/witnessed/finish",
              "/v1/renew/challenge", "/v1/renew", f"/v1/devices/{SERIAL}/revoke",
              "/v1/devices/nobody/revoke"]
#: endpoints where a request may succeed without anything genuine in it (the starts
#: write a pending row; a revocation is undone by enrolling the device again)
MAY_SUCCEED = {"/v1/enroll/tpm/start", "/v1/enroll/witnessed/start", "/v1/renew/challenge",
               f"/v1/devices/{SERIAL}/revoke"}
FIELDS = ["serial", "kind", "device_class", "reenroll", "public_key", "key_backend",
          "enrollment_id", "evidence", "secret", "signature", "renewal_id", "reason"]
EVIDENCE_FIELDS = ["ek_certificate", "ek_public", "ak_public", "key_public", "certify_attest",
                   "certify_signature", "ek_intermediates"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


b64_blobs = st.one_of(st.binary(max_size=300).map(b64), st.binary(max_size=64).map(
    lambda b: base64.urlsafe_b64encode(b).decode()), any_text)
field_values = st.one_of(
    json_values, b64_blobs,
    st.sampled_from(["fz-new", SERIAL, "a" * 64, "a" * 65, "device", "broker", "pkcs11",
                     "insecure-software", "tpm", "default", "false", "true", "x" * 200,
                     "y" * 201, "AA==", "x" * 24]),
    st.fixed_dictionaries({}, optional={f: st.one_of(b64_blobs, json_values)
                                        for f in EVIDENCE_FIELDS}),
)
api_objects = st.dictionaries(st.one_of(st.sampled_from(FIELDS), any_text), field_values,
                              max_size=7)
api_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    api_objects.map(lambda v: json.dumps(v).encode()),
    api_objects.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    api_objects.map(lambda v: json.dumps(v).encode("utf-16")),
    st.integers(1, 65_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 20_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.sampled_from([b"", b"null", b"{}", b"NaN", b'{"serial": NaN}', b"\xef\xbb\xbf{}",
                     b'{"serial": "fz-x", "serial": 5}', b"1" * 5000, b"x" * 70_000]),
)


def restore(api: Api, before: dict[str, list[Any]], resp: httpx.Response, path: str) -> None:
    """After a refusal nothing was written; after a success, put the world back where
    the next example expects it."""
    if resp.status_code != 200:
        assert api.snapshot() == before, (path, resp.text[:200])
        return
    data = resp.json()
    for key in ("enrollment_id", "renewal_id"):
        api.forget(data.get(key))
    if path.endswith("/revoke"):
        api.enroll(SERIAL)


@given(st.sampled_from(POST_PATHS), api_bodies, st.booleans())
@budget(0.3)
def test_api_random_bodies(api: Api, path: str, body: bytes, auth: bool) -> None:
    count("provisioning API random bodies")
    before = api.snapshot()
    resp = api.call("POST", path, body, auth=auth or not path.startswith("/v1/enroll"))
    answered(api, resp, where=path)
    if resp.status_code == 200:
        assert path in MAY_SUCCEED, (path, body[:200])
    restore(api, before, resp, path)


start_fields: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"serial": st.one_of(st.sampled_from(["fz-new", SERIAL, "b" * 64]), field_values)},
    optional={
        "kind": st.one_of(st.sampled_from(["device", "broker"]), field_values),
        "device_class": st.one_of(st.sampled_from(["default", "gw.1"]), field_values),
        "reenroll": st.one_of(st.booleans(), st.sampled_from(["false", "true", 0, 1, "", None,
                                                              [], {}, 0.0, "no"])),
        "key_backend": st.one_of(st.sampled_from(["pkcs11", "insecure-software"]),
                                 field_values),
        "public_key": st.one_of(st.just("GENUINE"), field_values),
    },
)


@given(st.sampled_from(["/v1/enroll/tpm/start", "/v1/enroll/witnessed/start"]), start_fields,
       st.one_of(st.just([]), byte_ops))
@budget(0.3)
def test_api_starts(api: Api, path: str, fields: dict[str, Any],
                    key_edits: list[tuple[str, int, Any]]) -> None:
    """A start succeeds only with a valid serial, kind and class, reenroll absent or a
    JSON boolean (a device that is enrolled needs reenroll true), and for a witnessed
    start the device's P-256 key."""
    count("provisioning API starts")
    if fields.get("public_key") == "GENUINE":
        fields["public_key"] = b64(mutate(api.spki, key_edits) if key_edits else api.spki)
    before = api.snapshot()
    resp = api.call("POST", path, json.dumps(fields).encode())
    data = answered(api, resp, where=fields)
    if resp.status_code == 200:
        assert set(data) == {"enrollment_id", "nonce"}
        assert type(fields.get("reenroll", False)) is bool
        assert fields["serial"] != SERIAL or fields["reenroll"] is True
        assert len(api.snapshot()["pending"]) == len(before["pending"]) + 1
    elif type(fields.get("reenroll", False)) is not bool:
        assert data["error"] in ("attestation_failed", "malformed"), data
    restore(api, before, resp, path)


#: a genuine value, changed by these byte edits (none: as it is)
genuine = st.one_of(st.just([]), st.just([]), byte_ops).map(lambda edits: ("GENUINE", edits))
token_choice = st.one_of(genuine, field_values)


def resolve(choice: Any, value: bytes, *, text: bool = False) -> Any:
    """The body value for a choice: a genuine value (mutated by its edits) as base64 (or
    as text for an id), else the wild value itself."""
    if isinstance(choice, tuple) and choice[:1] == ("GENUINE",):
        data = mutate(value, choice[1])
        return data.decode("latin-1") if text else b64(data)
    return choice


def is_text(value: Any) -> bool:
    """No string (or key) in a JSON value holds NUL or a lone surrogate."""
    if isinstance(value, dict):
        return all(is_text(k) and is_text(v) for k, v in value.items())
    if isinstance(value, list):
        return all(is_text(v) for v in value)
    if isinstance(value, str):
        return "\0" not in value and value.encode("utf-8", "replace").decode() == value
    return True


def same_signature(body_value: Any, genuine_der: bytes) -> bool:
    """Does a signature field carry the genuine (r, s), whatever its encoding?"""
    try:
        return bool(decode_dss_signature(base64.b64decode(body_value, validate=True))
                    == decode_dss_signature(genuine_der))
    except (ValueError, TypeError):
        return False


@given(st.sampled_from(["witnessed", "renew", "tpm-finish"]), token_choice, token_choice,
       st.dictionaries(any_text, field_values, max_size=2))
@budget(0.3)
def test_api_proofs(api: Api, flow: str, token_choice: Any, proof_choice: Any,
                    extra: dict[str, Any]) -> None:
    """Finishing a step: only the genuine id with the genuine proof (a signature over
    the nonce, or the activation secret) passes; anything else is refused and records
    nothing (the genuine id is used up: one try)."""
    count("provisioning API finishes with mutated proofs")
    if flow == "witnessed":
        token, proof = api.witnessed("fz-w")
        path, id_field, proof_field = "/v1/enroll/witnessed/finish", "enrollment_id", "signature"
    elif flow == "renew":
        challenge = api.service.renew_challenge({"serial": SERIAL})
        token = challenge["renewal_id"]
        proof = pop_signature(api.device, LABEL_RENEW, base64.b64decode(challenge["nonce"]),
                              SERIAL)
        path, id_field, proof_field = "/v1/renew", "renewal_id", "signature"
    else:  # the activation step's state as tpm/evidence leaves it
        proof = os.urandom(32)
        token = api.service._put("tpm-activation", {
            "serial": "fz-t", "kind": "device", "reenroll": True, "operator": "fz",
            "device_class": "default", "nonce": b64(bytes(32)), "secret": b64(proof),
            "key": b64(api.spki), "ek_fingerprint": "00" * 32})
        path, id_field, proof_field = "/v1/enroll/tpm/finish", "enrollment_id", "secret"
    body = {**extra, id_field: resolve(token_choice, token.encode(), text=True),
            proof_field: resolve(proof_choice, proof)}
    before = api.snapshot()
    resp = api.call("POST", path, json.dumps(body).encode())
    data = answered(api, resp, where=body)
    clean = is_text(body)  # else refused before anything is looked up
    right_id = clean and body[id_field] == token
    if flow == "tpm-finish":
        right_proof = body[proof_field] == b64(proof)
    else:
        right_proof = same_signature(body[proof_field], proof)
    assert (resp.status_code == 200) == (right_id and right_proof), (data, body)
    if resp.status_code != 200:
        after = api.snapshot()
        if right_id:  # the id is gone whatever happened (one try), nothing else changed
            before["pending"] = [row for row in before["pending"] if row[0] != token]
        assert after == before, data
    api.forget(token)


@given(st.one_of(field_values, st.sampled_from(["key compromise", "", "x" * 200, "y" * 201,
                                                "a\x00b", "\ud800", "\U0001f600"])))
@budget(0.3)
def test_api_revoke_reasons(api: Api, reason: Any) -> None:
    count("provisioning API revocation reasons")
    before = api.snapshot()
    resp = api.call("POST", f"/v1/devices/{SERIAL}/revoke", json.dumps({"reason": reason}).encode())
    answered(api, resp, where=reason)
    text = isinstance(reason, str) and len(reason) <= 200 and is_text(reason)
    assert (resp.status_code == 200) == text, (resp.text, reason)
    restore(api, before, resp, "/revoke")


query_values = st.one_of(nasty, any_text, st.integers().map(str),
                         st.sampled_from(["0", "-1", str(2**63), str(-(2**63) - 1),
                                          str(2**63 - 1), "1" * 400, "nan", "-inf", "1e999"]))


def url_quote(text: str) -> str:
    """Percent-encoding of any str, lone surrogates included (as their UTF-8-like
    bytes, which a server must refuse or replace)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


@given(st.dictionaries(st.sampled_from(["since", "wait", "other"]), query_values, max_size=3),
       st.one_of(st.sampled_from(["active", "revoked", "", "\x00"]), any_text),
       st.one_of(st.sampled_from([SERIAL, "nobody", "a" * 65]), any_text),
       st.sampled_from(["", "%00", "%ED%A0%80", "%FF", "%", "%%", "%2F"]))
@budget(0.3)
def test_api_queries(api: Api, params: dict[str, str], status: str, serial: str,
                     escape: str) -> None:
    """The revocation feed's since/wait, the device list's status and a device's serial
    in its path: 2xx or 4xx JSON, never 5xx, never a long poll that does not end."""
    count("provisioning API queries")
    try:  # a positive wait is a long poll of up to 60 s: not what this is about
        if float(params.get("wait", "0")) > 0:
            params["wait"] = "0"
    except ValueError:
        pass
    query = "&".join(f"{url_quote(k)}={url_quote(v)}" for k, v in params.items())
    answered(api, api.call("GET", f"/v1/revocations?{query}"), where=params)
    answered(api, api.call("GET", f"/v1/devices?status={url_quote(status)}"), where=status)
    resp = api.call("GET", f"/v1/devices/{url_quote(serial)}{escape}")
    if serial + escape and "/" not in serial + escape.replace("%2F", "/"):
        answered(api, resp, where=serial)
    else:  # not this route: Starlette's own 404, 405 or a redirect of a trailing slash
        assert resp.status_code in (307, 404, 405), resp.text


POST_BODY_PATHS = [p for p in POST_PATHS if "nobody" not in p]


def test_api_deeply_nested_body_is_a_400(api: Api) -> None:
    """Found by the fuzzer: a JSON body nested a few thousand deep (well under the 64 kB
    limit) made json.loads raise RecursionError: 500 Internal Server Error."""
    for body in (b"[" * 30_000,
                 b'{"a":' * 10_000 + b"1" + b"}" * 10_000):
        for path in POST_BODY_PATHS:
            before = api.snapshot()
            resp = api.call("POST", path, body)
            data = answered(api, resp, where=path)
            assert resp.status_code == 400 and data["error"] == "malformed", data
            assert data["detail"] == "request body is nested too deep", data
            assert api.snapshot() == before


@pytest.fixture
def api_on(registry_url: str, tmp_path: Path) -> Iterator[Api]:
    """The API on a fresh registry, once on SQLite and once on PostgreSQL."""
    yield from _api(tmp_path, TpmMakerRoots([_dummy_maker_root()]),
                    open_registry(registry_url))


def test_api_nul_and_lone_surrogates_are_400(api_on: Api) -> None:
    """Found by the fuzzer: a lone surrogate ("\\ud800" in JSON) in an enrollment id, a
    renewal id or a revocation reason reached the registry, whose driver cannot encode
    it (UnicodeEncodeError: 500); NUL reached it too, which PostgreSQL refuses in text
    (RegistryError: 503), as it did for a NUL in a device's serial in the path or in the
    device list's status. Each is a 400 now, and nothing is recorded."""
    api = api_on
    token, _ = api.witnessed("fz-w")
    cases = [
        ("/v1/enroll/tpm/evidence", {"enrollment_id": "\ud800" * 12, "evidence": {}}),
        ("/v1/enroll/tpm/finish", {"enrollment_id": "x\x00" * 6, "secret": "AA=="}),
        ("/v1/enroll/witnessed/finish", {"enrollment_id": token + "\udfff", "signature": "AA=="}),
        ("/v1/enroll/witnessed/finish", {"enrollment_id": "\x00" * 20, "signature": "AA=="}),
        ("/v1/renew", {"renewal_id": "\ud83d" * 10, "signature": "AA=="}),
        (f"/v1/devices/{SERIAL}/revoke", {"reason": "\ud800"}),
        (f"/v1/devices/{SERIAL}/revoke", {"reason": "stolen\x00"}),
        ("/v1/enroll/tpm/start", {"serial": "fz-new", "\x00": 1}),
    ]
    for path, fields in cases:
        before = api.snapshot()
        resp = api.call("POST", path, json.dumps(fields).encode())
        data = answered(api, resp, where=fields)
        assert resp.status_code == 400 and data["error"] == "malformed", (path, data)
        assert data["detail"].startswith("request body holds a string with "), data
        assert api.snapshot() == before, path
    for path in ("/v1/devices/%00", "/v1/devices/%ED%A0%80", "/v1/devices?status=%00",
                 "/v1/devices?status=%ED%A0%80"):
        resp = api.call("GET", path)
        data = answered(api, resp, where=path)
        # NUL is not text (400); a lone surrogate's bytes decode to U+FFFD, which is text
        # that breaks the serial's or the status's schema (422)
        assert resp.status_code in (400, 422), (path, data)
    # the genuine enrollment id was never looked at, so it still works
    assert api.snapshot()["pending"]
    assert [r.serial for r in api.registry.list()] == [SERIAL]


def test_api_revocation_feed_since_and_wait_out_of_range_are_400(api: Api) -> None:
    """Found by the fuzzer: ?since=2**63 overflowed the registry's 64-bit integer
    (OverflowError: 500) and ?wait=nan made the long poll's deadline NaN, so it never
    ended (one registry query a second, forever)."""
    for params in ({"since": str(2**63)}, {"since": str(-(2**63) - 1)}, {"since": "1" * 400},
                   {"wait": "nan"}, {"wait": "NaN"}, {"since": "0", "wait": "-nan"}):
        query = "&".join(f"{k}={v}" for k, v in params.items())
        resp = api.call("GET", f"/v1/revocations?{query}")
        data = answered(api, resp, where=params)
        assert resp.status_code == 422 and data["error"] == "malformed", (params, data)
    for params in ({"since": str(2**63 - 1)}, {"since": "-1", "wait": "0"}):
        query = "&".join(f"{k}={v}" for k, v in params.items())
        resp = api.call("GET", f"/v1/revocations?{query}")
        assert resp.status_code == 200 and "events" in answered(api, resp)


def test_reenroll_must_be_a_json_boolean(api: Api) -> None:
    """``reenroll`` was read with bool(), so "false" (or "no", 1, [0]) meant re-enroll:
    replace an enrolled device and revoke its credentials. Only JSON true or false is
    accepted now; anything else is refused before a nonce is drawn."""
    for path in ("/v1/enroll/tpm/start", "/v1/enroll/witnessed/start"):
        values: list[Any] = ["false", "true", "no", 1, 0, None, [0], {}, "", 0.0]
        for value in values:
            before = api.snapshot()
            fields = {"serial": SERIAL, "reenroll": value}
            if path.startswith("/v1/enroll/witnessed"):  # (an unknown field is refused)
                fields.update(public_key=b64(api.spki), key_backend="insecure-software")
            resp = api.call("POST", path, json.dumps(fields).encode())
            data = answered(api, resp, where=value)
            assert resp.status_code == 422, (path, value, data)  # the schema's refusal
            assert data == {"error": "malformed", "code": 100,
                            "detail": "field 'reenroll' must be true or false"}
            assert api.snapshot() == before
        fields["reenroll"] = False
        resp = api.call("POST", path, json.dumps(fields).encode())
        assert resp.status_code == 409 and answered(api, resp)["error"] == "already_enrolled"
        fields["reenroll"] = True
        assert api.call("POST", path, json.dumps(fields).encode()).status_code == 200


# -- with swtpm: TPM evidence and activation, the device's enrollment endpoint ----------

NONCE = bytes(range(32))  # the qualifying data the genuine evidence answers


@dataclass
class Hardware:
    """A device TPM (swtpm), the provisioning API trusting its maker, genuine evidence
    for NONCE, a genuine activation challenge with its secret, credentials issued to
    this TPM's key, and the device's enrollment endpoint on 127.0.0.1."""

    api: Api
    tpm: LocalTpm
    evidence: dict[str, Any]
    challenge: dict[str, Any]
    secret: bytes
    issued: dict[str, Any]
    endpoint: EnrollmentEndpoint
    stored: list[dict[str, Any]]
    tracebacks: list[str]

    def reset_endpoint(self) -> None:
        """Forget an enrollment the endpoint accepted, so the next example is served."""
        self.endpoint.enrolled.clear()
        self.endpoint.issued = None
        self.stored.clear()


DEVICE_SERIAL = "fz-tpm"


@pytest.fixture(scope="module")
def hardware(swtpm_session: Swtpm, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Hardware]:
    base = tmp_path_factory.mktemp("hardware")
    roots = TpmMakerRoots.from_pem_files(swtpm_session.manufacturer_ca_paths)
    with TpmBackend(swtpm_session.tcti, base / "keys") as backend:
        tpm = LocalTpm(backend)
        apis = _api(base, roots, open_registry(":memory:"))
        api = next(apis)
        evidence = tpm.evidence(NONCE).to_json()
        verified = verify_evidence(TpmEvidence.from_json(evidence), roots,
                                   expected_qualifying_data=NONCE, now=dt.datetime.now(dt.UTC))
        challenge, secret = make_challenge(verified)
        # credentials for this TPM's key, through the three steps
        start = api.service.tpm_start({"serial": DEVICE_SERIAL}, operator="fz")
        step2 = api.service.tpm_evidence({
            "enrollment_id": start["enrollment_id"],
            "evidence": tpm.evidence(base64.b64decode(start["nonce"])).to_json()})
        answer = tpm.activate(ActivationChallenge.from_json(step2["challenge"]))
        issued = api.service.tpm_finish({"enrollment_id": step2["enrollment_id"],
                                         "secret": b64(answer)}).to_json()
        stored: list[dict[str, Any]] = []
        endpoint = EnrollmentEndpoint(tpm, DEVICE_SERIAL, stored.append).start()
        tracebacks: list[str] = []

        def record(request: Any, client_address: Any) -> None:
            tracebacks.append(traceback.format_exc())

        # socketserver prints an exception that escaped a handler to stderr and drops the
        # connection: record it instead
        endpoint._server.handle_error = record  # type: ignore[method-assign]
        try:
            yield Hardware(api, tpm, evidence, challenge.to_json(), secret, issued, endpoint,
                           stored, tracebacks)
        finally:
            endpoint.close()
            apis.close()


#: a field of a genuine JSON object: as it is, its bytes changed, a wild value, or absent
field_choice = st.one_of(st.just(("GENUINE", [])), st.just(("GENUINE", [])),
                         byte_ops.map(lambda edits: ("GENUINE", edits)),
                         field_values, st.just(("ABSENT",)))


def mutated_object(genuine: dict[str, Any], choices: dict[str, Any],
                   extra: dict[str, Any], *, text: bool = False) -> dict[str, Any]:
    """``genuine`` with each field replaced as ``choices`` says; base64 fields are
    mutated as bytes, text fields (``text``) as their UTF-8."""
    out: dict[str, Any] = dict(extra)
    for key, value in genuine.items():
        choice = choices.get(key, ("GENUINE", []))
        if choice == ("ABSENT",):
            continue
        if isinstance(choice, tuple) and choice[:1] == ("GENUINE",):
            if not choice[1]:
                out[key] = value
            elif isinstance(value, list):  # ek_intermediates: mutate each
                out[key] = [b64(mutate(base64.b64decode(v), choice[1])) for v in value]
            elif text:
                out[key] = mutate(value.encode(), choice[1]).decode("utf-8", "replace")
            else:
                out[key] = b64(mutate(base64.b64decode(value), choice[1]))
        else:
            out[key] = choice
    return out


evidence_choices = st.fixed_dictionaries({k: field_choice for k in EVIDENCE_FIELDS})
extra_fields = st.one_of(st.just({}), st.just({}), st.dictionaries(any_text, field_values,
                                                                   max_size=2))


@given(evidence_choices, extra_fields)
@budget(0.1)
def test_tpm_evidence_mutated(hardware: Hardware, choices: dict[str, Any],
                              extra: dict[str, Any]) -> None:
    """TPM evidence with fields changed, missing, wild or added: refused with a 4xx
    (nothing recorded but the used-up id), unless what the TPM signed is genuine.

    The evidence step cannot tell everything: the EK and AK public areas are bound to
    the TPM only through their keys (the EK certificate, the Certify signature), so an
    area with the same key and other attributes or policy passes (the long run found an
    AK area with a reserved attribute bit set). The AK's area is bound at activation:
    the challenge is sealed to the AK's name, so the device's TPM must refuse it."""
    count("provisioning tpm/evidence mutated genuine evidence")
    api = hardware.api
    token = api.service._put("tpm-evidence", {
        "serial": "fz-e", "kind": "device", "reenroll": True, "operator": "fz",
        "device_class": "default", "nonce": b64(NONCE)})
    evidence = mutated_object(hardware.evidence, choices, extra)
    before = api.snapshot()
    resp = api.call("POST", "/v1/enroll/tpm/evidence",
                    json.dumps({"enrollment_id": token, "evidence": evidence}).encode())
    data = answered(api, resp, where=evidence)
    full = {"ek_intermediates": [], **evidence}  # [] is the default
    if full == hardware.evidence:
        assert resp.status_code == 200, data
    if resp.status_code == 200:
        genuine = hardware.evidence
        for key in ("ek_certificate", "certify_attest", "key_public", "ek_intermediates"):
            assert full[key] == genuine[key], (key, choices)
        assert same_signature(full["certify_signature"],
                              base64.b64decode(genuine["certify_signature"])), choices
        for key in ("ek_public", "ak_public"):
            assert public_key(full[key]) == public_key(genuine[key]), (key, choices)
        if full["ak_public"] != genuine["ak_public"]:  # sealed to a name this TPM lacks
            challenge = ActivationChallenge.from_json(data["challenge"])
            err = refused(lambda: hardware.tpm.activate(challenge))
            assert err is not None and err.reason is Reason.ACTIVATION_FAILED, (err, choices)
    after = api.snapshot()
    if is_text(evidence):  # else refused before the id was looked up
        before["pending"] = [row for row in before["pending"] if row[0] != token]
    if resp.status_code == 200:
        assert set(data) == {"enrollment_id", "challenge"}
        after["pending"] = [row for row in after["pending"] if row[0] != data["enrollment_id"]]
        api.forget(data["enrollment_id"])
    assert after == before
    api.forget(token)


def public_key(public_b64: str) -> bytes:
    """The key of a marshalled TPM2B_PUBLIC (base64), as DER SubjectPublicKeyInfo."""
    area = TPM2B_PUBLIC.unmarshal(base64.b64decode(public_b64))[0].publicArea
    return _area_key(area).public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)


def endpoint_call(hardware: Hardware, request: bytes, *, may_drop: bool = False
                  ) -> tuple[int, dict[str, Any]]:
    """Send raw bytes to the enrollment endpoint, close our side, read the first answer:
    (status, JSON object). An answer that is not JSON, or none at all, fails, unless
    ``may_drop`` (a refusal that leaves the body unread closes the connection, and the
    kernel may then reset it before our side has read the answer): then (0, {})."""
    host, port = hardware.endpoint._server.server_address[:2]
    hardware.tracebacks.clear()
    received = b""
    with socket.create_connection((str(host), int(port)), timeout=10) as conn:
        try:
            conn.sendall(request)
            conn.shutdown(socket.SHUT_WR)
            while chunk := conn.recv(65536):
                received += chunk
        except OSError as exc:  # reset, broken pipe, not connected; a timeout is a hang
            if not may_drop or isinstance(exc, TimeoutError):
                raise
    assert not hardware.tracebacks, hardware.tracebacks[-1]
    if not received and may_drop:
        return 0, {}
    head, sep, rest = received.partition(b"\r\n\r\n")
    assert sep, received[:200]
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    body = rest[: int(headers["Content-Length"])]
    data = json.loads(body)
    assert isinstance(data, dict)
    if status != 200:
        assert status in (400, 401, 404), (status, data)
        assert set(data) == {"error", "code", "detail"}, data
        if status != 404:
            assert data["error"] == Reason(data["code"]).name.lower(), data
    return status, data


def endpoint_post(hardware: Hardware, path: str, body: bytes, *, code: bool = True,
                  length: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    if code:
        headers.append(f"Authorization: Bearer {hardware.endpoint.code}")
    headers.append(f"Content-Length: {len(body) if length is None else length}")
    return endpoint_call(hardware, ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1")
                         + body)


@given(st.fixed_dictionaries({k: field_choice for k in ("credential_blob", "encrypted_secret")}),
       extra_fields)
@budget(0.1)
def test_device_endpoint_activation_mutated(hardware: Hardware, choices: dict[str, Any],
                                            extra: dict[str, Any]) -> None:
    """The device's TPM answers only the genuine challenge (with the genuine secret);
    a changed one is a 400 JSON error, whatever the TPM made of it."""
    count("device endpoint /v1/activate mutated challenge")
    challenge = mutated_object(hardware.challenge, choices, extra)
    status, data = endpoint_post(hardware, "/v1/activate",
                                 json.dumps({"challenge": challenge}).encode())
    assert (status == 200) == (challenge == hardware.challenge), (data, choices)
    if status == 200:
        assert base64.b64decode(data["secret"]) == hardware.secret


ISSUED_TEXT = ["serial", "identity", "attestation", "operational_credential",
               "operational_not_after", "bundle", "enrollment_credential"]


def ders(pem: Any) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER)
            for c in x509.load_pem_x509_certificates(pem.encode())]


@given(st.fixed_dictionaries({k: field_choice for k in ISSUED_TEXT}), extra_fields)
@budget(0.1)
def test_device_endpoint_credentials_mutated(hardware: Hardware, choices: dict[str, Any],
                                             extra: dict[str, Any]) -> None:
    """Issued credentials changed, missing or wild: refused (nothing stored) unless the
    certificates, the bundle and the identity are still the genuine ones."""
    count("device endpoint /v1/credentials mutated credentials")
    issued = mutated_object(hardware.issued, choices, extra, text=True)
    try:
        status, data = endpoint_post(hardware, "/v1/credentials",
                                     json.dumps(issued).encode())
        if status == 200:  # (compared as JSON: a NaN in an ignored field is not == itself)
            assert json.dumps(hardware.stored) == json.dumps([issued])
            for key in ("operational_credential", "bundle"):
                assert ders(issued[key])[:1] == ders(hardware.issued[key])[:1], key
            assert issued["identity"] == hardware.issued["identity"]
        else:
            assert hardware.stored == [] and not hardware.endpoint.enrolled.is_set(), data
        if issued == hardware.issued:
            assert status == 200, data
    finally:
        hardware.reset_endpoint()


ENDPOINT_PATHS = ["/v1/device", "/v1/evidence", "/v1/activate", "/v1/credentials",
                  "/v1/nothing", "/", "/v1/evidence?x=1", "//v1/evidence", "/v1/evidence/"]


@given(st.sampled_from(["GET", "POST"]), st.sampled_from(ENDPOINT_PATHS),
       st.one_of(api_bodies,
                 st.fixed_dictionaries({}, optional={"nonce": st.one_of(
                     st.binary(max_size=80).map(b64), field_values)}).map(
                     lambda d: json.dumps(d).encode())),
       st.one_of(st.none(), st.sampled_from(["abc", "-1", "1e3", " 12", "0x10",
                                             "\u0661\u0662", "99999999999", "", "+5",
                                             "65537", "0"])),
       st.booleans())
@budget(0.1)
def test_device_endpoint_raw_requests(hardware: Hardware, method: str, path: str, body: bytes,
                                      length: str | None, code: bool) -> None:
    """Raw requests to the device's endpoint (its real TPM behind it): a JSON answer
    with 200, 400, 401 or 404, never a dropped connection or a traceback."""
    count("device endpoint raw requests")
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if code:
        lines.append(f"Authorization: Bearer {hardware.endpoint.code}")
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
    try:
        refused_unread = not code or length is not None  # the body may stay unread
        status, data = endpoint_call(hardware, request, may_drop=refused_unread)
        if not code:
            assert status in (0, 401), data
        if status == 200:  # http.server collapses leading slashes ("//v1/x" is "/v1/x")
            path = "/" + path.lstrip("/")
            assert path in ("/v1/device", "/v1/evidence", "/v1/activate", "/v1/credentials")
    finally:
        hardware.reset_endpoint()


def test_device_endpoint_bad_length_and_deep_nesting_are_400(hardware: Hardware) -> None:
    """Found by the fuzzer: a Content-Length that is not a number (ValueError) and a body
    nested a few thousand deep (RecursionError) escaped the handler: socketserver printed
    a traceback and dropped the connection without an answer. Both are 400 JSON errors;
    nothing reaches the TPM or the store."""
    for length in ("abc", "1e3", "0x10", "-1", "99999999999"):
        status, data = endpoint_post(hardware, "/v1/evidence", b'{"nonce": "AAAA"}',
                                     length=length)
        assert status == 400 and data["error"] == "malformed", (length, data)
        assert "Content-Length" in data["detail"]
    for body in (b"[" * 60_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000):
        for path in ("/v1/evidence", "/v1/activate", "/v1/credentials"):
            status, data = endpoint_post(hardware, path, body)
            assert status == 400 and data == {
                "error": "malformed", "code": 100,
                "detail": "request body must be a JSON object"}, (path, data)
    assert hardware.stored == [] and not hardware.endpoint.enrolled.is_set()


def test_ak_area_changed_but_same_key_is_refused_at_activation(hardware: Hardware) -> None:
    """Found by the long run: the AK's public area with a reserved attribute bit set
    (the same key, so the Certify signature still verifies) passes the evidence step.
    That step cannot know better; what stops it is activation: the challenge is sealed
    to the name of the AK the evidence claims, which the device's TPM does not hold."""
    api = hardware.api
    ak = bytearray(base64.b64decode(hardware.evidence["ak_public"]))
    ak[6] |= 0x01  # objectAttributes bit 24: reserved
    evidence = {**hardware.evidence, "ak_public": b64(bytes(ak))}
    token = api.service._put("tpm-evidence", {
        "serial": "fz-ak", "kind": "device", "reenroll": True, "operator": "fz",
        "device_class": "default", "nonce": b64(NONCE)})
    resp = api.call("POST", "/v1/enroll/tpm/evidence",
                    json.dumps({"enrollment_id": token, "evidence": evidence}).encode())
    data = answered(api, resp)
    assert resp.status_code == 200, data
    challenge = ActivationChallenge.from_json(data["challenge"])
    err = refused(lambda: hardware.tpm.activate(challenge))
    assert err is not None and err.reason is Reason.ACTIVATION_FAILED, err
    # the service refuses whatever the device could answer instead, and records nothing
    before = api.snapshot()
    resp = api.call("POST", "/v1/enroll/tpm/finish", json.dumps(
        {"enrollment_id": data["enrollment_id"], "secret": b64(bytes(32))}).encode())
    assert resp.status_code == 400 and answered(api, resp)["error"] == "activation_failed"
    after = api.snapshot()
    before["pending"] = [t for t in before["pending"] if t[0] != data["enrollment_id"]]
    assert after == before and "fz-ak" not in [r.serial for r in api.registry.list()]
