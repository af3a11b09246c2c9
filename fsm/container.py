"""The container lifecycle's core: sans-I/O, like `fsm/core.py`, one per container.

The docker backend (``adapters/backend_docker.py``) hands a `ContainerCore` what
happens to one container (its owner needs it or ended, the engine answered an
operation) and carries out the actions it gets back: an engine operation
(`Engine`), the owner's answer (`Ready` or `Refused`), `Lost` when it ended under
its owner (the owner is to be ended), and `Finished` when the container reached a
final state. What may happen when is `specs/container.yaml`;
this module adds only what a table cannot say:

* ``docker.maxContainers``: the `ContainerPool` counts the containers owners asked
  for that have not finished, and a new one is `provide` below the limit,
  `over_limit` at it (the way `core.py` tells a request from a request_overflow);
* the owner's answer, once: it waits from `provide` until the container runs
  (`Ready`) or leaves the way up (`Refused`, with the engine's reason);
* the seam: the spec's events and replies must be exactly `ContainerEvent` and
  `ContainerReply` (`ContainerMachine.load` refuses a spec that differs).

No sockets, no asyncio, no clock: the adapter times the operations out (a timeout
is the operation's failure event, with the reason).
"""

from __future__ import annotations

import enum
from typing import Protocol

from sshspec.fsm.core import SeamError, _Message, check_seam, violation_reason
from sshspec.fsm.machine import Machine
from sshspec.fsm.spec import LoadedSpec, load_spec

__all__ = [
    "Action", "ContainerCore", "ContainerEvent", "ContainerMachine", "ContainerPool", "ContainerReply",
    "Engine", "Finished", "Lost", "Ready", "Refused", "SeamError",
]


class ContainerEvent(enum.StrEnum):
    provide = "provide"
    over_limit = "over_limit"
    orphan = "orphan"
    pull_started = "pull_started"
    pulled = "pulled"
    pull_failed = "pull_failed"
    created = "created"
    create_failed = "create_failed"
    started = "started"
    start_failed = "start_failed"
    release = "release"
    stopped = "stopped"
    stop_failed = "stop_failed"
    gone = "gone"
    remove_failed = "remove_failed"
    died = "died"
    exec_failed = "exec_failed"
    signal_failed = "signal_failed"
    resize_failed = "resize_failed"
    exit_code_failed = "exit_code_failed"
    agent_read_failed = "agent_read_failed"
    sweep_failed = "sweep_failed"


class ContainerReply(enum.StrEnum):
    pull = "pull"
    create = "create"
    start = "start"
    stop = "stop"
    remove = "remove"


class Engine(_Message, frozen=True):
    """Ask the engine for an operation; its answer comes back as the events the
    spec's reply names (e.g. create: created or create_failed)."""

    op: ContainerReply


class Ready(_Message, frozen=True):
    """The container runs: the owner's programs may start in it."""


class Refused(_Message, frozen=True):
    """The container will not run for its owner (the reason says why)."""

    reason: str


class Lost(_Message, frozen=True):
    """The container ended under its owner (it left running, not released): end the owner."""

    reason: str


class Finished(_Message, frozen=True):
    """The container reached a final state (removed, or failed): forget it."""

    state: str


Action = Engine | Ready | Refused | Lost | Finished

# The states on the way up: an owner waiting for its container keeps waiting in them.
_COMING_UP = frozenset({"new", "pulling", "creating", "starting"})


class ContainerLogSink(Protocol):
    """Where a step's codes go; the adapter adds which container and whose."""

    def __call__(self, codes: tuple[str, ...], event: str, reason: str | None) -> None: ...


class ContainerMachine:
    """The container spec, compiled and checked against the core's alphabets."""

    def __init__(self, loaded: LoadedSpec | None = None) -> None:
        loaded = loaded or load_spec("container")
        check_seam(loaded, ContainerEvent, ContainerReply)
        self.machine = Machine(loaded)

    @classmethod
    def load(cls) -> ContainerMachine:
        return cls()


class ContainerPool:
    """The containers of one server process: ``docker.maxContainers`` is counted here."""

    def __init__(self, machine: ContainerMachine, max_containers: int) -> None:
        self.machine = machine.machine
        self.max_containers = max_containers
        self.owned = 0  # containers owners asked for (provide) that have not finished

    def new(self, log: ContainerLogSink) -> ContainerCore:
        return ContainerCore(self, log)


class ContainerCore:
    """One container: its machine instance, and whether its owner still waits."""

    def __init__(self, pool: ContainerPool, log: ContainerLogSink) -> None:
        self.pool = pool
        self.machine = pool.machine
        self.instance = self.machine.new()
        self.log = log
        self.owned = False  # counted in pool.owned
        self.waiting = False  # the owner waits for Ready or Refused
        self.out: list[Action] = []

    @property
    def state(self) -> str:
        return str(self.instance.state)

    @property
    def final(self) -> bool:
        return self.state in self.machine.final

    # -- the ways an instance is made: its first event

    def provide(self) -> list[Action]:
        """Its owner needs it: within docker.maxContainers, or over it."""
        self.out = []
        self.waiting = True
        if self.pool.owned < self.pool.max_containers:
            self.pool.owned += 1
            self.owned = True
            self._fire(ContainerEvent.provide, None)
        else:
            self._fire(ContainerEvent.over_limit,
                       f"docker.maxContainers ({self.pool.max_containers}) containers exist already")
        return self.out

    def orphan(self, reason: str) -> list[Action]:
        """Found at start-up, left by a server process that is gone."""
        self.out = []
        self._fire(ContainerEvent.orphan, reason)
        return self.out

    def sweep_failed(self, reason: str) -> list[Action]:
        """Stands for the start-up sweep, whose list of containers the engine did not give."""
        self.out = []
        self._fire(ContainerEvent.sweep_failed, reason)
        return self.out

    # -- everything after

    def handle(self, event: ContainerEvent, reason: str | None = None) -> list[Action]:
        self.out = []
        self._fire(event, reason)
        return self.out

    def _fire(self, event: ContainerEvent, reason: str | None) -> None:
        step = self.machine.fire(self.instance, event)
        if step.kind == "impossible":
            self.log(step.codes, event, violation_reason(self.machine, step))
            if self.waiting:  # fail closed: nothing runs for the owner
                self.waiting = False
                self.out.append(Refused(f"spec violation: {event} in {step.source}"))
            return
        if step.codes:
            self.log(step.codes, event, reason)
        if self.waiting and step.target == "running":
            self.waiting = False
            self.out.append(Ready())
        elif self.waiting and step.target not in _COMING_UP:
            self.waiting = False
            self.out.append(Refused(reason or f"the container is {step.target} ({event})"))
        if step.source == "running" and step.target != "running" and event is not ContainerEvent.release:
            self.out.append(Lost(reason or f"the container is {step.target} ({event})"))
        if step.reply is not None:
            self.out.append(Engine(ContainerReply(step.reply)))
        if step.target in self.machine.final and step.source not in self.machine.final:
            if self.owned:
                self.owned = False
                self.pool.owned -= 1
            self.out.append(Finished(step.target))
