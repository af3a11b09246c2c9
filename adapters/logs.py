"""Structured log output: one record per emitted message code.

JSON lines (the default) are what the log checker reads back with `decode_record`::

    {"timestamp":"2026-11-28T10:37:26.123456Z","level":"info","code":"SSH_CONNECTED",
     "message":"...","labels":{"connectionId":"...","remoteAddr":"127.0.0.1:5555"}}

(one line per record; labels that are not set are left out). The `text` format is
for people watching a terminal::

    2026-11-28T10:37:26Z info  SSH_CONNECTED  message  connectionId=... remoteAddr=...

Writing: with ``flush_interval=0`` every step's records are written (one os.write
to a file opened with O_APPEND; write+flush for a stream) before the step's reply
goes out. With an interval (the server's default, `log.flushInterval: 100ms`) a
step's records are only queued: the first of a batch arms a timer on the running
event loop, and the whole batch is encoded and written in one os.write when it
fires, when MAX_QUEUED steps wait, or at close. Why: timed inside the server over
1,000 bench connections, a record written at once cost ~14 us of the event loop
(4 us encoding, 5 us write(2), cold, once per record), ~9% of a connection's CPU
with 12 records each. Batched, debug logging cost (server CPU per connection over
error level, servers side by side, bench/) +6% with a 10 ms interval, +2.3-3% with
100 ms, no less with 500 ms: fewer, longer batches are cheaper per record.

A step queues only its time, its records (Kinds) and its Labels, which the caller
built (the server: one positional Labels call per step); the batch makes a LogRecord
per record, a timestamp's text once per millisecond, and msgspec encodes them all in
one `Encoder.encode_lines` call, the one JSON encoder here. The log's own
instructions per benchmark connection (`.venv/bin/python bench/log_instructions.py`,
debug minus error): 110.7-111.2k at 8f08055, 123.9k before (3b70f5b). Side by side that
still costs ~3.4% of the server's CPU (debug / error 1.034, interval 1.025-1.042,
`bench/run.py --side-only --sets 30`), against +0.7-1.8% with the C encoder this
replaced: the 2% target is not met (README, Performance).
Records keep their order and their own timestamps. The server's `log.durable`
(the default) writes what is queued before any action a client sees goes out, so
a SIGKILL loses only records of what no client saw yet: once an event-loop turn,
before that turn's packets go (asyncssh_internals._Turn), for every connection
at once (at the bench's 16 connections in flight, ~1.9 writes a connection
instead of 5 when each action wrote first); without it a client may
see a reply up to the interval before its record is in the file, and a SIGKILL
loses at most the last interval's records (a stop, or an exception out of
`serve`, writes them).
The logger belongs to one thread (the event loop's, or a plain caller's with no
loop running).
"""

from __future__ import annotations

import asyncio
import os
import select
import sys
import time
from typing import Annotated, BinaryIO, Literal

import msgspec

Level = Literal["debug", "info", "warning", "error"]
Format = Literal["json", "text"]

_SEVERITY: dict[str, int] = {"debug": 10, "info": 20, "warning": 30, "error": 40}
MAX_QUEUED = 1024  # steps (~200 KiB): a burst is written at once rather than held in memory


class Kind(msgspec.Struct, frozen=True, gc=False):
    """What a record's code fixes (level, code, message); the rest of a record is its
    time and labels. gc=False: a queued step then holds nothing the collector has to
    keep visiting."""

    level: str
    code: str
    message: str


_KINDS: dict[tuple[str, str, str], Kind] = {}


def kind(level: str, code: str, message: str) -> Kind:
    """The one Kind of these (made on first use; the server makes its own up front)."""
    found = _KINDS.get((level, code, message))
    if found is None:
        found = _KINDS[level, code, message] = Kind(level, code, message)
    return found


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
    # The public key of the connection's last publickey request (the one that logged
    # in, once it did), as OpenSSH prints it: "SHA256:" and unpadded base64.
    key_fingerprint: str | None = None
    channel_id: int | None = None
    request_type: str | None = None
    command: str | None = None  # the exec command or subsystem name (request's, or the channel's program's)
    method: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    event: str | None = None  # the spec event whose step logged this record (`sshspec check` reads it)
    container: str | None = None  # the docker backend's container (its name) the record is about


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
# A timestamp's fraction from two tables (milliseconds, microseconds), about half the cost of formatting
# the number for every step.
_MILLIS = [f"{n:03d}" for n in range(1000)]
_MICROS_Z = [f"{n:03d}Z" for n in range(1000)]
_NO_SECOND = -(1 << 80)  # before every time_ns, so a batch's first step makes its second's text


