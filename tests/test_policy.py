"""The broker's topic policy: templates, MQTT matching rules, file errors, reload, digest."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_plugin.policy import (
    Decision,
    Policy,
    PolicyHolder,
    Rules,
    StepUp,
    load_policy,
    parse_policy,
)
from structauth.credentials import Identity
from structauth.errors import ConfigurationError, Reason

EXAMPLE = """\
version = 1

[classes.default]               # a device's class comes from its registry record / credential
publish   = ["devices/{id}/telemetry/#", "devices/{id}/events/+"]
subscribe = ["devices/{id}/commands/#", "fleet/announcements"]

[classes.gateway]
inherits  = "default"
publish   = ["sites/{id}/+/telemetry/#"]

[classes.default.step_up]       # topics whose publish demands fresh hardware proof
publish   = ["devices/{id}/firmware/#"]
quote     = true                # ... with a TPM quote

[brokers]                       # identities of kind "broker" (bridges, the broker itself)
publish   = ["#"]
subscribe = ["#"]
"""

TD = "fleet.example"
PI = Identity.parse(f"spiffe://{TD}/device/pi-1")
BRIDGE = Identity.parse(f"spiffe://{TD}/broker/bridge-1")


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(EXAMPLE, "example.toml")


def device(name: str) -> Identity:
    return Identity.parse(f"spiffe://{TD}/device/{name}")


def rules(publish: str = "", subscribe: str = "", extra: str = "") -> Policy:
    """A one-class policy ("c") from template lists written as TOML arrays."""
    return parse_policy(
        f"version = 1\n[classes.c]\npublish = [{publish}]\nsubscribe = [{subscribe}]\n{extra}"
    )


# -- publish ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device_class", "topic"),
    [
        ("default", "devices/pi-1/telemetry/temp"),
        ("default", "devices/pi-1/telemetry/a/b/c"),
        ("default", "devices/pi-1/telemetry"),  # '#' matches the parent level
        ("default", "devices/pi-1/telemetry/"),
        ("default", "devices/pi-1/events/boot"),
        ("default", "devices/pi-1/events/"),  # '+' matches an empty level
        ("gateway", "devices/pi-1/telemetry/temp"),  # inherited
        ("gateway", "sites/pi-1/hall/telemetry/t1"),
        ("gateway", "sites/pi-1//telemetry"),
    ],
)
def test_publish_allowed(policy: Policy, device_class: str, topic: str) -> None:
    decision = policy.may_publish(PI, device_class, topic)
    assert decision.allowed, decision.reason
    assert decision
    assert f"classes.{device_class}" in decision.reason


@pytest.mark.parametrize(
    ("device_class", "topic"),
    [
        ("default", "devices/pi-2/telemetry/temp"),  # someone else's
        ("default", "devices/pi-1/events/boot/extra"),  # '+' is one level
        ("default", "devices/pi-1/events"),  # '+' needs its level
        ("default", "devices/pi-1"),
        ("default", "devices//telemetry/x"),
        ("default", "devices/pi-1/commands/reboot"),  # subscribe only
        ("default", "fleet/announcements"),
        ("default", "sites/pi-1/hall/telemetry/t1"),  # only the gateway class
        ("default", "/devices/pi-1/telemetry/x"),
        ("default", "Devices/pi-1/telemetry/x"),  # case-sensitive
        ("default", "devices/pi-1/telemetry/+"),  # wildcards are not topics
        ("default", "devices/pi-1/telemetry/#"),
        ("default", "devices/pi-1/telemetry/a\0b"),
        ("default", ""),
        ("gateway", "sites/pi-2/hall/telemetry/t1"),
    ],
)
def test_publish_denied(policy: Policy, device_class: str, topic: str) -> None:
    decision = policy.may_publish(PI, device_class, topic)
    assert not decision.allowed
    assert not decision
    assert decision.reason


# -- subscribe ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic_filter",
    [
        "devices/pi-1/commands/#",
        "devices/pi-1/commands",  # inside 'commands/#' (parent level)
        "devices/pi-1/commands/+",
        "devices/pi-1/commands/+/+/#",
        "devices/pi-1/commands/reboot",  # a concrete topic: delivery of one message
        "devices/pi-1/commands//x",
        "fleet/announcements",
        "$share/workers/devices/pi-1/commands/#",
    ],
)
def test_subscribe_allowed(policy: Policy, topic_filter: str) -> None:
    decision = policy.may_subscribe(PI, "default", topic_filter)
    assert decision.allowed, decision.reason


@pytest.mark.parametrize(
    "topic_filter",
    [
        "devices/+/commands/#",  # other devices' commands
        "devices/pi-2/commands/#",
        "#",
        "+/pi-1/commands/#",
        "devices/pi-1/#",  # wider than commands/#
        "devices/pi-1/+",
        "devices/pi-1/+/reboot",
        "devices//commands/#",
        "fleet/+",
        "fleet/#",
        "fleet/announcements/#",  # also matches fleet/announcements/x
        "fleet/announcements/+",
        "fleet",
        "$SYS/#",
        # not valid filters at all
        "",
        "devices/pi-1/commands/#/x",
        "devices/pi-1/commands/a#",
        "devices/pi-1/commands+/x",
        "devices/pi-1/comm\0ands",
        "$share/g",
        "$share//devices/pi-1/commands/#",
        "$share/g/",
        "$share/g+/devices/pi-1/commands/#",
        "$share/workers/devices/+/commands/#",
    ],
)
def test_subscribe_denied(policy: Policy, topic_filter: str) -> None:
    decision = policy.may_subscribe(PI, "default", topic_filter)
    assert not decision.allowed
    assert decision.reason


@pytest.mark.parametrize(
    ("template", "topic_filter", "allowed"),
    [
        ("a/+", "a/+", True),
        ("a/+", "a/b", True),
        ("a/+", "a/", True),
        ("a/+", "a/#", False),  # a/# matches a and a/b/c
        ("a/+", "a", False),
        ("a/#", "a", True),
        ("a/#", "a/+/#", True),
        ("a/#", "a/#", True),
        ("a/#", "#", False),
        ("a/+/#", "a/#", False),  # a/# matches a, which a/+/# does not
        ("a/+/#", "a/+", True),
        ("a/+/#", "a/b", True),
        ("+/b", "+/b", True),
        ("+/b", "x/b", True),
        ("+/b", "$x/b", False),  # $-topics escape a leading wildcard
        ("#", "#", True),
        ("+/#", "#", True),  # '#' alone has no parent level: every topic has a first level
        ("+/#", "+", True),
        ("+/+/#", "#", False),
        ("#", "+/x/#", True),
        ("#", "$SYS/#", False),
        ("#", "$SYS", False),
        ("$SYS/#", "$SYS/#", True),
        ("$SYS/#", "$SYS/broker/+", True),
        ("a/+", "a/$x", True),  # the $ rule is for the first level only
        ("a//b", "a//b", True),
        ("a//b", "a/+/b", False),
        ("a/+/b", "a//b", True),
        ("/", "/", True),
        ("/+", "/", True),
        ("+", "/", False),
    ],
)
def test_subset_rules(template: str, topic_filter: str, allowed: bool) -> None:
    p = Policy({}, Rules(subscribe=(template,)))
    assert p.may_subscribe(BRIDGE, "", topic_filter).allowed is allowed


@pytest.mark.parametrize(
    ("template", "topic", "allowed"),
    [
        ("#", "$SYS/broker/load", False),
        ("+/broker/load", "$SYS/broker/load", False),
        ("$SYS/#", "$SYS/broker/load", True),
        ("$SYS/broker/+", "$SYS/broker/load", True),
        ("#", "a", True),
        ("#", "/", True),
        ("+", "/", False),
        ("+/+", "/", True),
        ("a/#", "a", True),
        ("a/#", "ab", False),
        ("a/+/c", "a//c", True),
    ],
)
def test_publish_mqtt_rules(template: str, topic: str, allowed: bool) -> None:
    p = Policy({}, Rules(publish=(template,)))
    assert p.may_publish(BRIDGE, "", topic).allowed is allowed


# -- identities ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        f"spiffe://{TD}/device/+",
        f"spiffe://{TD}/device/#",
        f"spiffe://{TD}/device/",
        f"spiffe://{TD}/device/$SYS",
        f"spiffe://{TD}/device/pi\0",
        f"spiffe://{TD}/device/pi-1/commands",  # a name with '/'
        f"spiffe://{TD}/device/pi-2/../pi-1",
        f"spiffe://{TD}/device",
        "spiffe://a+b/device/pi-1",  # {td} is a placeholder too
        f"spiffe://{TD}/workload/pi-1",
        f"http://{TD}/device/pi-1",
        "spiffe:/x/device/pi-1/y",
        "pi-1",
    ],
)
def test_forged_identities_get_nothing(uri: str) -> None:
    """Identity.parse refuses these; the policy must hold even if one slips through."""
    p = parse_policy(
        'version = 1\n[classes.default]\npublish = ["devices/{id}/#", "{td}/{id}/#", "fleet/x"]\n'
        'subscribe = ["devices/{id}/#", "{td}/#"]\n'
    )
    forged = Identity(uri)
    for topic in ["devices/+/x", "devices/pi-1/x", "devices/x", "fleet/x", "a+b/pi-1/x"]:
        assert not p.may_publish(forged, "default", topic).allowed
    for topic_filter in ["devices/+/#", "devices/#", "#", "devices/pi-1/commands"]:
        assert not p.may_subscribe(forged, "default", topic_filter).allowed
    assert p.step_up_for(forged, "default", "devices/pi-1/x") is None


def test_injection_reason_names_the_value() -> None:
    p = parse_policy(EXAMPLE)
    decision = p.may_subscribe(Identity(f"spiffe://{TD}/device/+"), "default", "devices/+/commands")
    assert not decision.allowed
    assert "'+' cannot be used in a topic" in decision.reason


def test_placeholders_inside_a_level_and_class() -> None:
    p = parse_policy(
        'version = 1\n[classes.meter]\npublish = ["t/{td}/{class}/dev-{id}/+"]\n'
        '[brokers]\npublish = ["bridges/{id}@{td}/#"]\n'
    )
    assert p.may_publish(PI, "meter", f"t/{TD}/meter/dev-pi-1/x").allowed
    assert not p.may_publish(PI, "meter", f"t/{TD}/meter/dev-pi-2/x").allowed
    assert not p.may_publish(PI, "meter", f"t/{TD}/other/dev-pi-1/x").allowed
    assert p.may_publish(BRIDGE, "", f"bridges/bridge-1@{TD}/a").allowed
    assert not p.may_publish(BRIDGE, "", f"bridges/bridge-2@{TD}/a").allowed


def test_placeholder_text_in_a_name_is_not_expanded() -> None:
    p = parse_policy('version = 1\n[classes.c]\npublish = ["d/{id}/x"]\n')
    odd = Identity(f"spiffe://{TD}/device/{{td}}")
    assert p.may_publish(odd, "c", "d/{td}/x").allowed
    assert not p.may_publish(odd, "c", f"d/{TD}/x").allowed


def test_unknown_class_is_denied_and_named(policy: Policy) -> None:
    decision = policy.may_publish(PI, "sensor", "devices/pi-1/telemetry/t")
    assert not decision.allowed
    assert "unknown device class 'sensor'" in decision.reason
    assert "default, gateway" in decision.reason
    assert not policy.may_subscribe(PI, "sensor", "fleet/announcements").allowed
    assert not policy.may_publish(PI, "default/x", "devices/pi-1/telemetry/t").allowed
    assert policy.step_up_for(PI, "sensor", "devices/pi-1/firmware/x") is None


def test_other_kinds_are_denied() -> None:
    p = parse_policy(EXAMPLE)
    decision = p.may_publish(Identity(f"spiffe://{TD}/operator/alice"), "default", "x")
    assert not decision.allowed
    assert "kind 'operator'" in decision.reason


def test_brokers(policy: Policy) -> None:
    assert policy.may_publish(BRIDGE, "default", "devices/pi-1/commands/reboot").allowed
    assert policy.may_subscribe(BRIDGE, "default", "#").allowed
    assert policy.may_subscribe(BRIDGE, "", "devices/+/telemetry/#").allowed
    assert not policy.may_subscribe(BRIDGE, "", "$SYS/#").allowed  # '#' does not reach $
    assert policy.step_up_for(BRIDGE, "default", "devices/bridge-1/firmware/x") is None
    # a device never gets the brokers' rights, whatever class it claims
    assert not policy.may_subscribe(PI, "brokers", "#").allowed
    assert not policy.may_subscribe(PI, "default", "#").allowed


def test_no_brokers_table_means_brokers_get_nothing() -> None:
    p = rules('"a/#"', '"a/#"')
    assert not p.may_publish(BRIDGE, "c", "a/b").allowed
    assert not p.may_subscribe(BRIDGE, "c", "a/#").allowed
    assert p.may_publish(PI, "c", "a/b").allowed


def test_empty_policy_denies_everything() -> None:
    p = parse_policy("version = 1")
    assert not p.may_publish(PI, "default", "a").allowed
    assert not p.may_publish(BRIDGE, "default", "a").allowed
    assert p.classes == {}


# -- inheritance and step-up --------------------------------------------------------


def test_inheritance(policy: Policy) -> None:
    gateway = policy.classes["gateway"]
    assert set(gateway.publish) == {
        "sites/{id}/+/telemetry/#",
        "devices/{id}/telemetry/#",
        "devices/{id}/events/+",
    }
    assert gateway.subscribe == policy.classes["default"].subscribe
    assert gateway.step_up == (StepUp("devices/{id}/firmware/#", True),)
    assert "sites/{id}/+/telemetry/#" not in policy.classes["default"].publish


def test_inheritance_chain() -> None:
    p = parse_policy(
        'version = 1\n[classes.a]\npublish = ["a/{id}"]\n'
        '[classes.b]\ninherits = "a"\npublish = ["b/{id}"]\n'
        '[classes.c]\ninherits = "b"\nsubscribe = ["c/{id}"]\n'
    )
    for topic in ["a/pi-1", "b/pi-1"]:
        assert p.may_publish(PI, "c", topic).allowed
    assert not p.may_publish(PI, "a", "b/pi-1").allowed
    assert p.may_subscribe(PI, "c", "c/pi-1").allowed
    assert not p.may_subscribe(PI, "b", "c/pi-1").allowed


def test_step_up(policy: Policy) -> None:
    for device_class in ("default", "gateway"):
        step = policy.step_up_for(PI, device_class, "devices/pi-1/firmware/v2/chunk/0")
        assert step == StepUp("devices/{id}/firmware/#", quote=True)
        assert policy.step_up_for(PI, device_class, "devices/pi-1/firmware") is not None
        assert policy.step_up_for(PI, device_class, "devices/pi-1/telemetry/t") is None
        assert policy.step_up_for(PI, device_class, "devices/pi-2/firmware/x") is None
    # step-up grants nothing: the example does not allow publishing firmware at all
    assert not policy.may_publish(PI, "default", "devices/pi-1/firmware/x").allowed


def test_step_up_array_of_tables_and_quote_wins() -> None:
    p = rules(
        '"d/{id}/#"',
        extra=(
            '[[classes.c.step_up]]\npublish = ["d/{id}/config/#", "d/{id}/fw/meta"]\n'
            '[[classes.c.step_up]]\npublish = ["d/{id}/fw/#"]\nquote = true\n'
        ),
    )
    config = p.step_up_for(PI, "c", "d/pi-1/config/x")
    assert config is not None and not config.quote
    meta = p.step_up_for(PI, "c", "d/pi-1/fw/meta")  # matches both: the quote wins
    assert meta == StepUp("d/{id}/fw/#", quote=True)
    assert p.step_up_for(PI, "c", "d/pi-1/data") is None
    assert p.may_publish(PI, "c", "d/pi-1/fw/meta").allowed


# -- malformed files ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version = 1\n[classes.a]\npublish = [\n", "TOML syntax error"),
        ("version = 1\n\n[classes.a]\npublish = ]\n", "line 4"),
        ("version = 1\n[classes.a]\n[classes.a]\n", "line 3"),
        ("[classes.a]\npublish = []\n", "missing version; add 'version = 1'"),
        ("version = 2\n", "version 2 is not supported"),
        ('version = "1"\n', "version must be an integer, not string"),
        ("version = true\n", "version must be an integer, not boolean"),
        ("version = 1\nclasess = {}\n", "top level: unknown key 'clasess'"),
        ('version = 1\n[classes.a]\npublsh = ["x"]\n', "classes.a: unknown key 'publsh'"),
        ('version = 1\n[classes.a]\npublish = ["a/#/b"]\n', "classes.a.publish[0]"),
        ('version = 1\n[classes.a]\npublish = ["a/#/b"]\n', "'a/#/b'"),
        ('version = 1\n[classes.a]\npublish = ["a/#/b"]\n', "'#' must be a whole level"),
        ('version = 1\n[classes.a]\npublish = ["x", "a#"]\n', "classes.a.publish[1]"),
        ('version = 1\n[classes.a]\nsubscribe = ["a+/b"]\n', "classes.a.subscribe[0]"),
        ('version = 1\n[classes.a]\nsubscribe = ["a+/b"]\n', "'+' must be a whole level"),
        ('version = 1\n[classes.a]\npublish = ["d/{foo}/x"]\n', "unknown placeholder {foo}"),
        ('version = 1\n[classes.a]\npublish = ["d/{foo}/x"]\n', "use {id}, {class}, {td}"),
        ('version = 1\n[classes.a]\npublish = ["d/{ID}"]\n', "unknown placeholder {ID}"),
        ('version = 1\n[classes.a]\npublish = ["d/{id/x"]\n', "stray brace"),
        ('version = 1\n[classes.a]\npublish = ["d/id}"]\n', "stray brace"),
        ('version = 1\n[classes.a]\npublish = [""]\n', "classes.a.publish[0]: empty template"),
        ('version = 1\n[classes.a]\npublish = ["a\\u0000b"]\n', "contains NUL"),
        ('version = 1\n[classes.a]\npublish = "a/b"\n', "classes.a.publish must be an array"),
        ("version = 1\n[classes.a]\npublish = [1]\n", "classes.a.publish[0] must be a string"),
        ('version = 1\n[classes.a]\ninherits = "b"\n', "unknown class 'b'"),
        ('version = 1\n[classes.a]\ninherits = "b"\n', "classes.a.inherits"),
        ('version = 1\n[classes.a]\ninherits = "a"\n', "cycle a -> a"),
        (
            'version = 1\n[classes.a]\ninherits = "b"\n[classes.b]\ninherits = "a"\n',
            "cycle a -> b -> a",
        ),
        ('version = 1\n[classes.a]\ninherits = ["b"]\n', "inherits must be a class name"),
        ('version = 1\nclasses = "default"\n', "classes must be a table"),
        ("version = 1\n[classes]\ndefault = 1\n", "classes.default must be a table"),
        ('version = 1\n[classes."a b"]\n', "bad class name"),
        ('version = 1\n[classes."a/b"]\n', "bad class name"),
        ("version = 1\n[classes.a.step_up]\nquote = true\n", "classes.a.step_up: missing"),
        (
            'version = 1\n[classes.a.step_up]\npublish = ["x"]\nquote = "yes"\n',
            "classes.a.step_up.quote must be true or false",
        ),
        (
            'version = 1\n[classes.a.step_up]\npublish = ["x"]\nquota = true\n',
            "classes.a.step_up: unknown key 'quota'",
        ),
        (
            'version = 1\n[[classes.a.step_up]]\npublish = ["x"]\n'
            '[[classes.a.step_up]]\npublish = ["a/#/b"]\n',
            "classes.a.step_up[1].publish[0]",
        ),
        ('version = 1\n[classes.a]\nstep_up = ["x"]\n', "classes.a.step_up[0] must be a table"),
        ('version = 1\n[brokers]\npublish = ["b/{class}"]\n', "brokers.publish[0]"),
        ('version = 1\n[brokers]\npublish = ["b/{class}"]\n', "use {id}, {td}"),
        ('version = 1\n[brokers.step_up]\npublish = ["x"]\n', "brokers: unknown key 'step_up'"),
        ("version = 1\nbrokers = 3\n", "brokers must be a table"),
    ],
)
def test_malformed_files(text: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_policy(text, "bad.toml")
    message = str(info.value)
    assert "\n" not in message
    assert info.value.detail.startswith("bad.toml: ")
    assert expected in message, message
    assert info.value.reason is Reason.BAD_CONFIGURATION


def test_bad_template_given_directly() -> None:
    with pytest.raises(ConfigurationError, match=r"brokers\.publish: bad template 'a/#/b'"):
        Policy({}, Rules(publish=("a/#/b",)))


def test_load_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE)
    assert load_policy(path).digest == parse_policy(EXAMPLE).digest
    with pytest.raises(ConfigurationError, match=r"missing.toml: cannot read the policy file"):
        load_policy(tmp_path / "missing.toml")
    path.write_bytes(b"version = 1\n# caf\xe9\n")
    with pytest.raises(ConfigurationError, match=r"policy.toml: line 2 is not UTF-8"):
        load_policy(path)
    path.write_text('version = 1\n[classes.a]\npublish = ["a/#/b"]\n')
    with pytest.raises(ConfigurationError, match=r"policy.toml: classes.a.publish\[0\]"):
        load_policy(path)


# -- reload ---------------------------------------------------------------------------


def test_reload_swaps_or_keeps_the_old_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE)
    holder = PolicyHolder(path)
    first = holder.current
    assert first.may_publish(PI, "default", "devices/pi-1/telemetry/t").allowed

    path.write_text(EXAMPLE + "# only a comment\n")
    assert holder.reload() is False  # same digest: the old object (and its cache) stays
    assert holder.current is first

    path.write_text(EXAMPLE.replace("telemetry/#", "metrics/#"))
    assert holder.reload(path) is True
    second = holder.current
    assert not second.may_publish(PI, "default", "devices/pi-1/telemetry/t").allowed
    assert second.may_publish(PI, "default", "devices/pi-1/metrics/t").allowed

    for broken in ("version = 1\n[classes.a]\npublish = [\n", "version = 1\nfoo = 1\n", ""):
        path.write_text(broken)
        with pytest.raises(ConfigurationError, match=r"policy.toml: "):
            holder.reload()
        assert holder.current is second
    path.unlink()
    with pytest.raises(ConfigurationError, match="cannot read"):
        holder.reload()
    assert holder.current is second


def test_holder_from_a_policy() -> None:
    policy = parse_policy(EXAMPLE)
    holder = PolicyHolder(policy)
    assert holder.current is policy
    with pytest.raises(ConfigurationError, match="no policy file to reload"):
        holder.reload()


def test_holder_refuses_a_bad_first_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("version = 3\n")
    with pytest.raises(ConfigurationError, match="version 3 is not supported"):
        PolicyHolder(path)


# -- digest ---------------------------------------------------------------------------

SAME_AS_EXAMPLE = """\
# the example, reformatted: order, comments, inline tables, duplicates, inheritance spelled out
version = 1

