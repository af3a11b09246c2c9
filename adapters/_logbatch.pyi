"""Types of the C module adapters/_logbatch.c (its header comment says what each does).

For the type checker only; tests/test_logs.py runs mypy's stubtest on the built
module, so this file and the C file cannot drift apart unnoticed.
"""

from collections.abc import Callable
from typing import Any, final

@final
class Queue:
    """Logger.add, with the queued steps in C arrays."""

    def __new__(cls, due: Callable[[], None], limit: int, step: int) -> Queue: ...
    def __call__(self, *args: Any) -> None: ...  # (records, *labels): one step
    def __len__(self) -> int: ...
    def json(self, keys: tuple[bytes, ...], /) -> bytes | None: ...
    def items(self) -> list[Any]: ...

def json_batch(queued: list[Any], keys: tuple[bytes, ...], /) -> bytes | None: ...
