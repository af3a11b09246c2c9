"""Run a spec: a flat dispatch table for the hot path, `transitions` as the reference.

`Machine` compiles a `LoadedSpec` into ``table[state][event]``: either a `Step`
(the common case) or a `Fork` of two steps told apart by a counter guard. An
instance of a machine is a small slotted object holding only the current state
and the spec's counters; `Machine.fire(instance, event)` looks up one row,
moves the instance and returns the shared, immutable `Step`, so firing
allocates nothing.

`reference_machine()` builds the same spec with the `transitions` library. It
is the reference semantics (the property tests compare the two) and the
source of the diagrams; it is far too slow and heavy for one per connection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, final

from transitions import Machine as TransitionsMachine
from transitions.extensions import GraphMachine

from sshspec.fsm.spec import Effect, Entry, Guard, LoadedSpec, load_spec


class UnknownEvent(KeyError):
    """An event outside the machine's alphabet: a bug in the caller, never in the spec."""


@final  # so `type(row) is Fork` tells mypy a row that is not a Fork is a Step
@dataclass(frozen=True, slots=True)
class Step:
    """What one event did: where it went, the codes to emit (in order), the reply
    to send (a name from the spec's ``replies``, or None for nothing)."""

    source: str
    event: str
    target: str
    kind: str  # transition | refuse | ignore
    codes: tuple[str, ...]
    reply: str | None
    effects: tuple[tuple[str, str, int], ...]
    where: str

    @property
    def moved(self) -> bool:
        return self.kind == "transition"


@final
@dataclass(frozen=True, slots=True)
class Fork:
    """Two steps told apart by ``counter < limit`` (then `below`) or not (`reached`)."""

    counter: str
    limit: int
    below: Step
    reached: Step


def _step(entry: Entry) -> Step:
    effects = tuple((e.counter, e.op, e.value) for e in entry.effects)
    return Step(entry.source, entry.event, entry.target, entry.kind, entry.codes,
                entry.reply, effects, entry.where)


def bind_limits(loaded: LoadedSpec, limits: Mapping[str, int] | None) -> dict[str, int]:
    """The spec's limit defaults, overridden by ``limits`` (unknown names refused)."""
    values = {name: limit.default for name, limit in loaded.spec.limits.items()}
    for name, value in (limits or {}).items():
        if name in values:
            values[name] = int(value)
    return values


class Machine:
    """A spec compiled for the hot path, with its limits bound."""

    def __init__(self, loaded: LoadedSpec, limits: Mapping[str, int] | None = None) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.limits = bind_limits(loaded, limits)
        self.initial = loaded.spec.initial
        self.final = frozenset(loaded.spec.final)
        self.counters = tuple(loaded.spec.counters)
        self.table: dict[str, dict[str, Step | Fork]] = {s: {} for s in loaded.spec.states}
        for (state, event), entries in loaded.table.items():
            if len(entries) == 1:
                self.table[state][event] = _step(entries[0])
            else:
                # Two entries for one pair: the spec loaded, so complementary guards.
                below, reached = sorted(entries, key=lambda e: e.guard is None or e.guard.op != "<")
                guard = below.guard
                assert guard is not None
                self.table[state][event] = Fork(guard.counter, self.limits[guard.limit],
                                                _step(below), _step(reached))
        self.instance_type: type = _instance_type(self.name, self.counters, self.initial)

    @classmethod
    def load(cls, source: str, limits: Mapping[str, int] | None = None) -> Machine:
        return cls(load_spec(source), limits)

    def new(self) -> Any:
        return self.instance_type()

    def fire(self, instance: Any, event: str) -> Step:
        try:
            step = self.table[instance.state][event]
        except KeyError:
            raise UnknownEvent(f"{self.name}: unknown event {event!r}") from None
        if type(step) is Fork:  # narrows (both classes are final); isinstance costs more
            step = step.below if getattr(instance, step.counter) < step.limit else step.reached
        instance.state = step.target
        if step.effects:
            _apply(instance, step.effects)
        return step

    def peek(self, instance: Any, event: str) -> Step:
        """The step ``fire`` would take, without taking it."""
        step = self.table[instance.state][event]
        if type(step) is Fork:
            step = step.below if getattr(instance, step.counter) < step.limit else step.reached
        return step

    def allowed(self, state: str) -> list[str]:
        """The events that move or are accepted in ``state`` (for error messages)."""
        return [e for e, s in self.table[state].items()
                if type(s) is Fork or s.kind == "transition"]

    def steps(self, state: str, event: str) -> tuple[Step, ...]:
        """Every step (event) may take in (state), whatever the counters."""
        row = self.table[state][event]
        return (row.below, row.reached) if isinstance(row, Fork) else (row,)