[brokers]
subscribe = [ "#" ]
publish = ["#", "#"]

[classes]
gateway = { publish = [
    "devices/{id}/events/+",
    "sites/{id}/+/telemetry/#",
    "devices/{id}/telemetry/#",
], subscribe = ["fleet/announcements", "devices/{id}/commands/#"], step_up = [
    { publish = ["devices/{id}/firmware/#"], quote = true },
] }

[classes.default]
subscribe = ['fleet/announcements', 'devices/{id}/commands/#']
publish = ['devices/{id}/events/+', 'devices/{id}/telemetry/#']
step_up.publish = ["devices/{id}/firmware/#"]
step_up.quote = true
"""


def test_digest_ignores_formatting() -> None:
    digest = parse_policy(EXAMPLE).digest
    assert len(digest) == 32
    assert parse_policy(SAME_AS_EXAMPLE).digest == digest
    assert parse_policy("\n".join(EXAMPLE.splitlines()) + "\n\n# end\n").digest == digest


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("quote     = true", "quote     = false"),
        ('"fleet/announcements"', '"fleet/announcements/#"'),
        ('"devices/{id}/events/+"', '"devices/{id}/events/#"'),
        ("[classes.gateway]", "[classes.gateway2]"),
        ('inherits  = "default"\n', ""),
        ('publish   = ["#"]\nsubscribe', 'publish   = ["devices/#"]\nsubscribe'),
        ('publish   = ["sites/{id}/+/telemetry/#"]', 'publish   = ["sites/{td}/+/telemetry/#"]'),
    ],
)
def test_digest_changes_with_meaning(old: str, new: str) -> None:
    assert old in EXAMPLE
    changed = parse_policy(EXAMPLE.replace(old, new, 1))
    assert changed.digest != parse_policy(EXAMPLE).digest


# -- decisions and the cache --------------------------------------------------------


def test_decision_is_truthy_only_when_allowed() -> None:
    assert Decision(True, "x")
    assert not Decision(False, "x")


def test_cache_is_bounded_and_stays_correct() -> None:
    p = parse_policy(EXAMPLE, cache_size=4)
    for _ in range(3):
        for n in range(20):
            name = f"pi-{n}"
            assert p.may_publish(device(name), "default", f"devices/{name}/telemetry/t")
            assert not p.may_publish(device(name), "default", f"devices/pi-{n + 1}/telemetry/t")
        assert p._grant.cache_info().currsize <= 4  # type: ignore[attr-defined]


# -- properties -----------------------------------------------------------------------

LEVELS = ["a", "b", "", "$s"]
UNIVERSE_LEVELS = [*LEVELS, "z"]  # "z" appears in no template: a level only '+' reaches


def _universe(depth: int) -> list[str]:
    topics: list[str] = []
    layer = [[level] for level in UNIVERSE_LEVELS]
    for _ in range(depth):
        topics.extend("/".join(t) for t in layer)
        layer = [[*t, level] for t in layer for level in UNIVERSE_LEVELS]
    return topics


UNIVERSE = _universe(4)


def reference_match(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7, written as a regular expression (independently of
    the policy's own matcher)."""
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    parts = topic_filter.split("/")
    if parts[-1] == "#":
        head = "/".join("[^/]*" if p == "+" else re.escape(p) for p in parts[:-1])
        pattern = f"{head}(/.*)?" if len(parts) > 1 else ".*"
    else:
        pattern = "/".join("[^/]*" if p == "+" else re.escape(p) for p in parts)
    return re.fullmatch(pattern, topic, re.DOTALL) is not None


