"""The broker's authorization policy: MQTT topic templates per device class, deny by default.

A policy is one TOML file::

    version = 1

    [classes.default]               # a device's class comes from its registry record
    publish   = ["devices/{id}/telemetry/#", "devices/{id}/events/+"]
    subscribe = ["devices/{id}/commands/#", "fleet/announcements"]

    retain    = ["devices/{id}/state"]  # retained PUBLISHes (and Wills) kept here only
    will      = ["devices/{id}/will"]   # the only topics a Will may be published on
    will_delay = false              # may a Will be sent after its connection ended

    [classes.default.step_up]       # publishing here demands fresh hardware proof
    publish   = ["devices/{id}/firmware/#"]
    quote     = true                # ... with a TPM quote (default false)

    [classes.gateway]
    inherits  = "default"           # everything of "default", plus:
    publish   = ["sites/{id}/+/telemetry/#"]

    [classes.default.coap]          # CoAP (broker_plugin.coap.site): method -> path templates
    GET       = ["sensors/{id}/#", "fleet/config"]
    POST      = ["sensors/{id}/readings"]

    [brokers]                       # identities of kind "broker" (bridges, the broker itself)
    publish   = ["#"]
    subscribe = ["#"]

Rules:

* ``version`` is required and must be 1. Every key is optional except ``step_up.publish``;
  an unknown key is an error, not ignored.
* ``retain`` and ``will`` narrow the ``publish`` grant (each of their templates must lie
  inside a ``publish`` template of the same class, checked when the policy loads):
  ``retain`` lists the topics where the retain flag of a PUBLISH or a Will is honoured
  (a retained PUBLISH elsewhere is refused before its proof is checked; default:
  nowhere); ``will`` lists the device's *will topics* (default: none, so no Wills at
  all). A will topic carries Wills only: an ordinary PUBLISH to it is refused, so a
  subscriber knows from the topic alone whether a message passed its per-message proof
  (every other topic) or is a Will (unproven: the payload the device put in its CONNECT,
  published by the broker for a connection that completed key confirmation).
  ``will_delay = true`` lets a Will through that Mosquitto sends after the connection
  ended (MQTT 5 Will Delay Interval, or a session ending later); default false, because
  the broker can no longer tell then whether the device was revoked meanwhile
  (docs/MQTT.md, "Every path into the broker").
* Class names are letters, digits, ``.``, ``_`` and ``-``. ``inherits`` names one other
  class; the child gets the union of its own and all its ancestors' templates (step-up
  rules included: a child can add permissions and step-ups, never remove them).
* ``step_up`` is a table, or an array of tables (``[[classes.x.step_up]]``) when some
  topics need a quote and others only a fresh handshake. It grants nothing: the topic
  must also be allowed by ``publish``. If several step-up templates match, a quote wins.
* Templates are MQTT topic filters: ``+`` is one whole level, ``#`` the whole last level
  and matches the parent level too (``a/#`` matches ``a``); a filter starting with a
  wildcard does not match topics starting with ``$``. Placeholders, anywhere inside a
  level: ``{id}`` the identity's name (the serial), ``{class}`` the device class, ``{td}``
  the trust domain (``{class}`` is not available in ``[brokers]``). A value that is empty,
  starts with ``$`` or contains ``/``, ``+``, ``#`` or NUL can never be put in a topic: an
  identity carrying one is denied everything.
* Devices (``spiffe://<td>/device/<name>``) get their class's templates, brokers
  (``.../broker/<name>``) get ``[brokers]``; any other identity, an unknown class or a
  missing ``[brokers]`` means deny.

CoAP (``[classes.X.coap]``, also ``[brokers.coap]``): keys are request methods (``GET``,
``POST``, ``PUT``, ``DELETE``, ``FETCH``, ``PATCH``, ``iPATCH``), values arrays of the
same templates, matched against the request's full Uri-Path with each path segment as
one level (a segment that itself contains ``/`` stays one level; the root path ``/`` is
one empty level, matched only by ``+`` or ``#``). A method with no key is denied.
Inheritance unites them per method like the other lists. A policy without any ``coap``
table has the same digest as before the table existed.

Checks: a PUBLISH topic (no wildcards) is allowed if some ``publish`` template matches
it and no ``will`` template does. A subscription filter is allowed only if every topic
it can match is matched by one ``subscribe`` template (``devices/pi-1/commands/#`` is
inside ``devices/{id}/commands/#`` for pi-1; ``devices/+/commands/#`` and ``#`` are not).
``$share/<group>/<filter>`` is judged by ``<filter>``, and a filter starting with a
wildcard never covers ``$SYS/...`` or ``$CONTROL/...``: those need a template of their
own. A concrete topic given to :meth:`Policy.may_subscribe` (delivery of one message) is
checked the same way.

:attr:`Policy.digest` is SHA-256 over a canonical form of the effective rules: it ignores
formatting, comments, order, duplicates and how inheritance spelled them, and changes
whenever the effective templates of any class or of brokers change. Expanded templates
are cached per (identity, class) in a bounded LRU, so a check costs a split and a few
tuple comparisons.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from structauth.credentials import Identity
from structauth.errors import ConfigurationError

VERSION = 1
CLASS_PLACEHOLDERS = ("id", "class", "td")
#: CoAP request methods a ``coap`` table may name (RFC 7252, RFC 8132)
COAP_METHODS = ("GET", "POST", "PUT", "DELETE", "FETCH", "PATCH", "iPATCH")
BROKER_PLACEHOLDERS = ("id", "td")

_CLASS_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_DIGEST_PREFIX = b"tessera.policy.v1\0"

Levels = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one check; truthy only when allowed."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class StepUp:
    """A publish that demands fresh hardware proof (and a TPM quote if ``quote``)."""

    template: str
    quote: bool


@dataclass(frozen=True)
class Rules:
    """The effective templates of a device class (inheritance resolved) or of brokers."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    step_up: tuple[StepUp, ...] = ()
    #: CoAP grants as (method, path template) pairs
    coap: tuple[tuple[str, str], ...] = ()
    #: topics where a retained PUBLISH or Will is kept
    retain: tuple[str, ...] = ()
    #: will topics (Wills only, never an ordinary PUBLISH)
    will: tuple[str, ...] = ()
    #: a Will may be sent after its connection ended (Will Delay Interval)
    will_delay: bool = False

    def canonical(self) -> dict[str, Any]:
        quotes: dict[str, bool] = {}
        for rule in self.step_up:
            quotes[rule.template] = quotes.get(rule.template, False) or rule.quote
        canonical: dict[str, Any] = {
            "publish": sorted(set(self.publish)),
            "subscribe": sorted(set(self.subscribe)),
            "step_up": sorted(quotes.items()),
        }
        if self.coap:  # absent when empty, so MQTT-only policies keep their digest
            methods: dict[str, set[str]] = {}
            for method, template in self.coap:
                methods.setdefault(method, set()).add(template)
            canonical["coap"] = {m: sorted(t) for m, t in sorted(methods.items())}
        # absent when unused, so policies written before these keys keep their digest
        if self.retain:
            canonical["retain"] = sorted(set(self.retain))
        if self.will:
            canonical["will"] = sorted(set(self.will))
        if self.will_delay:
            canonical["will_delay"] = True
        return canonical


