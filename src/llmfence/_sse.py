"""Server-sent events framing: whole events out of a byte stream, whatever its chunk boundaries.

An SSE event ends at a blank line; a line ends with CRLF, LF or CR, and a CR followed by LF is
one line ending, never two. `SSEFramer` cuts a stream into runs of complete events with `bytes`
searches only (no per-line work), holding back the incomplete last event, and a final CR until
the next byte tells whether it starts a CRLF. The helpers split such a run into events and read
an event's `data`. Nothing here knows what the events mean: `_usage` does.
"""

from __future__ import annotations

__all__ = ["SSEFramer", "event_around", "event_data", "events", "events_with", "next_cut"]

# Any two line endings in a row contain one of these; one line ending (LF, CR, CRLF) contains
# none of them.
_TWO_ENDINGS = (b"\n\n", b"\r\r", b"\n\r")
# An event larger than this (no blank line in sight) is dropped rather than buffered forever.
_MAX_EVENT = 32 << 20
_BOM = b"\xef\xbb\xbf"


class SSEFramer:
    """Cuts a byte stream into runs of complete SSE events, whatever the chunk boundaries."""

    __slots__ = ("_cr", "_tail", "_tail_size")

    def __init__(self) -> None:
        self._tail: list[bytes] = []  # the incomplete last event, as the chunks that brought it
        self._tail_size = 0
        self._cr = False  # the stream has a CR: leave the LF-only fast path for good

    def _push(self, chunk: bytes) -> bytes:
        """Take a chunk; return the complete events it finishes (possibly b"")."""
        tail = self._tail
        if self._cr or 13 in chunk:  # (an int test is a bare memchr, the fastest)
            self._cr = True
            cut = self._cut_cr(chunk)
        else:
            # JSON data has no raw LF, so the last LF usually ends a blank line.
            last = chunk.rfind(10)
            if last > 0 and chunk[last - 1] == 10:
                cut = last + 1
            elif last < 0:
                cut = -1
            else:
                # Only the new chunk is searched: a "\n\n" straddles into it only at byte 0.
                cut = chunk.rfind(b"\n\n", 0, last) + 2
                if cut == 1 and not (tail and chunk[0] == 10 and tail[-1][-1] == 10):
                    cut = -1  # none, not even one straddling from the tail
        if not tail and cut == len(chunk):
            return chunk  # the usual case: whole events, nothing held back
        if cut < 0:
            if chunk:
                tail.append(chunk)
                self._tail_size += len(chunk)
                if self._tail_size > _MAX_EVENT:
                    tail.clear()
                    self._tail_size = 0
            return b""
        if tail:
            tail.append(chunk[:cut])
            done = b"".join(tail)
            tail.clear()
            self._tail_size = 0
        else:
            done = chunk[:cut]
        if cut < len(chunk):
            tail.append(chunk[cut:])
            self._tail_size = len(chunk) - cut
        return done

    def _cut_cr(self, chunk: bytes) -> int:
        if not chunk:
            return -1
        # A final CR may be the first half of a CRLF: wait for the next byte to know.
        end = len(chunk) - 1 if chunk[-1:] == b"\r" else len(chunk)
        last = chunk.rfind(10, 0, end)
        # The usual CRLF boundary; past its last LF, only a CR CR could make another.
        if (
            last >= 3
            and chunk[last - 3 : last + 1] == b"\r\n\r\n"
            and chunk.find(b"\r\r", last, end) < 0
        ):
            return _run_end(chunk, last + 1, end)
        # After a cut, the tail ends with at most one line ending plus a held-back CR, so its
        # last three bytes are all a boundary can start in.
        prev = b"".join(self._tail[-3:])[-3:]
        window = prev + chunk
        cut = _last_cut(window, end + len(prev))
        # A boundary wholly inside the tail (its held-back CR was one) completes all of it.
        return max(cut - len(prev), 0) if cut >= 0 else -1

    def _take_tail(self) -> bytes:
        done = b"".join(self._tail)
        self._tail.clear()
        self._tail_size = 0
        return done


def _last_cut(buf: bytes, end: int) -> int:
    """The end of the last blank-line run in `buf[:end]`, or -1."""
    found = max(buf.rfind(b"\n\n", 0, end), buf.rfind(b"\r\r", 0, end), buf.rfind(b"\n\r", 0, end))
    return -1 if found < 0 else _run_end(buf, found + 2, end)


def next_cut(buf: bytes, start: int) -> int:
    """The end of the first blank-line run in `buf[start:]`, or -1."""
    found = [i for i in (buf.find(pattern, start) for pattern in _TWO_ENDINGS) if i >= 0]
    return _run_end(buf, min(found) + 2, len(buf)) if found else -1


def event_around(buf: bytes, at: int) -> tuple[int, int]:
    """Where the event holding byte `at` of a run of events starts and ends (its blank line
    included; the run's end if it has none). Costs the length of that event, not of the run:
    a search from the run's start for every event would make a chunk of n events cost n²."""
    start = _last_cut(buf, at)
    end = next_cut(buf, at)
    return max(start, 0), len(buf) if end < 0 else end


def _run_end(buf: bytes, i: int, end: int) -> int:
    while i < end and buf[i] in b"\r\n":
        i += 1
    return i


def _lf(done: bytes) -> bytes:
    """`done` with every line ending made LF."""
    return done.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in done else done


def events(done: bytes) -> list[bytes]:
    """The events of a run of complete events, with LF line endings (some may be empty)."""
    return _lf(done).split(b"\n\n")


def events_with(done: bytes, needle: bytes) -> list[bytes]:
    """The events of a run (as `events` gives them) that contain `needle` (no CR or LF in it).

    Only the events around each occurrence are cut out, so a run of many events costs one
    search, not one split per event. An event may come without the blank lines that `events`
    would leave at its start: they say nothing.
    """
    done = _lf(done)
    found: list[bytes] = []
    at = done.find(needle)
    while at >= 0:
        before = done.rfind(b"\n\n", 0, at)
        start = 0 if before < 0 else before + 2
        end = done.find(b"\n\n", at)
        if end < 0:
            end = len(done)
        found.append(done[start:end])
        at = done.find(needle, end)
    return found


def event_data(event: bytes) -> bytes | None:
    """The `data` of one SSE event (LF line endings), or None if it has none."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the usual single line
    data: list[bytes] = []
    for line in event.split(b"\n"):
        line = line.removeprefix(_BOM)  # a BOM may open the stream
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            data.append(b"")
        # Comments (":"), `event`, `id`, `retry` and unknown fields say nothing about usage.
    return b"\n".join(data) if data else None
