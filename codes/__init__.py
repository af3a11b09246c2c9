"""The message-code catalog: every code sshspec emits, its log level and meaning.

`catalog.yaml` beside this file is the one data source; `CATALOG` is it, loaded
once and validated by msgspec, keyed by code name.
"""

from __future__ import annotations

import importlib.resources
from typing import Literal

import msgspec

Level = Literal["debug", "info", "warning", "error"]


class Code(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    level: Level
    explanation: str
    origin: Literal["containerssh", "sshspec"] = "containerssh"


class CatalogError(Exception):
    """The catalog file is broken; the message names the file and the entry."""


CATALOG_FILE = "catalog.yaml"
# SSH_: the SSH server's codes; DOCKER_: the container backend's (ContainerSSH's docker module).
PREFIXES = ("SSH_", "DOCKER_")


def load_catalog(text: bytes | None = None) -> dict[str, Code]:
    if text is None:
        text = importlib.resources.files(__name__).joinpath(CATALOG_FILE).read_bytes()
    try:
        raw = msgspec.yaml.decode(text, type=dict[str, Code])
    except msgspec.ValidationError as exc:
        raise CatalogError(f"codes/{CATALOG_FILE}: {exc}") from None
    for name in raw:
        if not name.startswith(PREFIXES) or not name.replace("_", "").isalnum() or not name.isupper():
            raise CatalogError(f"codes/{CATALOG_FILE}: {name}: a code is SSH_ (or DOCKER_, the container "
                               "backend's) and upper-case words")
    return dict(sorted(raw.items()))


CATALOG: dict[str, Code] = load_catalog()


def markdown_table(catalog: dict[str, Code] = CATALOG) -> str:
    """The catalog as `| Code | Explanation |`, sorted by code (CODES.md is this output)."""
    lines = ["| Code | Explanation |", "|------|-------------|"]
    for name, code in sorted(catalog.items()):
        explanation = code.explanation.replace("|", r"\|")
        lines.append(f"| `{name}` | {explanation} |")
    return "\n".join(lines) + "\n"


def as_json(catalog: dict[str, Code] = CATALOG) -> bytes:
    entries = [
        {"code": name, "level": c.level, "origin": c.origin, "explanation": c.explanation}
        for name, c in sorted(catalog.items())
    ]
    return msgspec.json.format(msgspec.json.encode(entries), indent=2) + b"\n"