# -- matching -------------------------------------------------------------------------


def _level_problem(level: str, last: bool) -> str | None:
    if "#" in level and (level != "#" or not last):
        return "'#' must be a whole level and the last one, as in 'a/#'"
    if "+" in level and level != "+":
        return "'+' must be a whole level, as in 'a/+/b'"
    return None


def _covers(template: Levels, topic_filter: Sequence[str]) -> bool:
    """True if every topic ``topic_filter`` matches is matched by ``template``; for a
    filter without wildcards, simply whether the template matches that topic."""
    if topic_filter[0][:1] == "$" and template[0] in ("+", "#"):
        return False
    if topic_filter[0] == "#":  # no parent level to match here: '#' alone is '+/#'
        topic_filter = ("+", "#")
    n = len(template)
    for i, level in enumerate(topic_filter):
        if i == n:
            return False
        t = template[i]
        if t == "#":
            return True
        if t != level and (t != "+" or level == "#"):
            return False
    return len(topic_filter) == n or (len(topic_filter) + 1 == n and template[-1] == "#")


def _filter_levels(topic_filter: str) -> list[str] | None:
    """The levels of a valid subscription filter (``$share/<group>/`` removed), or None."""
    if not topic_filter or "\0" in topic_filter:
        return None
    levels = topic_filter.split("/")
    if levels[0] == "$share":
        group = levels[1] if len(levels) > 1 else ""
        if not group or "+" in group or "#" in group or levels[2:] in ([], [""]):
            return None
        levels = levels[2:]
    last = len(levels) - 1
    if any(_level_problem(level, i == last) for i, level in enumerate(levels)):
        return None
    return levels


