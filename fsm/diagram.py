"""State diagrams drawn from the `transitions` build of a spec.

Edges are labelled ``event [guard] / CODES``; refusals and ignores (which
stay in their state and would bury the picture under self-loops) are left
out: the spec file lists them. Mermaid and dot are text and need nothing
installed; turning dot into svg/png is the caller's business (Graphviz).
"""

from __future__ import annotations

from typing import Literal

from transitions.extensions import GraphMachine

from sshspec.fsm.machine import reference_machine
from sshspec.fsm.spec import LoadedSpec

TextFormat = Literal["mermaid", "dot"]


def render(loaded: LoadedSpec, fmt: TextFormat) -> str:
    engine = "mermaid" if fmt == "mermaid" else "graphviz"
    _, model = reference_machine(
        loaded, machine_class=GraphMachine, transitions_only=True,
        graph_engine=engine, title=loaded.name, show_state_attributes=False)
    graph = model.get_graph()  # type: ignore[attr-defined]  # GraphMachine adds it to the model
    if fmt == "dot":
        return str(graph.source)
    return _tidy_mermaid(str(graph.draw(None)), loaded)


def _tidy_mermaid(text: str, loaded: LoadedSpec) -> str:
    # transitions styles the model's current state as "active": a static
    # diagram has none, so drop the styling; mark final states with [*];
    # write '<' as an entity so guards survive Mermaid's HTML sanitising.
    lines = [line for line in text.splitlines()
             if not line.strip().startswith(("classDef ", "Class "))]
    lines = [line.replace("<", "#lt;") if "-->" in line else line for line in lines]
    if lines[:1] == ["---"] and lines[2:3] == ["---"]:  # front matter wants "title: ..."
        lines[1] = f"title: {lines[1]}"
    lines += [f"  {state} --> [*]" for state in loaded.spec.final]
    return "\n".join(line.rstrip() for line in lines if line.strip()) + "\n"
