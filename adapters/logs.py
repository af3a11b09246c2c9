"""Structured log output: one record per emitted message code.

JSON lines (the default) are what the log checker reads back with `decode_record`::

    {"timestamp":"2026-11-28T10:37:26.123456Z","level":"info","code":"SSH_CONNECTED",
     "message":"...","labels":{"connectionId":"...","remoteAddr":"127.0.0.1:5555"}}

(one line per record; labels that are not set are left out). The `text` format is
for people watching a terminal::

    2026-11-28T10:37:26Z info  SSH_CONNECTED  message  connectionId=... remoteAddr=...

Every record is written as soon as it is logged (one os.write per record, or per
step for the codes one step emits, to a file opened with O_APPEND; write+flush for
a stream), so a crash loses at most the records being written. The logger is
meant for the server's event loop; its only state between records is a cache of
encoded fixed parts (filled idempotently), so calls from worker threads are safe too.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated, BinaryIO, Literal

import msgspec

Level = Literal["debug", "info", "warning", "error"]
Format = Literal["json", "text"]

_SEVERITY: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Labels(
    msgspec.Struct,
    omit_defaults=True,
    rename="camel",
    frozen=True,
    gc=False,
    forbid_unknown_fields=True,
):
    """What a record is about. Only the labels that are set end up in the output."""

    connection_id: str | None = None
    remote_addr: str | None = None
    username: str | None = None
    channel_id: int | None = None
    request_type: str | None = None
    method: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    event: str | None = None  # the spec event whose step logged this record (`sshspec check` reads it)


class LogRecord(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    # The pattern and Literal only bite when decoding, i.e. in the log checker.
    timestamp: Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")]
    level: Level
    code: Annotated[str, msgspec.Meta(min_length=1)]
    message: str
    labels: Labels


_LABEL_NAMES: tuple[str, ...] = Labels.__struct_encode_fields__
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LogRecord)

# strftime once per second instead of once per record.
_second_cache: tuple[int, str] = (-1, "")


def _timestamp() -> tuple[str, int]:
    """(`YYYY-MM-DDTHH:MM:SS` in UTC, microseconds)."""
    global _second_cache
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    cached_second, prefix = _second_cache
    if seconds != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        # One tuple assignment, so another thread never sees a torn cache entry.
        _second_cache = (seconds, prefix)
    return prefix, nanos // 1000


def _scrub(text: str) -> str:
    # Lone surrogates (e.g. from surrogateescape-decoded paths) cannot be encoded as
    # UTF-8; escaping them beats letting a log call raise in the middle of an error path.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _scrub_record(record: LogRecord) -> LogRecord:
    labels = record.labels
    changes = {
        field: _scrub(value)
        for field in labels.__struct_fields__
        if isinstance(value := getattr(labels, field), str)
    }
    return msgspec.structs.replace(
        record,
        code=_scrub(record.code),
        message=_scrub(record.message),
        labels=msgspec.structs.replace(labels, **changes),
    )


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}


def _escape(text: str) -> str:
    # Usernames and reasons come from the network: control characters, bidi overrides
    # and newlines must not reach a terminal raw or split one record over two lines.
    return "".join(_ESCAPES.get(c) or (c if c.isprintable() else f"\\u{ord(c):04x}") for c in text)


def _text_value(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    if value and value.isprintable() and not any(c in value for c in ' "=\\'):
        return value
    return f'"{_escape(value)}"'


def format_text(record: LogRecord) -> str:
    """The `text` line for a record (without the newline); the second, not the microsecond."""
    message = record.message if record.message.isprintable() else _escape(record.message)
    line = f"{record.timestamp[:19]}Z {record.level:<5} {record.code}  {message}"
    labels = " ".join(
        f"{name}={_text_value(value)}"
        for name, value in zip(_LABEL_NAMES, msgspec.structs.astuple(record.labels), strict=True)
        if value is not None
    )
    return f"{line}  {labels}" if labels else line


class Logger:
    """Writes records at or above `level` to `path` (appending), `stream`, or stdout."""

    def __init__(
        self,
        *,
        level: str = "debug",
        format: str = "json",
        stream: BinaryIO | None = None,
        path: str | None = None,
    ) -> None:
        if level not in _SEVERITY:
            raise ValueError(f"unknown log level {level!r}; expected one of {list(_SEVERITY)}")
        if format not in ("json", "text"):
            raise ValueError(f"unknown log format {format!r}; expected 'json' or 'text'")
        if stream is not None and path is not None:
            raise ValueError("give a stream or a path, not both")
        self._min_severity = _SEVERITY[level]
        self._text = format == "text"
        self._fd: int | None = None
        self._stream: BinaryIO | None = None
        self._closed = False
        self._heads: dict[tuple[str, str, str], bytes] = {}
        if path is not None:
            # O_APPEND: each os.write lands whole at the end even with several writers
            # (logrotate copytruncate, a second server on the same file).
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        else:
            self._stream = stream if stream is not None else sys.stdout.buffer

    def enabled(self, level: str) -> bool:
        """Whether `level` is logged; an unknown level is a KeyError (a caller's bug)."""
        return _SEVERITY[level] >= self._min_severity

    def log(self, level: str, code: str, message: str, labels: Labels) -> None:
        if _SEVERITY[level] < self._min_severity:
            return
        self.write_lines([self.line(level, code, message, labels)])

    def line(self, level: str, code: str, message: str, labels: Labels) -> bytes:
        """One record, encoded, with its newline (whatever the level: callers filter)."""
        prefix, micros = _timestamp()
        if not self._text:
            # The hot path: the same bytes msgspec writes for a LogRecord, with the
            # fixed part (level, code, message) encoded once per code.
            key = (level, code, message)
            try:
                head = self._heads.get(key)
                if head is None:
                    head = self._heads[key] = b'","level":%s,"code":%s,"message":%s,"labels":' % (
                        _encoder.encode(level), _encoder.encode(code), _encoder.encode(message))
                return b'{"timestamp":"%s.%06dZ%s%s}\n' % (
                    prefix.encode(), micros, head, _encoder.encode(labels))
            except UnicodeEncodeError:
                pass  # a lone surrogate somewhere: the slow path below escapes it
        record = LogRecord(f"{prefix}.{micros:06d}Z", level, code, message, labels)  # type: ignore[arg-type]
        return self._encode(record)

    def write_lines(self, lines: list[bytes]) -> None:
        """Write records at once (one write(2) for all of them, e.g. the codes of one step)."""
        if self._closed:
            raise ValueError("log is closed")
        if lines:
            self._write(lines[0] if len(lines) == 1 else b"".join(lines))

    def _encode(self, record: LogRecord) -> bytes:
        if self._text:
            return format_text(record).encode("utf-8", "backslashreplace") + b"\n"
        try:
            return _encoder.encode(record) + b"\n"
        except UnicodeEncodeError:
            return _encoder.encode(_scrub_record(record)) + b"\n"

    def _write(self, line: bytes) -> None:
        if self._fd is not None:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
        else:
            assert self._stream is not None
            self._stream.write(line)
            self._stream.flush()

    def close(self) -> None:
        """Close the file the logger opened; a stream passed in is only flushed."""
        if self._closed:
            return
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
        elif self._stream is not None:
            self._stream.flush()


def decode_record(line: bytes) -> LogRecord:
    """Parse one JSON log line; ValueError says what is wrong and where."""
    try:
        return _decoder.decode(line)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        shown = line[:120] + (b"..." if len(line) > 120 else b"")
        raise ValueError(f"corrupt log record: {exc}: {shown!r}") from None