# -- compiled form --------------------------------------------------------------------


def _template_levels(text: str, where: str, placeholders: Sequence[str]) -> Levels:
    """Validate one template; ConfigurationError naming ``where`` and the fix if bad."""
    if not text:
        raise ConfigurationError(f"{where}: empty template; remove it or write a topic")
    if "\0" in text:
        raise ConfigurationError(f"{where}: template {text!r} contains NUL; remove it")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigurationError(
                f"{where}: template {text!r} holds a lone surrogate, which is not text; "
                "write the character itself"
            ) from None
    levels = tuple(text.split("/"))
    for i, level in enumerate(levels):
        problem = _level_problem(level, i == len(levels) - 1)
        if problem:
            raise ConfigurationError(f"{where}: bad template {text!r}: {problem}")
        for name in _PLACEHOLDER.findall(level):
            if name not in placeholders:
                allowed = ", ".join(f"{{{p}}}" for p in placeholders)
                raise ConfigurationError(
                    f"{where}: unknown placeholder {{{name}}} in {text!r}; use {allowed}"
                )
        if "{" in _PLACEHOLDER.sub("", level) or "}" in _PLACEHOLDER.sub("", level):
            raise ConfigurationError(
                f"{where}: stray brace in template {text!r}; placeholders look like {{id}}"
            )
    return levels


@dataclass(frozen=True, slots=True)
class _Grant:
    """Templates of one class (or of brokers) as levels; placeholders filled in once
    per (identity, class). Allow decisions are built once and shared."""

    publish: tuple[tuple[Levels, Decision], ...]
    subscribe: tuple[tuple[Levels, Decision], ...]
    step_up: tuple[tuple[Levels, StepUp], ...]
    no_publish: Decision
    no_subscribe: Decision
    coap: dict[str, tuple[tuple[Levels, Decision], ...]] = field(default_factory=dict)
    no_coap: Decision = Decision(False, "no CoAP template matches")
    retain: tuple[tuple[Levels, Decision], ...] = ()
    will: tuple[tuple[Levels, Decision], ...] = ()
    will_delay: bool = False
    label: str = ""

    @classmethod
    def compile(cls, label: str, rules: Rules, placeholders: Sequence[str]) -> _Grant:
        def levels(text: str, key: str) -> Levels:
            return _template_levels(text, f"{label}.{key}", placeholders)

        def allow(action: str, text: str) -> Decision:
            return Decision(True, f"{label}: {action} allowed by {text!r}")

        steps = sorted(rules.step_up, key=lambda s: not s.quote)  # a quote wins
        publish = tuple(levels(t, "publish") for t in rules.publish)
        for key, narrowing in (("retain", rules.retain), ("will", rules.will)):
            for t in narrowing:
                inner = levels(t, key)
                if not any(_covers(outer, inner) for outer in publish):
                    raise ConfigurationError(
                        f"{label}.{key}: {t!r} is not inside any publish template of "
                        f"{label}; add it to publish too (a {key} template only narrows "
                        "what the class may publish)"
                    )
        coap: dict[str, list[tuple[Levels, Decision]]] = {}
        for method, t in rules.coap:
            coap.setdefault(method, []).append(
                (levels(t, f"coap.{method}"), allow(f"CoAP {method}", t))
            )
        return cls(
            tuple((levels(t, "publish"), allow("publish", t)) for t in rules.publish),
            tuple((levels(t, "subscribe"), allow("subscribe", t)) for t in rules.subscribe),
            tuple((levels(s.template, "step_up"), s) for s in steps),
            Decision(False, f"{label}: no publish template matches"),
            Decision(False, f"{label}: no subscribe template covers the filter"),
            {m: tuple(grants) for m, grants in coap.items()},
            Decision(False, f"{label}: no CoAP template matches the method and path"),
            tuple((levels(t, "retain"), allow("retain", t)) for t in rules.retain),
            tuple((levels(t, "will"), allow("a Will", t)) for t in rules.will),
            rules.will_delay,
            label,
        )

    def fill(self, values: Mapping[str, str]) -> _Grant:
        def expand(levels: Levels) -> Levels:
            return tuple(lv.format_map(values) if "{" in lv else lv for lv in levels)

        return _Grant(
            tuple((expand(lv), d) for lv, d in self.publish),
            tuple((expand(lv), d) for lv, d in self.subscribe),
            tuple((expand(lv), s) for lv, s in self.step_up),
            self.no_publish,
            self.no_subscribe,
            {m: tuple((expand(lv), d) for lv, d in g) for m, g in self.coap.items()},
            self.no_coap,
            tuple((expand(lv), d) for lv, d in self.retain),
            tuple((expand(lv), d) for lv, d in self.will),
            self.will_delay,
            self.label,
        )