def _apply(instance: Any, effects: tuple[tuple[str, str, int], ...]) -> None:
    for counter, op, value in effects:
        if op == "+=":
            setattr(instance, counter, getattr(instance, counter) + value)
        elif op == "-=":
            setattr(instance, counter, max(0, getattr(instance, counter) - value))
        else:
            setattr(instance, counter, value)


def _instance_type(name: str, counters: tuple[str, ...], initial: str) -> type:
    # A slotted class per spec: the state and the counters, nothing else (no
    # __dict__, no __weakref__), so a connection or channel costs a few words.
    namespace: dict[str, Any] = {"__slots__": ("state", *counters)}
    assignments = "".join(f"    self.{c} = 0\n" for c in counters)
    code = f"def __init__(self):\n    self.state = {initial!r}\n{assignments}"
    exec(code, namespace)  # noqa: S102 - generated from validated identifiers only
    namespace["__repr__"] = lambda self: (
        f"<{name} {self.state}" + "".join(f" {c}={getattr(self, c)}" for c in counters) + ">")
    return type(f"{name.title()}Instance", (), namespace)


class ReferenceModel:
    """The model a `transitions` machine moves: counters and the codes emitted."""

    def __init__(self, counters: tuple[str, ...]) -> None:
        self.emitted: list[str] = []
        self.replies: list[str | None] = []
        for c in counters:
            setattr(self, c, 0)


def edge_label(entry: Entry) -> str:
    label = entry.event
    if entry.guard is not None:
        label += f" [{entry.guard}]"
    if entry.codes:
        label += " / " + ", ".join(entry.codes)
    return label


def reference_machine(
    loaded: LoadedSpec,
    limits: Mapping[str, int] | None = None,
    *,
    machine_class: type[TransitionsMachine] = TransitionsMachine,
    transitions_only: bool = False,
    **kwargs: Any,
) -> tuple[TransitionsMachine, ReferenceModel]:
    """Build the spec as a `transitions` machine over a `ReferenceModel`.

    Every row of the table becomes a transition carrying its codes: moves as
    ordinary transitions, refusals and ignores as internal ones (``dest=None``).
    With ``transitions_only`` (diagrams) the refusals and ignores are left out.
    """
    values = bind_limits(loaded, limits)
    model = ReferenceModel(tuple(loaded.spec.counters))
    label_edges = issubclass(machine_class, GraphMachine)  # only diagram machines take labels
    machine = machine_class(
        model=model, states=list(loaded.spec.states), initial=loaded.spec.initial,
        auto_transitions=False, ignore_invalid_triggers=False, **kwargs)
    for (state, event), entries in loaded.table.items():
        for entry in entries:
            if transitions_only and entry.kind != "transition":
                continue
            dest = entry.target if entry.kind == "transition" else None
            machine.add_transition(
                event, state, dest,
                conditions=[_condition(model, entry.guard, values)] if entry.guard else [],
                before=[_effects(model, entry.effects)] if entry.effects else [],
                after=[_record(model, entry.codes, entry.reply)],
                **({"label": edge_label(entry)} if label_edges else {}))
    return machine, model


def _condition(model: ReferenceModel, guard: Guard, limits: dict[str, int]) -> Callable[[], bool]:
    limit = limits[guard.limit]
    if guard.op == "<":
        return lambda: getattr(model, guard.counter) < limit
    return lambda: getattr(model, guard.counter) >= limit


def _effects(model: ReferenceModel, effects: tuple[Effect, ...]) -> Callable[[], None]:
    as_tuples = tuple((e.counter, e.op, e.value) for e in effects)
    return lambda: _apply(model, as_tuples)


def _record(model: ReferenceModel, codes: tuple[str, ...], reply: str | None) -> Callable[[], None]:
    def record() -> None:
        model.emitted.extend(codes)
        model.replies.append(reply)
    return record
