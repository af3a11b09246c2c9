"""Structured logs: JSON lines that decode back, the text format, level filtering."""

from __future__ import annotations

import asyncio
import calendar
import io
import json
import re
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sshspec.adapters import logs
from sshspec.adapters.logs import Labels, Logger, LogRecord, decode_record, format_text, kind

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def _lines(stream: io.BytesIO) -> list[bytes]:
    return stream.getvalue().splitlines(keepends=True)


def test_json_line_decodes_back_to_the_same_record() -> None:
    out = io.BytesIO()
    labels = Labels(connection_id="c1", remote_addr="127.0.0.1:5555", channel_id=0, exit_code=0)
    before = time.time()
    Logger(stream=out).log("info", "SSH_CONNECTED", "Client connected", labels)
    (line,) = _lines(out)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = decode_record(line)
    assert (record.level, record.code, record.message) == ("info", "SSH_CONNECTED", "Client connected")
    assert record.labels == labels
    assert TIMESTAMP.fullmatch(record.timestamp)
    stamp = calendar.timegm(time.strptime(record.timestamp[:19], "%Y-%m-%dT%H:%M:%S"))
    assert abs(stamp - before) < 5  # UTC, not local time


def test_json_layout_omits_absent_labels_and_keeps_zero() -> None:
    out = io.BytesIO()
    Logger(stream=out).log("error", "SSH_X", "m", Labels(username="alice", exit_code=0))
    data = json.loads(out.getvalue())
    assert list(data) == ["timestamp", "level", "code", "message", "labels"]
    assert data["labels"] == {"username": "alice", "exitCode": 0}


def test_json_line_with_no_labels() -> None:
    out = io.BytesIO()
    Logger(stream=out).log("debug", "SSH_X", "m", Labels())
    assert json.loads(out.getvalue())["labels"] == {}


def test_lone_surrogate_is_escaped_not_raised() -> None:
    out = io.BytesIO()
    Logger(stream=out).log("info", "SSH_X", "bad \udc80 name", Labels(username="\udcff"))
    record = decode_record(out.getvalue())
    assert record.message == "bad \\udc80 name"
    assert record.labels.username == "\\udcff"


def test_level_filtering() -> None:
    out = io.BytesIO()
    logger = Logger(level="warning", stream=out)
    assert not logger.enabled("debug") and not logger.enabled("info")
    assert logger.enabled("warning") and logger.enabled("error")
    for level in ("debug", "info", "warning", "error"):
        logger.log(level, "SSH_X", level, Labels())
    assert [decode_record(line).level for line in _lines(out)] == ["warning", "error"]


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        Logger(level="trace", stream=io.BytesIO())
    with pytest.raises(ValueError, match="format"):
        Logger(format="xml", stream=io.BytesIO())


def test_text_format() -> None:
    record = LogRecord(
        "2026-11-28T10:37:26.123456Z",
        "info",
        "SSH_CONNECTED",
        "Client connected",
        Labels(connection_id="c1", remote_addr="127.0.0.1:5555", channel_id=0),
    )
    assert format_text(record) == (
        "2026-11-28T10:37:26Z info  SSH_CONNECTED  Client connected"
        "  connectionId=c1 remoteAddr=127.0.0.1:5555 channelId=0"
    )
    bare = msgspec.structs.replace(record, labels=Labels(), level="error")
    assert format_text(bare) == "2026-11-28T10:37:26Z error SSH_CONNECTED  Client connected"


def test_text_format_quotes_and_escapes_network_input() -> None:
    record = LogRecord(
        "2026-11-28T10:37:26.123456Z",
        "warning",
        "SSH_X",
        "two\nlines",
        Labels(username='a b"\x1b[31m\u202e', reason=""),
    )
    assert format_text(record) == (
        '2026-11-28T10:37:26Z warning SSH_X  two\\nlines  username="a b\\"\\u001b[31m\\u202e" reason=""'
    )


def test_text_logger_writes_one_line() -> None:
    out = io.BytesIO()
    Logger(format="text", stream=out).log("info", "SSH_X", "hello", Labels(method="password"))
    assert re.fullmatch(
        rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ info  SSH_X  hello  method=password\n", out.getvalue()
    )