@st.composite
def filters(draw: st.DrawFn, max_levels: int = 3) -> str:
    levels = draw(st.lists(st.sampled_from([*LEVELS, "+"]), min_size=0, max_size=max_levels))
    if not levels or draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "#"


@settings(max_examples=300, deadline=None)
@given(template=filters(), topic_filter=filters())
def test_subset_check_is_exact(template: str, topic_filter: str) -> None:
    """may_subscribe(F) under one template T is allowed exactly when every topic F
    matches is matched by T, and may_publish(t) exactly when T matches t, checked by
    brute force over every topic of up to 4 levels (deep enough for 3-level filters)."""
    p = Policy({}, Rules(publish=(template,), subscribe=(template,)))
    matched = [t for t in UNIVERSE if reference_match(topic_filter, t)]
    expected = all(reference_match(template, t) for t in matched)
    assert p.may_subscribe(BRIDGE, "", topic_filter).allowed is expected
    for topic in UNIVERSE[::7]:
        assert p.may_publish(BRIDGE, "", topic).allowed is reference_match(template, topic)


Draw = Callable[[st.SearchStrategy[Any]], Any]


def _narrow(draw: Draw, template: str) -> str:
    """A filter inside ``template`` most of the time, or a random one."""
    if draw(st.booleans()):
        return str(draw(filters(4)))
    out: list[str] = []
    for level in template.split("/"):
        if level == "+":
            out.append(draw(st.sampled_from(["+", "a", "", "z"])))
        elif level == "#":
            out.extend(draw(st.lists(st.sampled_from(["+", "a", "z"]), max_size=2)))
            if draw(st.booleans()):
                out.append("#")
        else:
            out.append(level)
    return "/".join(out) or "a"


