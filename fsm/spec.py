"""The spec format: YAML (a key twice is an error) decoded by msgspec into typed structs,
then validated.

A spec declares one lifecycle as a table. The rules for what may live in it:

* ``states`` and ``events`` are closed alphabets, each name documented.
* Every ``(state, event)`` pair has exactly one outcome, written down:
  a ``transition`` (moves, may emit codes and name a reply), a ``refuse``
  (stays, the event is not allowed here: may emit codes and a failure reply),
  an ``ignore`` (it happens here and needs nothing: stays, nothing is emitted
  or sent), or ``impossible`` (the adapter never fires it here; each rule says
  why in its ``doc``). At run time an impossible pair fails closed: the core
  logs SSH_SPEC_VIOLATION and ends the connection (or the channel). An event
  that is undefined somewhere is a *gap*, and a spec with a gap does not load.
* Two outcomes for one pair are allowed only when a ``guard`` tells them
  apart: the pair ``counter < limit`` / ``counter >= limit``, nothing else.
  Guards read counters *before* the transition's own ``do`` updates them.
* ``emit`` names codes from the catalog (``sshspec.codes``), in order.
* ``reply`` names what the adapter must send the peer; the names are the
  spec's ``replies`` alphabet, so an adapter can prove it handles them all.
* ``groups`` name lists of states or of events, usable in ``from``/``in``/``on``.
* ``"*"`` in a ``refuse``/``ignore``/``impossible`` rule means "every state (or
  event) not otherwise covered": it fills gaps, it never overrides an explicit
  entry. One side at a time: a rule with ``"*"`` for both states and events
  would decide every pair nobody wrote down, so it does not load.

Everything here is pure: no I/O besides reading the spec text given to it.
"""

from __future__ import annotations

import importlib.resources
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from sshspec.codes import CATALOG, Code
from sshspec.fsm.yamlfile import DuplicateKeyError, read_yaml, yaml_problem

Names = str | list[str]


class Limit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    default: int
    doc: str = ""


class Transition(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename={"from_": "from"}):
    from_: Names
    event: Names
    to: str | None = None
    guard: str | None = None
    do: list[str] = []
    emit: list[str] = []
    reply: str | None = None
    doc: str = ""


class Refuse(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename={"in_": "in"}):
    in_: Names
    event: Names
    emit: list[str] = []
    reply: str | None = None
    doc: str = ""


class Ignore(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename={"in_": "in"}):
    in_: Names
    event: Names
    doc: str = ""


class Impossible(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename={"in_": "in"}):
    in_: Names
    event: Names
    doc: str  # why the adapter can never fire it there: required


class Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One lifecycle, as written in a spec file."""

    machine: str
    doc: str
    initial: str
    final: list[str]
    states: dict[str, str]
    events: dict[str, str]
    transitions: list[Transition]
    replies: dict[str, str] = {}
    counters: dict[str, str] = {}
    limits: dict[str, Limit] = {}
    groups: dict[str, list[str]] = {}
    refuse: list[Refuse] = []
    ignore: list[Ignore] = []
    impossible: list[Impossible] = []


Kind = Literal["transition", "refuse", "ignore", "impossible"]
GuardOp = Literal["<", ">="]
EffectOp = Literal["+=", "-=", "="]
SPEC_VIOLATION = "SSH_SPEC_VIOLATION"  # what an impossible pair logs when it happens


@dataclass(frozen=True, slots=True)
class Guard:
    counter: str
    op: GuardOp
    limit: str

    def __str__(self) -> str:
        return f"{self.counter} {self.op} {self.limit}"


@dataclass(frozen=True, slots=True)
class Effect:
    counter: str
    op: EffectOp
    value: int

    def __str__(self) -> str:
        return f"{self.counter} {self.op} {self.value}"


@dataclass(frozen=True, slots=True)
class Entry:
    """The outcome of one event in one state: one row of the expanded table."""

    source: str
    event: str
    target: str
    kind: Kind
    codes: tuple[str, ...]
    reply: str | None
    guard: Guard | None
    effects: tuple[Effect, ...]
    where: str  # the path inside the spec file that wrote this row


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec and its expanded table: ``table[(state, event)]`` is one
    entry, or two told apart by complementary guards."""

    spec: Spec
    file: str
    table: dict[tuple[str, str], tuple[Entry, ...]]

    @property
    def name(self) -> str:
        return self.spec.machine

    def transitions(self) -> list[Entry]:
        """The rows of kind ``transition`` (what a diagram draws), in table order."""
        return [e for entries in self.table.values() for e in entries if e.kind == "transition"]


