"""fsm/container.py, sans-I/O: the container machine's core, the owner's one answer,
docker.maxContainers and the seam with specs/container.yaml."""

from __future__ import annotations

import pytest

from sshspec.fsm.container import (
    ContainerCore,
    ContainerEvent,
    ContainerMachine,
    ContainerPool,
    ContainerReply,
    Engine,
    Finished,
    Ready,
    Refused,
    SeamError,
)
from sshspec.fsm.spec import bundled_path, load_spec

E = ContainerEvent


def pool(limit: int = 2) -> tuple[ContainerPool, list[tuple[str, ...]]]:
    return ContainerPool(ContainerMachine.load(), limit), []


def new(p: ContainerPool, records: list[tuple[str, ...]]) -> ContainerCore:
    return p.new(lambda codes, event, reason: records.append((*codes, event, reason or "")))


def test_up_and_down_with_one_answer_for_the_owner() -> None:
    p, records = pool()
    c = new(p, records)
    assert c.provide() == [Engine(ContainerReply.pull)]
    assert c.handle(E.pull_started) == []
    assert c.handle(E.pulled) == [Engine(ContainerReply.create)]
    assert c.handle(E.created) == [Engine(ContainerReply.start)]
    assert c.handle(E.started) == [Ready()]
    assert p.owned == 1
    assert c.handle(E.release) == [Engine(ContainerReply.stop)]
    assert c.handle(E.stopped) == [Engine(ContainerReply.remove)]
    assert c.handle(E.gone) == [Finished("removed")]
    assert p.owned == 0 and c.final
    assert [r[0] for r in records] == [
        "DOCKER_IMAGE_PULL_NEEDED_CHECKING", "DOCKER_IMAGE_PULL", "DOCKER_CONTAINER_CREATE",
        "DOCKER_CONTAINER_START", "DOCKER_CONTAINER_RUNNING", "DOCKER_CONTAINER_STOP",
        "DOCKER_CONTAINER_REMOVE", "DOCKER_CONTAINER_REMOVE_SUCCESSFUL"]


def test_a_failed_start_refuses_the_owner_once_and_removes_the_container() -> None:
    p, records = pool()
    c = new(p, records)
    c.provide()
    c.handle(E.pulled)
    c.handle(E.created)
    assert c.handle(E.start_failed, "engine: no such file") == [Refused("engine: no such file"),
                                                                Engine(ContainerReply.remove)]
    assert c.handle(E.release) == []  # the owner ends after: nothing to release (ignored)
    assert c.handle(E.gone) == [Finished("removed")]
    assert p.owned == 0


def test_the_owner_leaving_mid_create_leaves_the_container_to_be_removed() -> None:
    p, records = pool()
    c = new(p, records)
    c.provide()
    c.handle(E.pulled)
    assert c.handle(E.release) == [Refused("the container is cancelling (release)")]
    assert c.handle(E.created) == [Engine(ContainerReply.remove)]
    assert c.handle(E.gone) == [Finished("removed")]


def test_max_containers_counts_the_owned_until_they_finish() -> None:
    p, records = pool(limit=1)
    first = new(p, records)
    first.provide()
    second = new(p, records)
    assert second.provide() == [Refused("docker.maxContainers (1) containers exist already"),
                                Finished("failed")]
    assert records[-1][0] == "DOCKER_CONTAINER_LIMIT"
    assert first.handle(E.pull_failed, "no image") == [Refused("no image"), Finished("failed")]
    third = new(p, records)
    assert third.provide() == [Engine(ContainerReply.pull)]  # room again
    orphan = new(p, records)
    assert orphan.orphan("left behind") == [Engine(ContainerReply.remove)]  # not counted
    assert p.owned == 1


def test_an_impossible_event_is_logged_and_refuses_a_waiting_owner() -> None:
    p, records = pool()
    c = new(p, records)
    c.provide()
    assert c.handle(E.stopped) == [Refused("spec violation: stopped in pulling")]
    assert records[-1][0] == "SSH_SPEC_VIOLATION" and c.state == "pulling"


def test_the_seam_refuses_a_spec_whose_alphabet_differs(tmp_path: object) -> None:
    text = bundled_path("container").read_text().replace("remove_failed", "remove_broke")
    with pytest.raises(SeamError, match="remove_broke"):
        ContainerMachine(load_spec("container.yaml", text=text.encode()))