PICK = ["a", "b", "", "x", "pi-1", "$s"]
FIRST = [p for p in PICK if not p.startswith("$")]  # a leading wildcard never matches $


def _concrete(draw: Draw, topic_filter: str) -> str:
    """A random topic ``topic_filter`` matches."""
    out: list[str] = []
    for level in topic_filter.split("/"):
        if level == "+":
            out.append(draw(st.sampled_from(PICK if out else FIRST)))
        elif level == "#":
            for _ in range(draw(st.integers(0, 3))):
                out.append(draw(st.sampled_from(PICK if out else FIRST)))
        else:
            out.append(level)
    return "/".join(out)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), templates=st.lists(filters(3), min_size=1, max_size=3))
def test_allowed_subscription_only_sees_allowed_topics(
    data: st.DataObject, templates: list[str]
) -> None:
    """If a device may subscribe to F, it may publish (same templates) every topic F matches."""
    with_id = [t.replace("b", "{id}") for t in templates]
    p = Policy({"c": Rules(publish=tuple(with_id), subscribe=tuple(with_id))})
    topic_filter = _narrow(data.draw, data.draw(st.sampled_from(with_id)).replace("{id}", "pi-1"))
    if not p.may_subscribe(PI, "c", topic_filter).allowed:
        return
    for _ in range(10):
        topic = _concrete(data.draw, topic_filter)
        if not topic:
            continue  # '#' or '+' given nothing: an empty topic is no topic
        assert reference_match(topic_filter, topic)
        assert p.may_publish(PI, "c", topic).allowed, (topic_filter, topic)