class SpecError(Exception):
    """A spec does not load. Each line names the file and the path inside it."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        super().__init__("\n".join(f"{file}: {p}" for p in problems))


_GUARD = re.compile(r"^\s*(\w+)\s*(<|>=)\s*(\w+)\s*$")
_EFFECT = re.compile(r"^\s*(\w+)\s*(\+=|-=|=)\s*(\d+)\s*$")
# The operators those patterns match, as their Literal types.
_GUARD_OPS: dict[str, GuardOp] = {"<": "<", ">=": ">="}
_EFFECT_OPS: dict[str, EffectOp] = {"+=": "+=", "-=": "-=", "=": "="}

BUNDLED = ("server", "connection", "session", "forward", "container")


def bundled_path(name: str) -> Path:
    return Path(str(importlib.resources.files("sshspec.specs").joinpath(f"{name}.yaml")))


def load_spec(
    source: str | Path, *, text: bytes | None = None, catalog: dict[str, Code] = CATALOG
) -> LoadedSpec:
    """Load a spec by bundled name (``connection``) or by path, and validate it."""
    path = bundled_path(source) if source in BUNDLED and text is None else Path(source)
    file = f"specs/{path.name}" if source in BUNDLED else str(source)
    if text is None:
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise SpecError(file, [f"cannot read: {exc.strerror}"]) from None
    try:
        data = read_yaml(text)
    except DuplicateKeyError as exc:
        raise SpecError(file, [f"{exc.path}: duplicate key {exc.key!r} ({exc.where})"]) from None
    except yaml.YAMLError as exc:
        raise SpecError(file, [f"not valid YAML: {yaml_problem(exc)}"]) from None
    try:
        spec = msgspec.convert(data, type=Spec)
    except msgspec.ValidationError as exc:
        raise SpecError(file, [_msgspec_path(str(exc))]) from None
    return _Validator(spec, file, catalog).run()


def _msgspec_path(message: str) -> str:
    """msgspec's "Expected `str`, got `int` - at `$.transitions[3].event`" (or "- at `key`
    in `$.transitions[0]`" for keys), rewritten path first: "transitions[3].event: ..."."""
    m = re.match(r"^(.*) - at `(.*?)`(?: in `(.*)`)?$", message)
    if not m:
        return message
    text, path, parent = m.groups()
    if parent is not None:
        path, text = parent, f"{text} (a key)"
    path = path.removeprefix("$").removeprefix(".")
    return f"{path or '(top)'}: {text}"


def spec_schema() -> bytes:
    """The JSON Schema of the spec format, for editors."""
    schema = msgspec.json.schema(Spec)
    return msgspec.json.format(msgspec.json.encode(schema), indent=2) + b"\n"


