"""Replay logged codes against the specs: the engine of `sshspec check` and `sshspec coverage`.

A log records the *codes* a machine emitted and, in each record, the *event*
that fired the step (`sshspec serve` writes it; a record without one matches
any event). Some steps emit no code (silent moves: an admitted ``accept``,
``channel_closed``, ``keepalive_answered``; or codes below the server's log
level), some emit several in a row (``SSH_HANDSHAKE_FAILED,
SSH_DISCONNECTED``). So every machine instance is replayed as a nondeterministic
automaton over codes: it holds the set of configurations the records so far
allow, a configuration being (state, counter values, codes still due from a
multi-code step). A record with code C (and event E) is allowed when some configuration,
after any number of silent moves, takes a step on E whose first code is C, or
is in the middle of a step (on E) whose next code is C. The event tells apart
steps that log the same codes: the ways a connection can end before
authentication, or the attempts that leave a keyboard-interactive round.

Counters are exact (the limits are bound, so guards are evaluated). A counter
is held at the largest limit it is compared with: no guard tells larger values
apart, and it keeps the silent closure finite. (Counting down from a held value
can then only make the replay more lenient; no bundled spec counts past a
limit.) Identical configurations merge, so the set stays as small as the log's
real ambiguity, and the step from a set of configurations is memoized.

Coverage credit is exact for steps that log a code with its event; only silent
moves leave no trace. Each configuration carries the transitions of the paths
that reach it; between two records only the *shortest* silent paths are
credited, so a silent detour is not credited unless a later record needs it.
Where several configurations survive (records without events, codes below the
log level), the transitions of all of them are credited, and a silent counter
move (an admitted ``accept``, a ``channel_closed``) whenever a surviving
configuration took it. With one consistent path that is exactly its transitions.

Nothing here does I/O: `Replay.feed` takes the code, the two routing labels and
the event of an already-decoded record.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from sshspec.codes import CATALOG
from sshspec.fsm.machine import Machine, edge_label
from sshspec.fsm.spec import BUNDLED, Entry

# A configuration: (state, counter values, codes still due from the step being
# logged, that step's event ("" when nothing is due)).
Config = tuple[str, tuple[int, ...], tuple[str, ...], str]
Credits = frozenset[int]  # indexes into CodeAutomaton.transitions
_K = TypeVar("_K")
_V = TypeVar("_V")
_NONE: Credits = frozenset()

# The connection code that opens a session channel (its record carries the
# channelId) and the one that takes the opening back when the backend fails it.
OPENS_CHANNEL = "SSH_NEW_CHANNEL"
REFUSES_CHANNEL = "SSH_NEW_CHANNEL_REJECTED"
# The connection code that starts a direct-tcpip channel's forward machine (with its channelId).
OPENS_FORWARD = "SSH_FORWARD_REQUESTED"


@dataclass(frozen=True, slots=True)
class _Row:
    """One table entry that changes something, compiled for replay."""

    index: int  # into CodeAutomaton.transitions; -1 for a refusal (not a transition)
    guard: tuple[int, str, int] | None  # (counter position, op, bound limit)
    effects: tuple[tuple[int, str, int], ...]  # (counter position, op, value)
    target: str
    codes: tuple[str, ...]  # the codes that reach the log (silent ones left out)
    event: str


class RecordError(ValueError):
    """A record that cannot be routed to any machine: the log is corrupt."""


def transition_label(entry: Entry) -> str:
    """``source --event [guard] / CODES--> target``, how coverage names a transition."""
    return f"{entry.source} --{edge_label(entry)}--> {entry.target}"


class CodeAutomaton:
    """One spec as an automaton over the codes it logs. Stateless apart from caches,
    so one per spec serves every instance of every file."""

    def __init__(self, machine: Machine, silent: Collection[str] = ()) -> None:
        loaded = machine.loaded
        self.name = machine.name
        self.final = machine.final
        self.states = tuple(loaded.spec.states)
        self.transitions: list[Entry] = loaded.transitions()
        index = {id(e): i for i, e in enumerate(self.transitions)}
        position = {c: i for i, c in enumerate(machine.counters)}
        caps = [0] * len(position)
        for entries in loaded.table.values():
            for e in entries:
                if e.guard is not None:
                    i = position[e.guard.counter]
                    caps[i] = max(caps[i], machine.limits[e.guard.limit])
        self._caps = tuple(caps)
        self.codes = frozenset(c for entries in loaded.table.values() for e in entries for c in e.codes)
        self.visible = self.codes - frozenset(silent)  # the codes that reach the log
        self._rows: dict[str, list[_Row]] = {s: [] for s in self.states}
        for (state, _), entries in loaded.table.items():
            for e in entries:
                if e.kind == "impossible":
                    continue  # its SSH_SPEC_VIOLATION is never a valid record: the replay refuses it
                codes = tuple(c for c in e.codes if c not in silent)
                if not codes and not e.effects and e.target == state:
                    continue  # an ignore, or a silent refusal: changes nothing, invisible
                guard = (None if e.guard is None else
                         (position[e.guard.counter], e.guard.op, machine.limits[e.guard.limit]))
                effects = tuple((position[f.counter], f.op, f.value) for f in e.effects)
                self._rows[state].append(_Row(index.get(id(e), -1), guard, effects, e.target, codes,
                                              e.event))
        self.initial: Config = (machine.initial, (0,) * len(position), (), "")
        # advance() and closure() see the same few configuration sets over and over
        # (every connection of a log goes through much the same states): memoize.
        self._advance: dict[tuple[frozenset[Config], str, str | None],
                            dict[Config, dict[Config, Credits]]] = {}
        self._closure: dict[frozenset[Config], dict[Config, tuple[int, dict[Config, Credits]]]] = {}

    def _moves(self, config: Config) -> Iterator[tuple[_Row, Config]]:
        """The steps a configuration with nothing pending can take, with where they lead."""
        state, values, _, _ = config
        for row in self._rows[state]:
            if row.guard is not None:
                i, op, bound = row.guard
                if (values[i] < bound) != (op == "<"):
                    continue
            new = values
            if row.effects:
                v = list(values)
                for i, op, n in row.effects:  # the same arithmetic as machine._apply, capped
                    v[i] = max(0, v[i] - n) if op == "-=" else min(v[i] + n if op == "+=" else n,
                                                                    self._caps[i])
                new = tuple(v)
            rest = row.codes[1:]
            yield row, (row.target, new, rest, row.event if rest else "")

    def closure(self, sources: frozenset[Config]) -> dict[Config, tuple[int, dict[Config, Credits]]]:
        """Every configuration silent moves reach from ``sources``: its distance (fewest
        silent moves) and, per source it is reached from at that distance, the
        transitions of those shortest paths. Configurations mid-step do not move."""
        cached = self._closure.get(sources)
        if cached is not None:
            return cached
        seen: dict[Config, tuple[int, dict[Config, Credits]]] = {s: (0, {s: _NONE}) for s in sources}
        frontier, distance = list(sources), 0
        while frontier:
            layer: dict[Config, dict[Config, Credits]] = {}
            for config in frontier:
                if config[2]:
                    continue
                for row, nxt in self._moves(config):
                    if row.codes or nxt in seen:
                        continue  # visible, or already reached by a shorter path
                    origins = layer.setdefault(nxt, {})
                    step: Credits = frozenset((row.index,)) if row.index >= 0 else _NONE
                    for source, credits in seen[config][1].items():
                        origins[source] = origins.get(source, _NONE) | credits | step
            distance += 1
            for config, origins in layer.items():
                seen[config] = (distance, origins)
            frontier = list(layer)
        self._remember(self._closure, sources, seen)
        return seen

    def advance(self, sources: frozenset[Config], code: str,
                event: str | None = None) -> dict[Config, dict[Config, Credits]]:
        """The configurations after a record with ``code`` (logged by a step on
        ``event``; None: any); for each, the sources it comes from and the
        transitions taken on the way. Empty: the record is not allowed."""
        key = (sources, code, event)
        cached = self._advance.get(key)
        if cached is not None:
            return cached
        best: dict[Config, tuple[int, dict[Config, Credits]]] = {}

        def reach(target: Config, distance: int, origins: dict[Config, Credits], step: Credits) -> None:
            # Keep, per target, only the explanations with the fewest silent moves.
            have = best.get(target)
            if have is None or distance < have[0]:
                best[target] = have = (distance, {})
            elif distance > have[0]:
                return
            for source, credits in origins.items():
                have[1][source] = have[1].get(source, _NONE) | credits | step

        for config, (distance, origins) in self.closure(sources).items():
            state, values, pending, due_event = config
            if pending:
                if pending[0] == code and event in (None, due_event):
                    rest = pending[1:]
                    reach((state, values, rest, due_event if rest else ""), distance, origins, _NONE)
                continue
            for row, nxt in self._moves(config):
                if row.codes and row.codes[0] == code and event in (None, row.event):
                    reach(nxt, distance, origins, frozenset((row.index,)) if row.index >= 0 else _NONE)
        result = {target: origins for target, (_, origins) in best.items()}
        self._remember(self._advance, key, result)
        return result

    def allowed(self, sources: frozenset[Config]) -> list[str]:
        """The codes that could come next (for error messages)."""
        codes: set[str] = set()
        for config in self.closure(sources):
            if config[2]:
                codes.add(config[2][0])
            else:
                codes.update(row.codes[0] for row, _ in self._moves(config) if row.codes)
        return sorted(codes)

    def can_finish(self, sources: frozenset[Config]) -> bool:
        """Whether silent moves can bring some configuration to a final state with nothing due."""
        return any(s in self.final and not pending for s, _, pending, _ in self.closure(sources))

    def describe(self, configs: Collection[Config]) -> str:
        """The states of ``configs``, in spec order, e.g. ``closed (SSH_DISCONNECTED still due)``."""
        order = {s: i for i, s in enumerate(self.states)}
        shown: dict[str, None] = {}
        for state, _, pending, _ in sorted(configs, key=lambda c: (order[c[0]], c[2])):
            shown[f"{state} ({', '.join(pending)} still due)" if pending else state] = None
        return ", ".join(shown)

    @staticmethod
    def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
        if len(cache) > 50_000:  # a pathological log; start over rather than grow unbounded
            cache.clear()
        cache[key] = value


def _step(automaton: CodeAutomaton, configs: dict[Config, Credits], code: str, event: str | None,
          track: bool) -> dict[Config, Credits] | None:
    """The configurations after a record with ``code`` and ``event`` (each with its
    credited transitions when ``track``), or None if the spec does not allow it."""
    moves = automaton.advance(frozenset(configs), code, event)
    if not moves:
        return None
    if not track:
        return dict.fromkeys(moves, _NONE)
    return {target: _NONE.union(*(configs[s] | step for s, step in origins.items()))
            for target, origins in moves.items()}


def _refusal(label: str, automaton: CodeAutomaton, configs: Collection[Config], code: str,
             event: str | None) -> str:
    allowed = automaton.allowed(frozenset(configs))
    saw = code if event is None else f"{code} (event {event})"
    return (f"{label}: in state(s) {automaton.describe(configs)}, the spec allows "
            f"{', '.join(allowed) if allowed else 'no more codes'}, saw {saw}")


def _unfinished(label: str, automaton: CodeAutomaton, configs: Collection[Config]) -> str:
    return (f"{label}: in state(s) {automaton.describe(configs)} at the end of the log, "
            f"not in a final state ({', '.join(sorted(automaton.final))}) with nothing due")


class Instance:
    """One machine instance being replayed: its configurations and, for coverage,
    the transitions credited to each."""

    __slots__ = ("automaton", "label", "configs", "records")

    def __init__(self, automaton: CodeAutomaton, label: str) -> None:
        self.automaton = automaton
        self.label = label  # "connection (1f-3)"
        self.configs: dict[Config, Credits] = {automaton.initial: _NONE}
        self.records = 0

    def feed(self, code: str, event: str | None, track: bool) -> str | None:
        """Take one record; None if the spec allows it, else what is wrong."""
        configs = _step(self.automaton, self.configs, code, event, track)
        if configs is None:
            return _refusal(self.label, self.automaton, self.configs, code, event)
        self.configs = configs
        self.records += 1
        return None

    def unfinished(self) -> str | None:
        """None if the instance can be in a final state with nothing due, else why not."""
        if self.automaton.can_finish(frozenset(self.configs)):
            return None
        return _unfinished(self.label, self.automaton, self.configs)

    def credited(self) -> Credits:
        return _NONE.union(*self.configs.values())


# The server pool's joint configuration: each worker's set of configurations,
# sorted so that workers in the same situation are interchangeable.
Joint = tuple[frozenset[Config], ...]


class ServerPool:
    """The server machines of ``size`` processes writing one log (``serve --workers N``).

    Server records carry no label telling the workers apart, so which worker
    logged a record is one more nondeterministic choice: the pool holds every
    assignment consistent with the records so far (merged when the workers end
    up in the same situations). With ``size`` 1 it is simply the server machine.
    """

    def __init__(self, automaton: CodeAutomaton, size: int = 1) -> None:
        self.automaton = automaton
        self.label = "server" if size == 1 else f"server (one of {size} workers)"
        start = {automaton.initial: _NONE}
        self.joint: dict[Joint, tuple[dict[Config, Credits], ...]] = {
            (frozenset(start),) * size: tuple(dict(start) for _ in range(size))}

    def feed(self, code: str, event: str | None, track: bool) -> str | None:
        new: dict[Joint, tuple[dict[Config, Credits], ...]] = {}
        for key, workers in self.joint.items():
            for i in {k: i for i, k in enumerate(key)}.values():  # one of each kind of worker
                moved = _step(self.automaton, workers[i], code, event, track)
                if moved is None:
                    continue
                after = sorted((*workers[:i], moved, *workers[i + 1:]), key=lambda w: sorted(w))
                joint = tuple(frozenset(w) for w in after)
                have = new.get(joint)
                if have is None:  # copies: unmoved workers' dicts are shared with other entries
                    new[joint] = tuple(dict(w) for w in after)
                else:  # the same situation reached by another assignment: merge the credits
                    for mine, other in zip(have, after, strict=True):
                        for config, credits in other.items():
                            mine[config] = mine[config] | credits
        if not new:
            return _refusal(self.label, self.automaton, self._configs(), code, event)
        self.joint = new
        return None

    def _configs(self) -> set[Config]:
        return {c for key in self.joint for worker in key for c in worker}

    def unfinished(self) -> str | None:
        if any(all(self.automaton.can_finish(w) for w in key) for key in self.joint):
            return None
        return _unfinished(self.label, self.automaton, self._configs())

    def credited(self) -> Credits:
        return _NONE.union(*(c for workers in self.joint.values() for w in workers for c in w.values()))


def automata(limits: Mapping[str, int] | None = None,
             silent: Collection[str] = ()) -> dict[str, CodeAutomaton]:
    """The bundled specs as code automata, with ``limits`` bound; ``silent``
    codes are not in the log (below the server's log level) and count as silent moves."""
    return {name: CodeAutomaton(Machine.load(name, limits), silent) for name in BUNDLED}


class Replay:
    """Routes the records of one log to machine instances.

    * A code only the server spec emits, or any record without a connectionId:
      the server machine, which exists from the log's first line (one server
      process per log; ``workers`` > 1 for ``serve --workers N``, see `ServerPool`).
    * A session code with a channelId: that channel's session machine. It starts
      when the connection logs ``SSH_NEW_CHANNEL`` for the channel, so a channel
      that never logs anything is still held to ``--complete``, and a session
      record for a channel never opened is refused. (When ``SSH_NEW_CHANNEL`` is
      below the log level, a new (connectionId, channelId) starts one instead.)
    * A forward code: that channel's forward machine, started when the connection
      logs ``SSH_FORWARD_REQUESTED`` for the channel (held to ``--complete`` likewise).
    * Any other code with a connectionId: that connection's machine; a new
      connectionId starts one (whose first code must be ``SSH_CONNECTED``).
    * A code only the container spec emits: the machine of the container its
      ``container`` label names (a new name starts one), whoever owns it: a
      connection, a session, or nobody (one found left behind at start-up).
    """

    def __init__(self, automata: Mapping[str, CodeAutomaton], *, track: bool = False,
                 workers: int = 1) -> None:
        self.automata = automata
        self.track = track
        self.emitters: dict[str, set[str]] = {}
        for name, automaton in automata.items():
            for code in automaton.codes:
                self.emitters.setdefault(code, set()).add(name)
        self.opens_channels = OPENS_CHANNEL in automata["connection"].visible
        self.server = ServerPool(automata["server"], workers)
        self.connections: dict[str, Instance] = {}
        self.sessions: dict[tuple[str, int], Instance] = {}
        self.forwards: dict[tuple[str, int], Instance] = {}
        self.containers: dict[str, Instance] = {}
        self.codes_seen: dict[str, set[str]] = {name: set() for name in automata}

    def feed(self, code: str, connection_id: str | None, channel_id: int | None,
             event: str | None = None, container: str | None = None) -> str | None:
        """Take one record; None if allowed, else the problem. RecordError: not routable."""
        specs = self.emitters.get(code)
        if specs is None:
            if code in CATALOG:
                return None  # a catalog code no lifecycle emits: nothing to check
            raise RecordError(f"unknown code {code!r} (not in the catalog)")
        instance: Instance | ServerPool
        if specs == {"container"}:
            if container is None:
                raise RecordError(f"{code} is a container code, but the record has no container label")
            if container not in self.containers:
                self.containers[container] = Instance(self.automata["container"], f"container ({container})")
            instance = self.containers[container]
        elif specs == {"server"} or (connection_id is None and "server" in specs):
            instance = self.server
        elif connection_id is None:
            kind = "/".join(sorted(specs))
            raise RecordError(f"{code} is a {kind} code, but the record has no connectionId")
        elif specs == {"forward"}:
            if channel_id is None:
                raise RecordError(f"{code} is a forward code, but the record has no channelId")
            key = (connection_id, channel_id)
            if key not in self.forwards:
                return (f"forward ({connection_id}/{channel_id}): the channel was never opened "
                        f"(no {OPENS_FORWARD} before), saw {code}")
            instance = self.forwards[key]
        elif "session" in specs and channel_id is not None:
            key = (connection_id, channel_id)
            if key not in self.sessions:
                if self.opens_channels:
                    return (f"session ({connection_id}/{channel_id}): the channel was never opened "
                            f"(no {OPENS_CHANNEL} before), saw {code}")
                self.sessions[key] = self._new_session(key)
            instance = self.sessions[key]
        elif "connection" in specs:
            if connection_id not in self.connections:
                self.connections[connection_id] = Instance(self.automata["connection"],
                                                           f"connection ({connection_id})")
            instance = self.connections[connection_id]
        else:
            raise RecordError(f"{code} is a session code, but the record has no channelId")
        problem = instance.feed(code, event, self.track)
        if problem is not None:
            return problem
        self.codes_seen[instance.automaton.name].add(code)
        if instance.automaton.name == "connection" and connection_id is not None and channel_id is not None:
            key = (connection_id, channel_id)
            if code == OPENS_CHANNEL:
                if key in self.sessions:
                    return f"session ({connection_id}/{channel_id}): opened twice, saw {code}"
                self.sessions[key] = self._new_session(key)
            elif code == REFUSES_CHANNEL and key in self.sessions and self.sessions[key].records == 0:
                del self.sessions[key]  # the backend failed the channel it was just given
            elif code == OPENS_FORWARD:
                if key in self.forwards:
                    return f"forward ({connection_id}/{channel_id}): opened twice, saw {code}"
                self.forwards[key] = Instance(self.automata["forward"], f"forward ({key[0]}/{key[1]})")
        return None

    def _new_session(self, key: tuple[str, int]) -> Instance:
        return Instance(self.automata["session"], f"session ({key[0]}/{key[1]})")

    def instances(self) -> Iterator[Instance | ServerPool]:
        yield self.server
        yield from self.connections.values()
        yield from self.sessions.values()
        yield from self.forwards.values()
        yield from self.containers.values()

    def unfinished(self) -> list[str]:
        """For ``--complete``: every instance that cannot be finished, and why."""
        return [p for i in self.instances() if (p := i.unfinished()) is not None]

    def credited(self) -> dict[str, set[int]]:
        """Per spec, the transitions credited so far (needs ``track=True``)."""
        out: dict[str, set[int]] = {name: set() for name in self.automata}
        for instance in self.instances():
            out[instance.automaton.name] |= instance.credited()
        return out


@dataclass(frozen=True)
class SpecCoverage:
    """What the logs exercised of one spec."""

    name: str
    transitions: tuple[Entry, ...]
    exercised: frozenset[int]  # indexes into transitions
    codes: tuple[str, ...]  # every code the spec can emit, sorted
    codes_seen: frozenset[str]

    def percent(self) -> float:
        return 100.0 * len(self.exercised) / len(self.transitions) if self.transitions else 100.0

    def summary(self) -> str:
        """``connection: 41/58 transitions (70.7%), 24/26 codes``."""
        return (f"{self.name}: {len(self.exercised)}/{len(self.transitions)} transitions "
                f"({self.percent():.1f}%), {len(self.codes_seen)}/{len(self.codes)} codes")


def coverage(automata: Mapping[str, CodeAutomaton], credited: Mapping[str, Collection[int]],
             codes_seen: Mapping[str, Collection[str]]) -> list[SpecCoverage]:
    return [SpecCoverage(name, tuple(a.transitions), frozenset(credited.get(name, ())),
                         tuple(sorted(a.codes)), frozenset(codes_seen.get(name, ())))
            for name, a in automata.items()]