# -- retain, Wills (every path into the broker: docs/MQTT.md) ------------------------------

WILLS = """\
version = 1

[classes.default]
publish   = ["devices/{id}/telemetry/#", "devices/{id}/state", "devices/{id}/will"]
subscribe = ["devices/{id}/commands/#"]
retain    = ["devices/{id}/state", "devices/{id}/will"]
will      = ["devices/{id}/will"]

[classes.roamer]
inherits   = "default"
will_delay = true

[classes.plain]
publish   = ["devices/{id}/telemetry/#"]

[brokers]
publish   = ["#"]
subscribe = ["#"]
retain    = ["fleet/#"]
"""


def test_no_wills_and_no_retained_messages_unless_the_policy_says(policy: Policy) -> None:
    for topic in ("devices/pi-1/telemetry/t", "devices/pi-1/events/x"):
        assert policy.may_publish(PI, "default", topic)
        assert not policy.may_will(PI, "default", topic)
        assert not policy.may_retain(PI, "default", topic)
    assert not policy.may_retain(BRIDGE, "default", "fleet/x")


def test_a_will_topic_carries_wills_only() -> None:
    p = parse_policy(WILLS)
    will = "devices/pi-1/will"
    assert p.may_will(PI, "default", will)
    assert p.may_will(PI, "default", will, retain=True)  # retain lists it
    denied = p.may_publish(PI, "default", will)  # an ordinary PUBLISH: never there
    assert not denied and "will topic" in denied.reason
    assert p.may_publish(PI, "default", "devices/pi-1/state")  # proven, retained
    assert p.may_retain(PI, "default", "devices/pi-1/state")
    assert not p.may_retain(PI, "default", "devices/pi-1/telemetry/t")


