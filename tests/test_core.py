"""The declarative core: catalog, spec validation, compiled table vs transitions, diagrams."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshspec.codes import CATALOG, as_json, markdown_table
from sshspec.fsm.diagram import render
from sshspec.fsm.machine import Machine, UnknownEvent, reference_machine
from sshspec.fsm.spec import BUNDLED, SpecError, bundled_path, load_spec

ROOT = Path(__file__).resolve().parent.parent
CONTAINERSSH_CODES = """
SSH_ALREADY_RUNNING SSH_AUTH_FAILED SSH_AUTH_SUCCESSFUL SSH_AUTH_UNAVAILABLE SSH_AVAILABLE
SSH_BACKEND_REJECTED_HANDSHAKE SSH_CHANNEL_REQUEST SSH_CHANNEL_REQUEST_FAILED
SSH_CHANNEL_REQUEST_SUCCESSFUL SSH_CONNECTED SSH_DECODE_FAILED SSH_DISCONNECTED SSH_EXIT
SSH_EXIT_CODE_FAILED SSH_EXIT_SIGNAL SSH_HANDSHAKE_FAILED SSH_HANDSHAKE_SUCCESSFUL
SSH_LISTEN_CLOSE_FAILED SSH_NEW_CHANNEL SSH_NEW_CHANNEL_REJECTED SSH_REPLY_SEND_FAILED
SSH_SOCKET_REUSE_FAILED SSH_START_FAILED SSH_UNSUPPORTED_CHANNEL_TYPE SSH_UNSUPPORTED_GLOBAL_REQUEST
""".split()


def test_catalog_holds_the_containerssh_codes() -> None:
    assert len(CONTAINERSSH_CODES) == 25
    for code in CONTAINERSSH_CODES:
        assert code in CATALOG, code
        assert CATALOG[code].origin == "containerssh"
        assert CATALOG[code].explanation


def test_every_catalog_code_is_emitted_by_some_transition() -> None:
    emitted = {code for name in BUNDLED for entries in load_spec(name).table.values()
               for entry in entries for code in entry.codes}
    assert set(CATALOG) - emitted == set()


def test_codes_md_is_the_catalog_output() -> None:
    out = subprocess.run([sys.executable, "-m", "sshspec.adapters.cli", "codes"],
                         capture_output=True, text=True, check=True).stdout
    assert out == markdown_table()
    assert (ROOT / "CODES.md").read_text() == out, "CODES.md is stale: sshspec codes > CODES.md"
    rows = [line.split("`")[1] for line in out.splitlines()[2:]]
    assert rows == sorted(rows) and len(rows) == len(CATALOG)


def test_codes_json() -> None:
    import json
    entries = json.loads(as_json())
    assert {e["code"] for e in entries} == set(CATALOG)


# --- validation: each broken spec is refused with the file and the path inside it.

GOOD = """
machine: demo
doc: demo
initial: a
final: [c]
states: {a: A, b: B, c: C}
events: {go: Go, stop: Stop}
replies: {ok: Ok}
counters: {n: N}
limits: {max: {default: 2}}
transitions:
  - {from: a, event: go, to: b, guard: n < max, do: [n += 1], emit: [SSH_CONNECTED], reply: ok}
  - {from: a, event: go, guard: n >= max, emit: [SSH_AUTH_FAILED]}
  - {from: [a, b], event: stop, to: c, emit: [SSH_DISCONNECTED]}
  - {from: b, event: go, to: a}
ignore:
  - {in: c, event: "*"}