def test_file_is_appended_and_closed(tmp_path: Path) -> None:
    path = tmp_path / "sshspec.jsonl"
    path.write_bytes(b'{"earlier":"content"}\n')
    first = Logger(path=str(path))
    second = Logger(path=str(path))
    first.log("info", "SSH_A", "a", Labels())
    second.log("info", "SSH_B", "b", Labels())
    first.log("info", "SSH_C", "c", Labels())
    # Written at once, not at close: a crash loses nothing already logged.
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"earlier":"content"}'
    assert [decode_record(line).code for line in lines[1:]] == ["SSH_A", "SSH_B", "SSH_C"]
    first.close()
    first.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        first.log("info", "SSH_D", "d", Labels())
    second.close()


def test_stream_is_flushed_not_closed() -> None:
    out = io.BytesIO()
    logger = Logger(stream=out)
    logger.close()
    assert not out.closed


@pytest.mark.parametrize(
    ("line", "where"),
    [
        (b'{"timestamp":"2026-11-28T10:37:26.123456Z","level":"info"', "truncated"),
        (b"", "truncated"),
        (b"not json\n", "malformed"),
        (
            b'{"timestamp":"2026-11-28T10:37:26.123456Z","level":"loud","code":"SSH_X",'
            b'"message":"","labels":{}}',
            "$.level",
        ),
        (
            b'{"timestamp":"2026-11-28 10:37:26","level":"info","code":"SSH_X","message":"","labels":{}}',
            "$.timestamp",
        ),
        (
            b'{"timestamp":"2026-11-28T10:37:26.123456Z","level":"info","code":"SSH_X",'
            b'"message":"","labels":{"user":"a"}}',
            "unknown field `user`",
        ),
        (
            b'{"timestamp":"2026-11-28T10:37:26.123456Z","level":"info","code":"SSH_X",'
            b'"message":"","labels":{"channelId":"0"}}',
            "$.labels.channelId",
        ),
    ],
)
def test_corrupt_line_is_a_clear_error(line: bytes, where: str) -> None:
    with pytest.raises(ValueError, match="corrupt log record") as info:
        decode_record(line)
    assert where in str(info.value)


_text = st.none() | st.text()
_int = st.none() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
labels_strategy = st.builds(
    Labels,
    connection_id=_text,
    remote_addr=_text,
    username=_text,
    key_fingerprint=_text,
    channel_id=_int,
    request_type=_text,
    command=_text,
    method=_text,
    reason=_text,
    exit_code=_int,
    signal=_text,
)


@given(labels=labels_strategy, message=st.text())
def test_any_labels_round_trip(labels: Labels, message: str) -> None:
    out = io.BytesIO()
    Logger(stream=out).log("info", "SSH_X", message, labels)
    (line,) = _lines(out)  # one record is exactly one line, whatever the strings hold
    record = decode_record(line)
    assert record.labels == labels
    assert record.message == message


@given(labels=labels_strategy, message=st.text())
def test_any_text_record_is_one_printable_line(labels: Labels, message: str) -> None:
    record = LogRecord("2026-11-28T10:37:26.123456Z", "info", "SSH_X", message, labels)
    assert format_text(record).isprintable()  # no newline, no control or bidi character


# --- batches: what the server does by default (log.flushInterval) --------------------------