def _unsafe(value: str) -> bool:
    return (
        not value
        or value[0] == "$"
        or "/" in value
        or "+" in value
        or "#" in value
        or "\0" in value
    )


def _grant_for(
    classes: Mapping[str, _Grant], brokers: _Grant, uri: str, device_class: str
) -> _Grant | Decision:
    parts = uri.split("/")
    if len(parts) != 5 or parts[0] != "spiffe:" or parts[1]:
        return Decision(False, f"{uri!r} is not a spiffe://<trust-domain>/<kind>/<name> ID")
    trust_domain, kind, name = parts[2:]
    if kind == "device":
        grant = classes.get(device_class)
        if grant is None:
            known = ", ".join(sorted(classes)) or "none"
            return Decision(
                False, f"unknown device class {device_class!r} (policy classes: {known})"
            )
    elif kind == "broker":
        grant = brokers
    else:
        return Decision(False, f"identity kind {kind!r} has no permissions")
    for value in (name, trust_domain):
        if _unsafe(value):
            return Decision(False, f"{uri!r}: {value!r} cannot be used in a topic")
    return grant.fill({"id": name, "td": trust_domain, "class": device_class})


_WILDCARD_TOPIC = Decision(False, "a PUBLISH topic must be non-empty, without wildcards or NUL")
_BAD_FILTER = Decision(False, "not a valid MQTT topic filter")
_BAD_PATH = Decision(False, "a CoAP path segment contains NUL")