class _Validator:
    def __init__(self, spec: Spec, file: str, catalog: dict[str, Code]) -> None:
        self.spec = spec
        self.file = file
        self.catalog = catalog
        self.problems: list[str] = []
        self.used_counters: set[str] = set()
        self.used_limits: set[str] = set()

    def run(self) -> LoadedSpec:
        spec = self.spec
        self._check_alphabets()
        table: dict[tuple[str, str], list[Entry]] = {}
        for i, t in enumerate(spec.transitions):
            where = f"transitions[{i}]"
            target = t.to
            if target is not None and target not in spec.states:
                self.problems.append(f"{where}.to: unknown state {target!r}")
                continue
            guard = self._guard(t.guard, f"{where}.guard")
            effects = self._effects(t.do, f"{where}.do")
            codes = self._codes(t.emit, f"{where}.emit")
            reply = self._reply(t.reply, f"{where}.reply")
            for state in self._states(t.from_, f"{where}.from"):
                for event in self._events(t.event, f"{where}.event"):
                    entry = Entry(state, event, target or state, "transition", codes, reply,
                                  guard, effects, where)
                    table.setdefault((state, event), []).append(entry)
        wildcards: list[Entry] = []
        rules_of_kind: tuple[tuple[Literal["refuse", "ignore", "impossible"],
                                   Sequence[Refuse | Ignore | Impossible]], ...] = (
            ("refuse", spec.refuse), ("ignore", spec.ignore), ("impossible", spec.impossible))
        for kind, rules in rules_of_kind:
            for i, rule in enumerate(rules):
                where = f"{kind}[{i}]"
                codes = ()
                reply = None
                if isinstance(rule, Refuse):
                    codes = self._codes(rule.emit, f"{where}.emit")
                    reply = self._reply(rule.reply, f"{where}.reply")
                elif isinstance(rule, Impossible):
                    codes = self._codes([SPEC_VIOLATION], f"{where}.emit")
                    if not rule.doc.strip():
                        self.problems.append(f"{where}.doc: say why the adapter never fires it there")
                if rule.in_ == "*" and rule.event == "*":
                    self.problems.append(
                        f"{where}: \"*\" for both states and events decides every pair nobody wrote "
                        "down; name the states or the events")
                    continue
                states = self._states(rule.in_, f"{where}.in")
                events = self._events(rule.event, f"{where}.event")
                wild = rule.in_ == "*" or rule.event == "*"
                for state in states:
                    for event in events:
                        entry = Entry(state, event, state, kind, codes, reply, None, (), where)
                        if wild:
                            wildcards.append(entry)
                        else:
                            table.setdefault((state, event), []).append(entry)
        for entry in wildcards:
            table.setdefault((entry.source, entry.event), [entry])
        self._check_pairs(table)
        frozen = {k: tuple(v) for k, v in table.items()}
        self._check_graph(frozen)
        for name in spec.counters.keys() - self.used_counters:
            self.problems.append(f"counters.{name}: declared but no guard or do uses it")
        for name in spec.limits.keys() - self.used_limits:
            self.problems.append(f"limits.{name}: declared but no guard uses it")
        if self.problems:
            raise SpecError(self.file, self.problems)
        # Keep the table in a stable, readable order: by state, then event, as declared.
        order = {s: i for i, s in enumerate(spec.states)}
        eorder = {e: i for i, e in enumerate(spec.events)}
        ordered = dict(sorted(frozen.items(), key=lambda kv: (order[kv[0][0]], eorder[kv[0][1]])))
        return LoadedSpec(spec, self.file, ordered)

    def _check_alphabets(self) -> None:
        spec = self.spec
        if spec.initial not in spec.states:
            self.problems.append(f"initial: unknown state {spec.initial!r}")
        for i, f in enumerate(spec.final):
            if f not in spec.states:
                self.problems.append(f"final[{i}]: unknown state {f!r}")
        clash = spec.states.keys() & spec.events.keys()
        for name in sorted(clash):
            self.problems.append(f"events.{name}: also the name of a state")
        for name, members in spec.groups.items():
            if name in spec.states or name in spec.events:
                self.problems.append(f"groups.{name}: also the name of a state or event")
            kinds = {"state" if m in spec.states else "event" if m in spec.events else "?"
                     for m in members}
            if "?" in kinds:
                bad = [m for m in members if m not in spec.states and m not in spec.events]
                self.problems.append(f"groups.{name}: unknown state or event {bad[0]!r}")
            elif len(kinds) > 1:
                self.problems.append(f"groups.{name}: mixes states and events")

    def _expand(self, names: Names, alphabet: dict[str, str], what: str, where: str) -> list[str]:
        if names == "*":
            return list(alphabet)
        out: list[str] = []
        for i, name in enumerate([names] if isinstance(names, str) else names):
            if name in alphabet:
                out.append(name)
            elif name in self.spec.groups and all(m in alphabet for m in self.spec.groups[name]):
                out.extend(self.spec.groups[name])
            else:
                at = where if isinstance(names, str) else f"{where}[{i}]"
                self.problems.append(f"{at}: unknown {what} {name!r}")
        return out

    def _states(self, names: Names, where: str) -> list[str]:
        return self._expand(names, self.spec.states, "state", where)

    def _events(self, names: Names, where: str) -> list[str]:
        return self._expand(names, self.spec.events, "event", where)

    def _codes(self, codes: list[str], where: str) -> tuple[str, ...]:
        for i, code in enumerate(codes):
            if code not in self.catalog:
                self.problems.append(f"{where}[{i}]: unknown code {code!r} (not in the catalog)")
        return tuple(codes)

    def _reply(self, reply: str | None, where: str) -> str | None:
        if reply is not None and reply not in self.spec.replies:
            self.problems.append(f"{where}: unknown reply {reply!r}")
        return reply

    def _guard(self, text: str | None, where: str) -> Guard | None:
        if text is None:
            return None
        m = _GUARD.match(text)
        if not m:
            self.problems.append(f"{where}: {text!r} is not 'counter < limit' or 'counter >= limit'")
            return None
        counter, op, limit = m.groups()
        if counter not in self.spec.counters:
            self.problems.append(f"{where}: unknown counter {counter!r}")
        if limit not in self.spec.limits:
            self.problems.append(f"{where}: unknown limit {limit!r}")
        self.used_counters.add(counter)
        self.used_limits.add(limit)
        return Guard(counter, _GUARD_OPS[op], limit)

    def _effects(self, effects: list[str], where: str) -> tuple[Effect, ...]:
        out = []
        for i, text in enumerate(effects):
            m = _EFFECT.match(text)
            if not m:
                self.problems.append(f"{where}[{i}]: {text!r} is not 'counter += n', '-= n' or '= n'")
                continue
            counter, op, value = m.groups()
            if counter not in self.spec.counters:
                self.problems.append(f"{where}[{i}]: unknown counter {counter!r}")
            self.used_counters.add(counter)
            out.append(Effect(counter, _EFFECT_OPS[op], int(value)))
        return tuple(out)

    def _check_pairs(self, table: dict[tuple[str, str], list[Entry]]) -> None:
        for state in self.spec.states:
            for event in self.spec.events:
                entries = table.get((state, event))
                if not entries:
                    self.problems.append(
                        f"gap: in state {state!r} event {event!r} is neither a transition "
                        "nor refused nor ignored")
                    continue
                if len(entries) == 1:
                    if entries[0].guard is not None:
                        self.problems.append(
                            f"{entries[0].where}.guard: in state {state!r} event {event!r} is "
                            f"undefined when {entries[0].guard} is false (add the complementary guard)")
                    continue
                a, b, *rest = entries
                told_apart = (
                    not rest and a.guard is not None and b.guard is not None
                    and a.guard.counter == b.guard.counter and a.guard.limit == b.guard.limit
                    and {a.guard.op, b.guard.op} == {"<", ">="}
                )
                if not told_apart:
                    wheres = ", ".join(e.where for e in entries)
                    self.problems.append(
                        f"{entries[1].where}: in state {state!r} event {event!r} has "
                        f"{len(entries)} outcomes not told apart by complementary guards ({wheres})")

    def _check_graph(self, table: dict[tuple[str, str], tuple[Entry, ...]]) -> None:
        spec = self.spec
        if self.problems:  # the graph checks need a complete table
            return
        successors: dict[str, set[str]] = {s: set() for s in spec.states}
        for (state, _), entries in table.items():
            for e in entries:
                successors[state].add(e.target)
        seen = {spec.initial}
        queue = deque([spec.initial])
        while queue:
            for nxt in successors[queue.popleft()]:
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        for state in spec.states:
            if state not in seen:
                self.problems.append(f"states.{state}: unreachable from {spec.initial!r}")
            outs = successors[state] - {state}
            if state in spec.final and outs:
                self.problems.append(f"states.{state}: final, but has a way out (to {sorted(outs)[0]!r})")
            if state not in spec.final and not outs:
                self.problems.append(f"states.{state}: not final and has no way out")