@pytest.mark.parametrize(
    ("device_class", "topic", "kw", "why"),
    [
        ("default", "devices/pi-2/will", {}, "no publish template"),  # another device's
        ("default", "devices/pi-1/state", {}, "not a will topic"),  # publishable, not a will
        ("default", "devices/pi-1/telemetry/t", {}, "not a will topic"),
        ("default", "devices/pi-1/will", {"delayed": True}, "will_delay"),
        ("plain", "devices/pi-1/telemetry/t", {}, "not a will topic"),  # default: no Wills
        ("default", "devices/pi-1/+", {}, "without wildcards"),
        ("default", "$SYS/broker/x", {}, "no publish template"),
        ("nope", "devices/pi-1/will", {}, "unknown device class"),
    ],
)
def test_wills_refused(device_class: str, topic: str, kw: dict[str, bool], why: str) -> None:
    decision = parse_policy(WILLS).may_will(PI, device_class, topic, **kw)
    assert not decision and why in decision.reason, decision.reason


def test_retained_wills_need_retain_and_delayed_wills_need_will_delay() -> None:
    p = parse_policy(WILLS.replace('retain    = ["devices/{id}/state", "devices/{id}/will"]',
                                   'retain    = ["devices/{id}/state"]'))
    assert p.may_will(PI, "default", "devices/pi-1/will")
    refused = p.may_will(PI, "default", "devices/pi-1/will", retain=True)
    assert not refused and "retain" in refused.reason
    p = parse_policy(WILLS)
    assert p.may_will(PI, "roamer", "devices/pi-1/will", delayed=True)  # inherited, plus
    assert not p.may_will(BRIDGE, "x", "fleet/x")  # brokers: no will templates
    assert p.may_retain(BRIDGE, "x", "fleet/a/b")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('will = ["devices/{id}/other"]', "classes.c.will: 'devices/{id}/other' is not inside"),
        ('retain = ["#"]', "classes.c.retain: '#' is not inside any publish template"),
        ('will = ["devices/+/will"]', "is not inside any publish template"),
        ("will_delay = 1", "classes.c.will_delay must be true or false, not integer"),
        ('will = "devices/{id}/will"', "classes.c.will must be an array of strings"),
    ],
)
def test_retain_and_will_templates_only_narrow_publish(extra: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        rules('"devices/{id}/will", "devices/{id}/t/#"', extra=extra)
    assert message in str(err.value)


def test_retain_and_will_keep_old_digests_and_change_the_digest_when_used() -> None:
    base = parse_policy(EXAMPLE).digest
    with_empty = EXAMPLE.replace("[classes.gateway]",
                                 "retain = []\nwill = []\nwill_delay = false\n[classes.gateway]")
    assert parse_policy(with_empty).digest == base
    for extra in ('retain = ["devices/{id}/events/+"]', 'will = ["devices/{id}/events/+"]',
                  "will_delay = true"):
        changed = EXAMPLE.replace("[classes.gateway]", f"{extra}\n[classes.gateway]")
        assert parse_policy(changed).digest != base, extra