# -- the policy -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Policy:
    """Effective rules per device class, compiled. Build with :func:`load_policy` or
    :func:`parse_policy`; constructing one directly validates templates too."""

    classes: Mapping[str, Rules]
    brokers: Rules = Rules()
    cache_size: int = 16384
    digest: bytes = field(init=False)
    _grant: Callable[[str, str], _Grant | Decision] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        classes = MappingProxyType(dict(self.classes))
        for name in classes:
            if not isinstance(name, str) or not _CLASS_NAME.fullmatch(name):
                raise ConfigurationError(
                    f"classes.{name!r}: bad class name; use 1-64 letters, digits, '.', '_', '-'"
                )
        compiled = {
            name: _Grant.compile(f"classes.{name}", rules, CLASS_PLACEHOLDERS)
            for name, rules in classes.items()
        }
        brokers = _Grant.compile("brokers", self.brokers, BROKER_PLACEHOLDERS)
        canonical = {
            "version": VERSION,
            "classes": {name: rules.canonical() for name, rules in classes.items()},
            "brokers": self.brokers.canonical(),
        }
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        grant = functools.lru_cache(maxsize=self.cache_size)(
            functools.partial(_grant_for, compiled, brokers)
        )
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "digest", hashlib.sha256(_DIGEST_PREFIX + blob.encode()).digest())
        object.__setattr__(self, "_grant", grant)

    def may_publish(self, identity: Identity, device_class: str, topic: str) -> Decision:
        """May ``identity`` of ``device_class`` publish to the concrete ``topic``?"""
        grant = self._grant(identity.uri, device_class)
        if isinstance(grant, Decision):
            return grant
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            return _WILDCARD_TOPIC
        levels = topic.split("/")
        for template, decision in grant.publish:
            if _covers(template, levels):
                for will, _ in grant.will:
                    if _covers(will, levels):
                        return Decision(False, f"{grant.label}: {topic!r} is a will topic "
                                        "(only Wills are published there)")
                return decision
        return grant.no_publish

    def may_retain(self, identity: Identity, device_class: str, topic: str) -> Decision:
        """May a retained PUBLISH (or a retained Will) of ``identity`` on the concrete
        ``topic`` be kept? Says nothing about the publish itself."""
        grant = self._grant(identity.uri, device_class)
        if isinstance(grant, Decision):
            return grant
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            return _WILDCARD_TOPIC
        levels = topic.split("/")
        for template, decision in grant.retain:
            if _covers(template, levels):
                return decision
        return Decision(False, f"{grant.label}: no retain template matches {topic!r} "
                        "(a retained message is kept only where the policy says)")

    def may_will(self, identity: Identity, device_class: str, topic: str, *,
                 retain: bool = False, delayed: bool = False) -> Decision:
        """May the broker publish a Will of ``identity`` on ``topic``: inside its publish
        grant, on one of its will topics, retained only where ``retain`` allows, and
        after the connection ended (``delayed``) only with ``will_delay``?"""
        grant = self._grant(identity.uri, device_class)
        if isinstance(grant, Decision):
            return grant
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            return _WILDCARD_TOPIC
        levels = topic.split("/")
        if not any(_covers(t, levels) for t, _ in grant.publish):
            return grant.no_publish
        allowed = next((d for t, d in grant.will if _covers(t, levels)), None)
        if allowed is None:
            return Decision(False, f"{grant.label}: {topic!r} is not a will topic "
                            "(no will template matches)")
        if retain:
            kept = self.may_retain(identity, device_class, topic)
            if not kept:
                return kept
        if delayed and not grant.will_delay:
            return Decision(False, f"{grant.label}: a Will sent after its connection ended "
                            "needs will_delay = true")
        return allowed

    def may_subscribe(self, identity: Identity, device_class: str, topic_filter: str) -> Decision:
        """May ``identity`` subscribe to ``topic_filter``, i.e. is every topic it can
        match allowed by one subscribe template?"""
        grant = self._grant(identity.uri, device_class)
        if isinstance(grant, Decision):
            return grant
        levels = _filter_levels(topic_filter)
        if levels is None:
            return _BAD_FILTER
        for template, decision in grant.subscribe:
            if _covers(template, levels):
                return decision
        return grant.no_subscribe

    def may_request(
        self, identity: Identity, device_class: str, method: str, path: Sequence[str]
    ) -> Decision:
        """May ``identity`` of ``device_class`` send a CoAP ``method`` request (``"GET"``,
        ``"POST"``, ...) to ``path``, the full Uri-Path as a sequence of segments?"""
        grant = self._grant(identity.uri, device_class)
        if isinstance(grant, Decision):
            return grant
        levels = tuple(path) or ("",)
        if any("\0" in level for level in levels):
            return _BAD_PATH
        for template, decision in grant.coap.get(method, ()):
            if _covers(template, levels):
                return decision
        return grant.no_coap

    def step_up_for(self, identity: Identity, device_class: str, topic: str) -> StepUp | None:
        """The step-up a publish to ``topic`` demands, or None. Says nothing about
        whether the publish is allowed: ask :meth:`may_publish` too."""
        grant = self._grant(identity.uri, device_class)
        if isinstance(grant, Decision) or not topic:
            return None
        levels = topic.split("/")
        for template, step in grant.step_up:
            if _covers(template, levels):
                return step
        return None