class _Seconds:
    """The text of the last second a batch stamped, kept from batch to batch: a
    durable log writes a few records at a time, and making a second's text (gmtime,
    strftime) for each of those small batches cost more than the rest of it."""

    __slots__ = ("second_ns", "prefix")

    def __init__(self) -> None:
        self.second_ns, self.prefix = _NO_SECOND, ""

    def text(self, ms_ns: int) -> tuple[int, str]:
        if not 0 <= ms_ns - self.second_ns < 1_000_000_000:
            self.second_ns = ms_ns - ms_ns % 1_000_000_000
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(self.second_ns // 1_000_000_000))
        return self.second_ns, self.prefix


def _records(queued: list[tuple[int, tuple[Kind, ...], Labels]], seconds: _Seconds) -> list[LogRecord]:
    """The LogRecords of queued steps, in order. A step's time is split against the
    start of its millisecond (small ints are cheap, a time_ns is not), whose text is
    made once per millisecond (a busy server logs several steps in one), and that
    text's second once per second."""
    out: list[LogRecord] = []
    ms_ns, ms_prefix = _NO_SECOND, ""
    for ns, kinds, labels in queued:
        into = ns - ms_ns
        if not 0 <= into < 1_000_000:
            ms_ns = ns - ns % 1_000_000
            into = ns - ms_ns
            second_ns, prefix = seconds.text(ms_ns)
            ms_prefix = prefix + _MILLIS[(ms_ns - second_ns) // 1_000_000]
        stamp = ms_prefix + _MICROS_Z[into // 1000]
        for k in kinds:
            out.append(LogRecord(stamp, k.level, k.code, k.message, labels))  # type: ignore[arg-type]
    return out


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


def _encode_json(records: list[LogRecord]) -> bytes:
    """msgspec's JSON line of each record; a lone surrogate, which msgspec refuses,
    is written backslash-escaped (`\\udcff` as the six characters)."""
    try:
        return _encoder.encode_lines(records)
    except UnicodeEncodeError:  # somewhere in the batch: find it record by record
        pass
    out = []
    for record in records:
        try:
            out.append(_encoder.encode(record))
        except UnicodeEncodeError:
            out.append(_encoder.encode(_scrub_record(record)))
    out.append(b"")
    return b"\n".join(out)


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


def _encode_text(records: list[LogRecord]) -> bytes:
    return b"".join([format_text(r).encode("utf-8", "backslashreplace") + b"\n" for r in records])


class Logger:
    """Writes records at or above `level` to `path` (appending), `stream`, or stdout."""

    def __init__(
        self,
        *,
        level: str = "debug",
        format: str = "json",
        stream: BinaryIO | None = None,
        path: str | None = None,
        flush_interval: float = 0.0,
    ) -> None:
        if level not in _SEVERITY:
            raise ValueError(f"unknown log level {level!r}; expected one of {list(_SEVERITY)}")
        if format not in ("json", "text"):
            raise ValueError(f"unknown log format {format!r}; expected 'json' or 'text'")
        if stream is not None and path is not None:
            raise ValueError("give a stream or a path, not both")
        self._min_severity = _SEVERITY[level]
        self._encode = _encode_text if format == "text" else _encode_json
        self._fd: int | None = None
        self._stream: BinaryIO | None = None
        self._closed = False
        if flush_interval < 0:
            raise ValueError(f"flush interval must be >= 0, not {flush_interval}")
        self._interval = flush_interval
        # Queued steps: (time.time_ns(), its records, its labels). All three are
        # untracked by the collector (ints, gc=False structs, tuples of them). Read
        # by the server (empty: nothing to write before a reply); written only here.
        self.queued: list[tuple[int, tuple[Kind, ...], Labels]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._seconds = _Seconds()
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
        """One record (dropped below the logger's level)."""
        if _SEVERITY[level] >= self._min_severity:
            self.add((kind(level, code, message),), labels)

    def add(self, records: tuple[Kind, ...], labels: Labels) -> None:
        """The records of one step (whatever their level: callers filter), stamped now
        and sharing `labels`. Only queued: the batch builds and encodes the records."""
        if type(labels) is not Labels:  # found here, not in the batch it would lose
            raise TypeError(f"a step's labels are a Labels, not {labels.__class__.__name__}")
        queued = self.queued
        queued.append((time.time_ns(), records, labels))
        if self._timer is None or len(queued) >= MAX_QUEUED:
            self._due()

    def _due(self) -> None:
        if self._closed:
            self.queued = []
            raise ValueError("log is closed")
        if self._interval and len(self.queued) < MAX_QUEUED:
            try:
                self._timer = asyncio.get_running_loop().call_later(self._interval, self._timer_fired)
                return
            except RuntimeError:  # no event loop to come back to: write now
                pass
        self.flush()

    def _timer_fired(self) -> None:
        self._timer = None
        self.write_queued()

    def write_queued(self) -> None:
        """flush() for callers with nobody to raise to (the batch's timer, a durable
        write before a reply): a failed write (disk full...) is said on stderr, in one
        line, and the server goes on."""
        queued = self.queued  # flush() swaps in a new queue: this one stays whole
        try:
            self.flush()
        except OSError as exc:
            count = sum(len(records) for _, records, _ in queued)
            os.write(2, f"sshspec: log write failed, {count} records lost: {exc}\n".encode())

    def flush(self) -> None:
        """Write every queued record, in one write(2). A batch's timer stays armed and
        fires on what is queued by then (maybe nothing): cancelling it here and arming
        a new one at the next record cost more than the write, when durable writes
        come a few records at a time."""
        queued = self.queued
        if not queued:
            return
        self.queued = []
        self._write(self._encode(_records(queued, self._seconds)))

    def _write(self, line: bytes) -> None:
        if self._fd is not None:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
        else:
            # A pipe (stdout under systemd or docker) keeps one write(2) whole only up to
            # PIPE_BUF, and --workers share it: a batch goes out in whole records, each
            # write at most PIPE_BUF unless one record alone is longer.
            assert self._stream is not None
            chunk = b""
            for record in line.splitlines(keepends=True):
                if chunk and len(chunk) + len(record) > select.PIPE_BUF:
                    self._stream.write(chunk)
                    self._stream.flush()
                    chunk = b""
                chunk += record
            self._stream.write(chunk)
            self._stream.flush()

    def close(self) -> None:
        """Close the file the logger opened; a stream passed in is only flushed."""
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self.flush()  # what is queued; a failed write still closes the file
        finally:
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