"""


def _load(text: str) -> object:
    return load_spec("demo.yaml", text=text.encode())


def test_good_demo_spec_loads() -> None:
    loaded = load_spec("demo.yaml", text=GOOD.encode())
    m = Machine(loaded)
    i = m.new()
    assert m.fire(i, "go").codes == ("SSH_CONNECTED",) and i.state == "b"
    m.fire(i, "go")
    assert m.fire(i, "go").target == "b"
    m.fire(i, "go")
    step = m.fire(i, "go")  # n reached max: the guard's other branch
    assert step.codes == ("SSH_AUTH_FAILED",) and i.state == "a"


@pytest.mark.parametrize("broken, message", [
    (GOOD.replace("emit: [SSH_CONNECTED]", "emit: [SSH_NOPE]"),
     "demo.yaml: transitions[0].emit[0]: unknown code 'SSH_NOPE'"),
    (GOOD.replace("to: b, guard", "to: z, guard"), "demo.yaml: transitions[0].to: unknown state 'z'"),
    (GOOD.replace("{from: b, event: go, to: a}", "{from: b, event: jump, to: a}"),
     "demo.yaml: transitions[3].event: unknown event 'jump'"),
    (GOOD.replace("  - {from: b, event: go, to: a}\n", ""),
     "demo.yaml: gap: in state 'b' event 'go' is neither a transition nor refused nor ignored"),
    (GOOD.replace("states: {a: A, b: B, c: C}", "states: {a: A, b: B, c: C, d: D}")
     .replace('{in: c, event: "*"}', '{in: [c, d], event: "*"}'),
     "demo.yaml: states.d: unreachable from 'a'"),
    (GOOD.replace("final: [c]", "final: [c]").replace("{from: [a, b], event: stop", "{from: [a], event: stop")
     .replace("{from: b, event: go, to: a}", "{from: b, event: go}") + "  - {in: b, event: stop}\n",
     "demo.yaml: states.b: not final and has no way out"),
    (GOOD.replace("  - {from: a, event: go, guard: n >= max, emit: [SSH_AUTH_FAILED]}\n",
                  "  - {from: a, event: go, emit: [SSH_AUTH_FAILED]}\n"),
     "demo.yaml: transitions[1]: in state 'a' event 'go' has 2 outcomes not told apart"),
    (GOOD.replace("  - {from: a, event: go, guard: n >= max, emit: [SSH_AUTH_FAILED]}\n", ""),
     "demo.yaml: transitions[0].guard: in state 'a' event 'go' is undefined when n < max is false"),
    (GOOD.replace("guard: n < max", "guard: n < maxx"),
     "demo.yaml: transitions[0].guard: unknown limit 'maxx'"),
    (GOOD.replace("reply: ok}", "reply: okk}"), "demo.yaml: transitions[0].reply: unknown reply 'okk'"),
    (GOOD.replace("initial: a", "initial: a\nsurprise: 1"),
     "demo.yaml: Object contains unknown field `surprise`"),
    (GOOD.replace("to: b, guard", "to: [b], guard"),
     "demo.yaml: transitions[0].to: Expected `str | null`, got `array`"),
    ("machine: [", "demo.yaml: not valid YAML: line 2, column 1: did not find expected node content"),
    (GOOD.replace("doc: demo", "doc: 2024-02-30"),
     "demo.yaml: not valid YAML: line 3, column 6: cannot read '2024-02-30' as timestamp"),
    # A key written twice: PyYAML alone would keep the last value without a word.
    (GOOD + "machine: again\n", "demo.yaml: machine: duplicate key 'machine' (at line 18, column 1; "
     "first at line 2, column 1)"),
    (GOOD.replace("emit: [SSH_AUTH_FAILED]}", "emit: [SSH_AUTH_FAILED], emit: [SSH_CONNECTED]}"),
     "demo.yaml: transitions[1].emit: duplicate key 'emit' (at line 13, column 68; "
     "first at line 13, column 43)"),
    (GOOD.replace("{from: b, event: go, to: a}", '{from: b, event: go, to: a, "to": c}'),
     "demo.yaml: transitions[3].to: duplicate key 'to'"),
    (GOOD.replace("states: {a: A, b: B, c: C}", "states: {a: A, b: B, c: C, b: Again}"),
     "demo.yaml: states.b: duplicate key 'b'"),
    (GOOD.replace("{max: {default: 2}}", "{max: {default: 2, doc: x, default: 3}}"),
     "demo.yaml: limits.max.default: duplicate key 'default'"),
])
def test_broken_specs_are_refused_naming_file_and_path(broken: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        _load(broken)
    assert message in str(info.value), str(info.value)
    assert len(info.value.problems) >= 1 and all("\n" not in p for p in info.value.problems)


# GOOD's last transition in block style, the way the bundled specs write long rows.
BLOCK_ROW = """\
  - from: b
    event: go
    to: a
    doc: back
