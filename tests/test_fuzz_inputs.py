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

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from structauth.credentials import Identity
from structauth.errors import ConfigurationError, Reason, TesseraError

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


byte_positions = st.one_of(st.integers(0, 96), st.integers(-140, -1), st.integers(0, 1 << 16))
byte_ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), byte_positions, st.integers(0, 255)),
        st.tuples(st.just("xor"), byte_positions, st.integers(1, 255)),
        st.tuples(st.just("insert"), byte_positions, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), byte_positions, st.integers(1, 8)),
        st.tuples(st.just("cut"), byte_positions, st.just(0)),
        st.tuples(st.just("extend"), st.just(0), st.binary(min_size=1, max_size=8)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, Any]]) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in edits:
        at = pos % (len(b) + 1)
        if kind == "set" and b:
            b[at % len(b)] = arg
        elif kind == "xor" and b:
            b[at % len(b)] ^= arg
        elif kind == "insert":
            b[at:at] = arg
        elif kind == "delete":
            del b[at : at + arg]
        elif kind == "cut":
            del b[at:]
        elif kind == "extend":
            b += arg
    return bytes(b)


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
