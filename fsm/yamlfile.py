"""Reading YAML for the spec files and the config file: PyYAML's safe loader, but a
key written twice in one mapping is an error naming the key's path.

PyYAML (and so ``msgspec.yaml``) keeps the last of two equal keys without a word,
so a spec row with ``emit`` twice would lose the first list silently. ``read_yaml``
refuses that; the caller hands the data to ``msgspec.convert`` for the types, whose
errors carry the same ``$.path`` as ``msgspec.yaml.decode``'s.

Every problem is a ``yaml.YAMLError``; ``yaml_problem`` renders one on one line.
No I/O: the caller reads the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# The C parser when PyYAML was built with libyaml (as msgspec.yaml.decode does); the
# constructor, and so every value, is the same Python SafeConstructor either way.
if TYPE_CHECKING:
    _SafeLoader = yaml.SafeLoader  # the stubs' CSafeLoader is no SafeLoader subclass; same API
else:
    _SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.MarkedYAMLError):
    """``key`` appears twice in one mapping; ``path`` names it (``transitions[3].emit``)."""

    def __init__(self, path: str, key: object, mark: yaml.Mark, first: yaml.Mark) -> None:
        super().__init__(
            problem=f"duplicate key {key!r} (first at line {first.line + 1}, column {first.column + 1})",
            problem_mark=mark,
        )
        self.path = path
        self.key = key
        self.mark = mark
        self.first = first

    @property
    def where(self) -> str:
        """``at line 9, column 40; first at line 9, column 12`` (1-based)."""
        return (f"at line {self.mark.line + 1}, column {self.mark.column + 1}; "
                f"first at line {self.first.line + 1}, column {self.first.column + 1}")


class _Loader(_SafeLoader):
    def construct_object(self, node: Node, deep: bool = False) -> Any:
        # A scalar that matches a type's pattern but not its range (`2024-02-30`, a
        # date) raises ValueError from the constructor, without a mark: give it one.
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, LookupError) as exc:
            what = "this"
            if isinstance(node, ScalarNode):
                what = f"{node.value!r} as {node.tag.rsplit(':', 1)[-1]}"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {what}: {exc}", node.start_mark) from None


def read_yaml(text: bytes | str) -> Any:
    """The one YAML document in ``text`` as plain Python data (None when empty).

    Raises ``DuplicateKeyError`` for a key written twice in a mapping (block or flow
    style, at any depth) and another ``yaml.YAMLError`` for anything else unreadable.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(loader, node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicates(loader: _Loader, root: Node) -> None:
    """Walk the node graph in document order; keys compare as constructed values, so
    ``emit`` and ``"emit"`` are the same key. Merge keys (``<<``) may be overridden
    by explicit ones (YAML says so) and are not compared."""
    seen: set[int] = set()  # an alias is the same node again: walk it once
    stack: list[tuple[str, Node]] = [("", root)]
    while stack:
        path, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        children: list[tuple[str, Node]] = []
        if isinstance(node, MappingNode):
            first: dict[Any, yaml.Mark] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE:
                    continue
                key = loader.construct_object(key_node)
                at = f"{path}.{key}" if path else str(key)
                if key in first:  # a scalar's value is always hashable
                    raise DuplicateKeyError(at, key, key_node.start_mark, first[key])
                first[key] = key_node.start_mark
                children.append((at, value_node))
        elif isinstance(node, SequenceNode):
            children = [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]
        stack.extend(reversed(children))


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: ``line 4, column 1: <problem> (<context>)``."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context:
            problem += f" ({exc.context})"
        return problem
    return " ".join(str(exc).split())