"""


def test_block_style_rows_load_like_flow_style_rows() -> None:
    block = load_spec("demo.yaml", text=GOOD.replace("  - {from: b, event: go, to: a}\n", BLOCK_ROW).encode())
    flow = load_spec("demo.yaml", text=GOOD.encode())
    assert [(e.source, e.event, e.target) for es in block.table.values() for e in es] == \
        [(e.source, e.event, e.target) for es in flow.table.values() for e in es]


def test_duplicate_key_in_a_block_style_row_is_refused() -> None:
    row = BLOCK_ROW.replace("    doc: back\n", "    doc: back\n    to: c\n")
    with pytest.raises(SpecError) as info:
        _load(GOOD.replace("  - {from: b, event: go, to: a}\n", row))
    assert str(info.value) == ("demo.yaml: transitions[3].to: duplicate key 'to' "
                               "(at line 19, column 5; first at line 17, column 5)")


def test_bundled_spec_broken_on_disk_is_named(tmp_path: Path) -> None:
    text = bundled_path("session").read_text().replace("SSH_EXIT_SIGNAL]", "SSH_EXIT_SIGNALS]")
    path = tmp_path / "session.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=re.escape(f"{path}: transitions[")) as info:
        load_spec(str(path))
    assert "unknown code 'SSH_EXIT_SIGNALS'" in str(info.value)


def test_unknown_event_is_a_caller_bug() -> None:
    m = Machine.load("session")
    with pytest.raises(UnknownEvent, match="session: unknown event 'teleport'"):
        m.fire(m.new(), "teleport")


# --- the compiled table and the transitions machine agree on every sequence.

MACHINES = {name: Machine.load(name, {"maxAuthTries": 3, "maxSessions": 2, "maxEnv": 2,
                                       "clientAliveCountMax": 2, "maxStartups": 2})
            for name in BUNDLED}


@pytest.mark.parametrize("name", BUNDLED)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_compiled_table_matches_transitions(name: str, data: st.DataObject) -> None:
    machine = MACHINES[name]
    events = list(machine.loaded.spec.events)
    sequence = data.draw(st.lists(st.sampled_from(events), max_size=60))
    reference, model = reference_machine(machine.loaded, machine.limits)
    instance = machine.new()
    compiled_codes: list[str] = []
    for event in sequence:
        step = machine.fire(instance, event)
        compiled_codes.extend(step.codes)
        model.trigger(event)  # type: ignore[attr-defined]
        assert instance.state == model.state, (sequence, event)  # type: ignore[attr-defined]
        assert step.reply == model.replies[-1]
        for counter in machine.counters:
            assert getattr(instance, counter) == getattr(model, counter)
    assert compiled_codes == model.emitted


def test_exactly_one_disconnected_per_connected() -> None:
    # Property over the compiled machine: along any path the count of
    # SSH_DISCONNECTED never exceeds SSH_CONNECTED, and reaching `closed`
    # after connecting means exactly one.
    machine = MACHINES["connection"]
    events = list(machine.loaded.spec.events)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.sampled_from(events), max_size=80))
    def check(sequence: list[str]) -> None:
        instance = machine.new()
        codes: list[str] = []
        for event in sequence:
            codes.extend(machine.fire(instance, event).codes)
        assert codes.count("SSH_DISCONNECTED") <= codes.count("SSH_CONNECTED") <= 1
        if instance.state == "closed" and "SSH_CONNECTED" in codes:
            assert codes.count("SSH_DISCONNECTED") == 1

    check()


def test_no_channel_or_global_request_before_authentication() -> None:
    """asyncssh stops connection-layer messages before authentication and the adapter
    fires protocol_error: the channel events change nothing before `established`,
    and a protocol error there ends the connection with DISCONNECT(2)."""
    machine = MACHINES["connection"]
    alive = set(machine.loaded.spec.groups["alive"])
    for state in machine.loaded.spec.states:
        if state in alive:
            continue
        for event in ("session_open", "channel_open_unsupported", "channel_open_malformed",
                      "global_request", "global_request_malformed"):
            for step in machine.steps(state, event):
                # Never fired there (fails closed if it were); after the end, nothing to do.
                kind = "ignore" if state == "closed" else "impossible"
                assert step.kind == kind and step.reply is None and step.target == state, (state, event)
    for state in machine.loaded.spec.groups["preauth"]:
        for step in machine.steps(state, "protocol_error"):
            assert step.target == "closed" and step.reply == "disconnect_protocol"


def test_every_request_gets_exactly_one_outcome() -> None:
    machine = MACHINES["session"]
    events = list(machine.loaded.spec.events)
    requests = set(machine.loaded.spec.groups["requests"])
    outcome = {"SSH_CHANNEL_REQUEST_SUCCESSFUL", "SSH_CHANNEL_REQUEST_FAILED"}

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.sampled_from(events), max_size=60))
    def check(sequence: list[str]) -> None:
        instance = machine.new()
        open_requests = 0
        for event in sequence:
            step = machine.fire(instance, event)
            for code in step.codes:
                if code == "SSH_CHANNEL_REQUEST":
                    open_requests += 1
                    assert event in requests
                elif code in outcome:
                    open_requests -= 1
                    assert open_requests >= 0
            if instance.state in ("setup", "running", "exited", "closed"):
                assert open_requests == 0, sequence
        # exit status at most once, never after close
        return None

    check()


def test_program_starts_at_most_once_and_exit_status_once() -> None:
    m = MACHINES["session"]
    i = m.new()
    m.fire(i, "exec")
    m.fire(i, "request_ok")
    assert m.fire(i, "exec").codes == ("SSH_CHANNEL_REQUEST", "SSH_CHANNEL_REQUEST_FAILED")
    assert m.fire(i, "program_exited").reply == "send_exit_status"
    second = m.fire(i, "program_exited")  # the adapter waits once: a second end is a spec violation
    assert second.kind == "impossible" and second.codes == ("SSH_SPEC_VIOLATION",) and second.reply is None
    m.fire(i, "close")
    assert m.fire(i, "program_killed").reply is None and i.state == "closed"


# --- diagrams

@pytest.mark.parametrize("name", BUNDLED)
def test_mermaid_and_dot_carry_codes(name: str) -> None:
    loaded = load_spec(name)
    mermaid = render(loaded, "mermaid")
    dot = render(loaded, "dot")
    assert mermaid.startswith("---\ntitle: ") and "stateDiagram-v2" in mermaid
    for entry in loaded.transitions():
        label = entry.event + (" / " + ", ".join(entry.codes) if entry.codes else "")
        if entry.guard is None:
            assert label in mermaid and label in dot, label


def test_readme_diagrams_are_current() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in BUNDLED:
        block = f"```mermaid\n{render(load_spec(name), 'mermaid')}```"
        assert block in readme, f"README's {name} diagram is stale: run `make generated`"


def test_diagram_cli_svg(tmp_path: Path) -> None:
    import shutil
    out = tmp_path / "connection.svg"
    done = subprocess.run([sys.executable, "-m", "sshspec.adapters.cli", "diagram", "connection",
                           "--format", "svg", "-o", str(out)], capture_output=True, text=True)
    if shutil.which("dot") is None:
        assert done.returncode == 1 and "apt-get install graphviz" in done.stderr
        pytest.fail("Graphviz is not installed: `make test` installs it (.ci/system-packages)")
    assert done.returncode == 0, done.stderr
    svg = out.read_text()
    assert svg.lstrip().startswith(("<?xml", "<svg")) and "SSH_NEW_CHANNEL" in svg


def test_diagram_cli_refuses_broken_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(GOOD.replace("emit: [SSH_CONNECTED]", "emit: [SSH_NOPE]"))
    done = subprocess.run([sys.executable, "-m", "sshspec.adapters.cli", "diagram", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{path}: transitions[0].emit[0]: unknown code 'SSH_NOPE'" in done.stderr
    assert "Traceback" not in done.stderr


def test_diagram_cli_refuses_spec_file_with_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(GOOD.replace("{from: b, event: go, to: a}", "{from: b, event: go, to: a, to: c}"))
    done = subprocess.run([sys.executable, "-m", "sshspec.adapters.cli", "diagram", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(f"sshspec diagram: {path}: transitions[3].to: duplicate key 'to' (at line ")
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_mypy_path_links_each_package_dir() -> None:
    """mypy finds `sshspec.X` through the symlink .mypy/sshspec/X (pyproject.toml says
    why); a package added to package-dir without its link would go unchecked."""
    import tomllib
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    links = ROOT / ".mypy" / "sshspec"
    assert sorted(f"sshspec.{p.name}" for p in links.iterdir()) == sorted(package_dir)
    for package, folder in package_dir.items():
        link = links / package.removeprefix("sshspec.")
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), package


def test_spec_schema_file_is_current() -> None:
    from sshspec.fsm.spec import spec_schema
    assert (ROOT / "spec.schema.json").read_bytes() == spec_schema(), "run `make generated`"