# Strings as the network may hand them over: lone surrogates too (surrogateescape-decoded
# bytes), which msgspec refuses to encode and the logger writes backslash-escaped.
_wild = st.text(st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
_wild_labels = st.builds(Labels, **{
    name: st.none() | st.integers() if name in ("channel_id", "exit_code") else st.none() | _wild
    for name in Labels.__struct_fields__})
_kinds = st.lists(st.builds(logs.Kind, st.sampled_from(["debug", "info", "warning", "error"]),
                            _wild.filter(bool), _wild), min_size=1, max_size=3).map(tuple)
_times = st.integers(min_value=0, max_value=2**63 - 1) | st.builds(
    # around a second boundary, and the fraction's edges (0 and 999999 us)
    lambda s, us, ns: (s * 10**6 + us) * 1000 + ns, st.sampled_from([0, 1_764_326_245, 1_764_326_246]),
    st.sampled_from([0, 1, 999, 1000, 123456, 999999]), st.sampled_from([0, 7, 999]))


def _escaped(value: object) -> object:
    return value.encode("utf-8", "backslashreplace").decode() if isinstance(value, str) else value


def _record(ns: int, k: logs.Kind, labels: Labels) -> LogRecord:
    """The LogRecord a step's record stands for, its strings as the log escapes them."""
    seconds, micros = divmod(ns // 1000, 10**6)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"
    return LogRecord(stamp, k.level, _escaped(k.code), _escaped(k.message),  # type: ignore[arg-type]
                     Labels(*map(_escaped, msgspec.structs.astuple(labels))))


@given(steps=st.lists(st.tuples(_times, _kinds, _wild_labels), min_size=1, max_size=20))
def test_a_batch_is_msgspecs_encoding_of_each_record(
        steps: list[tuple[int, tuple[logs.Kind, ...], Labels]]) -> None:
    """Line for line, a batch is what msgspec writes for each LogRecord of its steps,
    and decodes back to it: whatever the time (second boundaries included) and the
    strings (a lone surrogate comes back backslash-escaped)."""
    out = io.BytesIO()
    logger = Logger(stream=out)
    logger.queued = list(steps)  # the times chosen here, not the clock's
    logger.flush()
    expected = [_record(ns, k, labels) for ns, kinds, labels in steps for k in kinds]
    lines = _lines(out)
    assert lines == [msgspec.json.encode(record) + b"\n" for record in expected]
    assert [decode_record(line) for line in lines] == expected


@given(calls=st.lists(st.one_of(st.tuples(_kinds, labels_strategy), st.just("flush")), max_size=30))
def test_a_logger_writes_every_step_in_order_whatever_the_flushes(calls: list[object]) -> None:
    async def run(out: io.BytesIO) -> None:  # in a loop: steps wait for a flush
        logger = Logger(stream=out, flush_interval=3600)
        for call in calls:
            if call == "flush":
                logger.flush()
            else:
                logger.add(*call)  # type: ignore[misc]
        logger.close()

    out = io.BytesIO()
    asyncio.run(run(out))
    expected = []
    for call in calls:
        if call != "flush":
            kinds, labels = call  # type: ignore[misc]
            expected += [(k.level, _escaped(k.code), _escaped(k.message), labels) for k in kinds]
    assert [(r.level, r.code, r.message, r.labels) for r in map(decode_record, _lines(out))] == expected


def test_a_dropped_logger_is_collected() -> None:
    import gc
    import weakref

    logger = Logger(stream=io.BytesIO(), flush_interval=10)
    logger.add((kind("info", "SSH_X", "m"),), Labels(connection_id="c"))  # no loop: written now
    gone = weakref.ref(logger)
    del logger
    gc.collect()
    assert gone() is None


def _observe_timer(logger: Logger) -> asyncio.Future[float]:
    """A future the logger's timer sets (to the loop's time) once its flush is done:
    what the tests wait for, instead of sleeping."""
    loop = asyncio.get_running_loop()
    flushed: asyncio.Future[float] = loop.create_future()
    flush_due = logger.write_queued

    def observed() -> None:
        flush_due()
        flushed.set_result(loop.time())

    logger.write_queued = observed  # type: ignore[method-assign]  # call_later reads it when arming
    return flushed


def test_batched_records_wait_for_the_interval_and_keep_their_order(tmp_path: Path) -> None:
    path = tmp_path / "batched.jsonl"

    async def main() -> list[str]:
        logger = Logger(path=str(path), flush_interval=0.05)
        flushed = _observe_timer(logger)
        start = asyncio.get_running_loop().time()
        for n in range(5):
            logger.log("info", f"SSH_{n}", "m", Labels(connection_id="c", exit_code=n))
        assert path.read_bytes() == b""  # queued, not written
        assert await asyncio.wait_for(flushed, 5) - start >= 0.05
        assert len(path.read_bytes().splitlines()) == 5  # the timer wrote them, all at once
        logger.log("info", "SSH_LAST", "m", Labels())
        logger.close()  # writes what is queued
        return [decode_record(line).code for line in path.read_bytes().splitlines()]

    assert asyncio.run(main()) == [f"SSH_{n}" for n in range(5)] + ["SSH_LAST"]


def test_a_step_whose_labels_are_not_labels_is_refused() -> None:
    out = io.BytesIO()
    logger = Logger(stream=out, flush_interval=3600)
    records = (kind("info", "SSH_X", "m"),)
    with pytest.raises(TypeError):  # the label values one by one, as add() took them before
        logger.add(records, *msgspec.structs.astuple(Labels(exit_code=1)))  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="a step's labels are a Labels, not dict"):
        logger.add(records, {"exitCode": 1})  # type: ignore[arg-type]
    logger.log("info", "SSH_Y", "m", Labels(exit_code=1))
    logger.close()
    assert [decode_record(line).code for line in out.getvalue().splitlines()] == ["SSH_Y"]


def test_a_full_queue_is_written_at_once() -> None:
    from sshspec.adapters.logs import MAX_QUEUED

    async def main() -> int:
        out = io.BytesIO()
        logger = Logger(stream=out, flush_interval=3600)
        for n in range(MAX_QUEUED - 1):
            logger.log("info", "SSH_X", "m", Labels(exit_code=n))
        assert out.getvalue() == b""
        logger.log("info", "SSH_X", "m", Labels(exit_code=MAX_QUEUED - 1))
        written = len(out.getvalue().splitlines())
        logger.close()
        return written

    assert asyncio.run(main()) == MAX_QUEUED


def test_without_an_event_loop_a_batched_logger_writes_at_once() -> None:
    out = io.BytesIO()
    logger = Logger(stream=out, flush_interval=10)
    logger.log("info", "SSH_X", "m", Labels())
    assert [decode_record(line).code for line in out.getvalue().splitlines()] == ["SSH_X"]
    logger.close()
    with pytest.raises(ValueError, match="closed"):
        logger.log("info", "SSH_Y", "m", Labels())
    with pytest.raises(ValueError, match="flush interval"):
        Logger(stream=out, flush_interval=-1)


def test_a_batch_that_cannot_be_written_is_reported_not_raised_into_the_loop(
        capfd: pytest.CaptureFixture[str]) -> None:
    full = Path("/dev/full")  # every write(2): ENOSPC
    if not full.exists():
        pytest.skip("no /dev/full")

    async def main() -> None:
        logger = Logger(path=str(full), flush_interval=0.001)
        flushed = _observe_timer(logger)
        logger.log("info", "SSH_X", "m", Labels())
        logger.log("info", "SSH_Y", "m", Labels())
        await asyncio.wait_for(flushed, 5)  # the timer's flush took them (and failed)
        assert not logger.queued
        logger.log("info", "SSH_Z", "m", Labels())  # the logger still takes records
        with pytest.raises(OSError):
            logger.close()  # a direct flush raises to its caller, and the file is closed all the same
        assert logger._closed

    asyncio.run(main())
    err = capfd.readouterr().err
    assert "sshspec: log write failed, 2 records lost: [Errno 28] No space left on device" in err


def test_a_batch_to_a_stream_goes_out_in_whole_records_of_at_most_pipe_buf() -> None:
    """--workers share stdout: a pipe keeps a write whole only up to PIPE_BUF."""
    import select

    class Writes(io.BytesIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> int:  # type: ignore[override]
            self.writes.append(bytes(data))
            return super().write(data)

    async def main() -> Writes:
        out = Writes()
        logger = Logger(stream=out, flush_interval=3600)
        for n in range(100):
            logger.log("info", "SSH_X", "m", Labels(reason="r" * (n * 7)))
        logger.log("info", "SSH_BIG", "m", Labels(reason="x" * 2 * select.PIPE_BUF))
        logger.close()
        return out

    out = asyncio.run(main())
    assert len(out.writes) > 1
    for data in out.writes:
        assert data.endswith(b"\n") and (len(data) <= select.PIPE_BUF or data.count(b"\n") == 1)
    assert [decode_record(line).code for line in out.getvalue().splitlines()] == ["SSH_X"] * 100 + ["SSH_BIG"]