# -- parsing --------------------------------------------------------------------------


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    names.update({list: "array", dict: "table"})
    return names.get(type(value), type(value).__name__)


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigurationError(f"{where} must be a table, not {_type_name(value)}")
    return value


def _only(table: Mapping[str, Any], where: str, allowed: Sequence[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigurationError(
                f"{where}: unknown key {key!r}; allowed here: {', '.join(allowed)}"
            )


def _strings(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ConfigurationError(
            f'{where}.{key} must be an array of strings like {key} = ["a/{{id}}/#"], '
            f"not {_type_name(value)}"
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigurationError(
                f"{where}.{key}[{i}] must be a string, not {_type_name(item)}; quote it"
            )
    return tuple(value)


def _templates(
    table: Mapping[str, Any], key: str, where: str, placeholders: Sequence[str]
) -> tuple[str, ...]:
    values = _strings(table, key, where)
    for i, text in enumerate(values):
        _template_levels(text, f"{where}.{key}[{i}]", placeholders)
    return values


def _switch(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if type(value) is not bool:
        raise ConfigurationError(f"{where}.{key} must be true or false, not {_type_name(value)}")
    return value


def _step_ups(body: Mapping[str, Any], where: str) -> tuple[StepUp, ...]:
    raw = body.get("step_up", [])
    many = isinstance(raw, list)
    found: list[StepUp] = []
    for i, item in enumerate(raw if many else [raw]):
        here = f"{where}.step_up" + (f"[{i}]" if many else "")
        rule = _table(item, here)
        _only(rule, here, ("publish", "quote"))
        if "publish" not in rule:
            raise ConfigurationError(f"{here}: missing publish; list the topics, or remove it")
        quote = rule.get("quote", False)
        if type(quote) is not bool:
            raise ConfigurationError(f"{here}.quote must be true or false, not {_type_name(quote)}")
        templates = _templates(rule, "publish", here, CLASS_PLACEHOLDERS)
        found.extend(StepUp(t, quote) for t in templates)
    return tuple(found)


def _coap(
    body: Mapping[str, Any], where: str, placeholders: Sequence[str]
) -> tuple[tuple[str, str], ...]:
    if "coap" not in body:
        return ()
    here = f"{where}.coap"
    table = _table(body["coap"], here)
    _only(table, here, COAP_METHODS)
    return tuple(
        (method, t) for method in table for t in _templates(table, method, here, placeholders)
    )


def _class_rules(doc: Mapping[str, Any]) -> dict[str, Rules]:
    declared: dict[str, tuple[str | None, Rules]] = {}
    for name, body in _table(doc.get("classes", {}), "classes").items():
        where = f"classes.{name}"
        body = _table(body, where)
        _only(body, where, ("inherits", "publish", "subscribe", "step_up", "coap", "retain",
                            "will", "will_delay"))
        parent = body.get("inherits")
        if parent is not None and not isinstance(parent, str):
            raise ConfigurationError(
                f"{where}.inherits must be a class name in quotes, not {_type_name(parent)}"
            )
        declared[name] = (
            parent,
            Rules(
                _templates(body, "publish", where, CLASS_PLACEHOLDERS),
                _templates(body, "subscribe", where, CLASS_PLACEHOLDERS),
                _step_ups(body, where),
                _coap(body, where, CLASS_PLACEHOLDERS),
                _templates(body, "retain", where, CLASS_PLACEHOLDERS),
                _templates(body, "will", where, CLASS_PLACEHOLDERS),
                _switch(body, "will_delay", where),
            ),
        )
    resolved = {}
    for name in declared:
        chain = [name]
        parent = declared[name][0]
        while parent is not None:
            if parent in chain:
                cycle = " -> ".join([*chain, parent])
                raise ConfigurationError(
                    f"classes.{name}.inherits: cycle {cycle}; remove one of these inherits"
                )
            if parent not in declared:
                raise ConfigurationError(
                    f"classes.{chain[-1]}.inherits: unknown class {parent!r}; "
                    f"define [classes.{parent}] or fix the name"
                )
            chain.append(parent)
            parent = declared[parent][0]
        own = [declared[c][1] for c in chain]
        resolved[name] = Rules(
            tuple(dict.fromkeys(t for r in own for t in r.publish)),
            tuple(dict.fromkeys(t for r in own for t in r.subscribe)),
            tuple(dict.fromkeys(s for r in own for s in r.step_up)),
            tuple(dict.fromkeys(c for r in own for c in r.coap)),
            tuple(dict.fromkeys(t for r in own for t in r.retain)),
            tuple(dict.fromkeys(t for r in own for t in r.will)),
            any(r.will_delay for r in own),
        )
    return resolved


def _parse(text: str, cache_size: int) -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"TOML syntax error: {exc}") from None
    except ValueError as exc:  # an integer too long to convert (over 4300 digits)
        raise ConfigurationError(f"TOML value error: {exc}; write a smaller number") from None
    except RecursionError:
        raise ConfigurationError(
            "arrays or inline tables nested too deep for a policy; flatten them"
        ) from None
    _only(doc, "top level", ("version", "classes", "brokers"))
    if "version" not in doc:
        raise ConfigurationError(f"missing version; add 'version = {VERSION}' at the top")
    version = doc["version"]
    if type(version) is not int:
        raise ConfigurationError(
            f"version must be an integer, not {_type_name(version)}; write version = {VERSION}"
        )
    if version != VERSION:
        raise ConfigurationError(
            f"version {version} is not supported; this broker reads version {VERSION}"
        )
    classes = _class_rules(doc)
    brokers = _table(doc.get("brokers", {}), "brokers")
    _only(brokers, "brokers", ("publish", "subscribe", "coap", "retain", "will", "will_delay"))
    rules = Rules(
        _templates(brokers, "publish", "brokers", BROKER_PLACEHOLDERS),
        _templates(brokers, "subscribe", "brokers", BROKER_PLACEHOLDERS),
        coap=_coap(brokers, "brokers", BROKER_PLACEHOLDERS),
        retain=_templates(brokers, "retain", "brokers", BROKER_PLACEHOLDERS),
        will=_templates(brokers, "will", "brokers", BROKER_PLACEHOLDERS),
        will_delay=_switch(brokers, "will_delay", "brokers"),
    )
    return Policy(classes, rules, cache_size)


def parse_policy(text: str, source: str = "<policy>", *, cache_size: int = 16384) -> Policy:
    """Parse a policy; any problem raises :class:`ConfigurationError` with one line
    ``<source>: <where>: <what is wrong>; <how to fix>``."""
    try:
        return _parse(text, cache_size)
    except ConfigurationError as exc:
        detail = " ".join(exc.detail.split())  # one line, whatever tomllib said
        raise ConfigurationError(f"{source}: {detail}") from None


def load_policy(path: str | os.PathLike[str], *, cache_size: int = 16384) -> Policy:
    """Read and parse the policy file at ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"{path}: cannot read the policy file ({exc.strerror or exc}); "
            "check the path and its permissions"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigurationError(f"{path}: line {line} is not UTF-8; save it as UTF-8") from None
    return parse_policy(text, str(path), cache_size=cache_size)


class PolicyHolder:
    """The broker's current policy. :meth:`reload` installs a new one atomically or,
    if the file is unreadable or invalid, not at all."""

    def __init__(self, initial: Policy | str | os.PathLike[str]) -> None:
        self.path: str | os.PathLike[str] | None = None
        if not isinstance(initial, Policy):
            self.path = initial
            initial = load_policy(initial)
        self._current = initial
        self._lock = threading.Lock()

    @property
    def current(self) -> Policy:
        return self._current

    def reload(self, path: str | os.PathLike[str] | None = None) -> bool:
        """Load ``path`` (default: the path last loaded) and install it. Returns True if
        the policy changed (a step-up trigger), False if it is the same by digest (the
        old object, with its warm cache, stays). Raises :class:`ConfigurationError`,
        keeping the current policy, if the new one cannot be loaded."""
        with self._lock:
            path = path if path is not None else self.path
            if path is None:
                raise ConfigurationError("no policy file to reload; pass its path")
            new = load_policy(path, cache_size=self._current.cache_size)
            self.path = path
            if new.digest == self._current.digest:
                return False
            self._current = new
            return True
