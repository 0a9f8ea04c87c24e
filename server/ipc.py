"""What crosses between a front-end process and the engine process, and the stream that carries it.

Transport: a Unix-domain stream socket in a folder only this user can enter; the engine process listens,
each front-end process connects once. Both ends read and write it from their event loop (asyncio's own
transports: no extra thread, no copy into a library's queue), so a request costs one ``send`` and one
``recv`` system call each way. ZeroMQ (pyzmq) was measured here first: its I/O thread in each process adds
two thread wake-ups per message, and a round trip of a small request cost 2.3× the CPU of this stream with
64 requests in flight and 3× at one (41 against 18 µs, 180 against 58 µs; BENCHMARKS.md, "Front-end
processes").

Every message is a header (msgpack: plain numbers, strings and lists, never pickle) followed by tensor
frames. Tensors travel as their own bytes, never serialized: a numeric array's memory is handed to the
socket as it is (above ``JOIN_BYTES``; smaller messages sent in one event-loop iteration are joined into one
write at its end, so a batch's answers cost one system call), and the receiving side
reads a large message straight into a buffer of its own, which the engine's arrays then view
(``np.frombuffer``, no copy). BYTES tensors travel as Triton's length-prefixed raw contents.

Header layouts (``kind`` first; the tensor frames follow the header in order):

front-end -> engine
    ``HELLO index pid``, ``LISTENING``, ``SUBMIT rid instance latest priority deadline rows outputs
    request_id arrival_ns specs`` (+ one frame per input; a spec is ``[name, dtype, shape]``), ``CANCEL rid``,
    ``EVENTS outcomes refusals`` (outcome: ``[instance, ns, reason or None]``; refusal: ``[method, reason]``),
    ``CALL call_id op args``, ``ACK seq``.
engine -> front-end
    ``ANSWER rid specs`` (+ one frame per output; a spec is ``[name, datatype, shape]``), ``FAILED rid error``,
    ``RESULT call_id ok value``, ``STATE seq ack payload``, ``STOP grace_s``.

An error crosses as ``[class name, message, retry_after_ms]`` and is raised again as the same
``ServingError`` subclass on the other side.

Deadlines cross as absolute ``time.monotonic()`` seconds and arrival times as ``time.perf_counter_ns()``:
on Linux both read CLOCK_MONOTONIC, one clock for every process of a host, and asyncio's default event loop
reads it too, so a deadline set by a front-end's data plane is a valid ``loop.call_at`` time in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from tensorwire.proto.codec import deserialize_bytes_tensor, element_count, serialize_bytes_tensor
from tensorwire.server import errors
from tensorwire.server.budget import MemoryBudgetError
from tensorwire.server.errors import ServingError

log = logging.getLogger("tensorwire.ipc")

# front-end -> engine
HELLO, LISTENING, SUBMIT, CANCEL, EVENTS, CALL, ACK = range(1, 8)
# engine -> front-end
ANSWER, FAILED, RESULT, STATE, STOP = range(10, 15)

#: The dtype of an object array of bytes on the wire (its frame is Triton's length-prefixed contents).
BYTES_DTYPE = "BYTES"

_ERRORS: dict[str, type[ServingError]] = {
    cls.__name__: cls
    for cls in (*(v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, ServingError)),)
}
_ERRORS[MemoryBudgetError.__name__] = MemoryBudgetError

pack = msgpack.Packer(use_bin_type=True).pack


def unpack(frame: Any) -> list:
    """A header frame (bytes or a ``zmq.Frame``) as the list it was packed from."""
    return msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=False)


# ------------------------------------------------------------------ errors


def error_fields(err: BaseException) -> list:
    """``err`` as ``[class name, message, retry_after_ms]``; anything not a ServingError crosses as INTERNAL."""
    if isinstance(err, ServingError):
        return [type(err).__name__, str(err), getattr(err, "retry_after_ms", 0)]
    return ["ServingError", f"internal error in the engine process ({type(err).__name__}); see the server log", 0]


def error_from(fields: Sequence[Any]) -> ServingError:
    """The ServingError that ``error_fields`` described (its class, message and retry hint)."""
    name, message, retry_after_ms = fields
    cls = _ERRORS.get(name, ServingError)
    if cls is errors.QueueFullError:
        return cls(message, retry_after_ms=retry_after_ms)
    return cls(message)


# ----------------------------------------------------------------- tensors


def tensor_frame(array: np.ndarray) -> tuple[str, Any]:
    """(dtype on the wire, buffer) of one decoded input: the array's own memory for numeric arrays (C order),
    Triton's length-prefixed contents for BYTES (object) arrays."""
    if array.dtype.kind == "O":
        return BYTES_DTYPE, serialize_bytes_tensor(array)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array.dtype.str, memoryview(array).cast("B") if array.size else b""


_DTYPES: dict[str, np.dtype] = {}


def tensor_from(dtype: str, shape: Sequence[int], frame: Any) -> np.ndarray:
    """The array ``tensor_frame`` sent, viewing ``frame`` (read-only, no copy) for numeric dtypes.

    Raises ValueError when the frame's size does not match the dtype and shape (a bug on the sending side).
    """
    if dtype == BYTES_DTYPE:
        return deserialize_bytes_tensor(frame, element_count(shape)).reshape(shape)
    numpy_dtype = _DTYPES.get(dtype)
    if numpy_dtype is None:
        numpy_dtype = _DTYPES[dtype] = np.dtype(dtype)
    array = np.frombuffer(frame, dtype=numpy_dtype).reshape(shape)
    array.flags.writeable = False
    return array


# -------------------------------------------------------------- connection

#: Message prefix: header length (u32), number of tensor frames (u32); then one u64 length per frame.
_PREFIX = struct.Struct("<II")
_LENGTH = struct.Struct("<Q")
#: Messages up to this size are read through one shared buffer and copied out (one small copy); larger
#: ones are read by the kernel straight into a buffer of their own, which their tensors then view.
SMALL_MESSAGE_BYTES = 256 * 2**10
#: Messages up to this size are sent as one joined buffer (one write); larger ones buffer by buffer, so a
#: tensor's memory goes to the socket without a copy in this process.
JOIN_BYTES = 64 * 2**10
#: The largest message either side accepts (a corrupted length must not allocate without bound).
MAX_MESSAGE_BYTES = 2**40

OnMessage = Callable[["Connection", list, list], None]


class Connection(asyncio.BufferedProtocol):
    """One end of the Unix-domain stream between a front-end and the engine, on the event loop.

    A message is a msgpack header (a list) and tensor frames, framed as a prefix (header length, frame
    count), one 8-byte length per frame, the header, then the frames' bytes. Sending writes straight to the
    socket from the event loop (no thread in between); a frame is handed over as the buffer it is (a numpy
    array's memory, the model's output bytes), never serialized. Receiving calls ``on_message(connection,
    header, frames)`` for every complete message; frames are ``bytes`` (small messages) or read-only
    ``memoryview``s of the message's own buffer (large ones, read without a copy). ``on_lost(connection)``
    runs once when the stream ends (the other process closed it or died).
    """

    def __init__(self, on_message: OnMessage, on_lost: Callable[[Connection], None] = lambda c: None) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.link: Any = None  # the engine's record of the front-end on this connection
        self._buffer = bytearray(SMALL_MESSAGE_BYTES)
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._large: bytearray | None = None  # the buffer of one large message being read
        self._large_filled = 0
        self._large_header = 0  # the large message's header length
        self._large_lengths: list[int] = []  # and its frames' lengths
        self._corked: list[Any] = []  # small messages waiting for the end of this loop iteration

    # ---------------------------------------------------------------- sending

    def send(self, header: list, *frames: Any) -> None:
        """Queue one message (never blocks). Small messages sent during one event-loop iteration leave in one
        write at its end (one system call for a batch's answers); a large one is written at once, its
        frames as they are."""
        transport = self.transport
        if transport is None or self.closed:
            return
        packed = pack(header)
        lengths = [memoryview(frame).nbytes for frame in frames]
        prefix = _PREFIX.pack(len(packed), len(frames)) + b"".join(_LENGTH.pack(n) for n in lengths)
        if sum(lengths) + len(packed) <= JOIN_BYTES:
            corked = self._corked
            if not corked:
                asyncio.get_running_loop().call_soon(self.flush)
            corked.append(prefix)
            corked.append(packed)
            corked.extend(frames)
            return
        self.flush()
        transport.write(prefix + packed)
        for frame in frames:
            transport.write(frame)

    def flush(self) -> None:
        """Write the small messages queued so far (in order, as one buffer)."""
        corked = self._corked
        if not corked:
            return
        self._corked = []
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(corked))

    # -------------------------------------------------------------- receiving

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=2**62)  # type: ignore[attr-defined] - bounded by the budget

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:
            return memoryview(self._large)[self._large_filled :]
        if self._filled == len(self._buffer):  # a message prefix larger than the buffer: grow it
            self._buffer.extend(bytes(len(self._buffer)))
            self._view = memoryview(self._buffer)
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._large is not None:
            self._large_filled += nbytes
            if self._large_filled == len(self._large):
                self._finish_large()
            return
        self._filled += nbytes
        self._parse()

    def _parse(self) -> None:
        view, end, offset = self._view, self._filled, 0
        while end - offset >= _PREFIX.size:
            header_length, count = _PREFIX.unpack_from(view, offset)
            lengths_end = offset + _PREFIX.size + 8 * count
            if end < lengths_end:
                break
            lengths = [_LENGTH.unpack_from(view, offset + _PREFIX.size + 8 * i)[0] for i in range(count)]
            body = header_length + sum(lengths)
            total = lengths_end - offset + body
            if total > MAX_MESSAGE_BYTES:
                log.error("event=ipc_bad_message length=%d action=close", total)
                self.close()
                return
            if total > SMALL_MESSAGE_BYTES:  # read the rest straight into a buffer of its own
                self._large = bytearray(body)
                have = min(end - lengths_end, body)
                self._large[:have] = view[lengths_end : lengths_end + have]
                self._large_filled = have
                self._large_lengths = lengths
                self._large_header = header_length
                offset = lengths_end + have
                self._shift(offset)
                if have == body:
                    self._finish_large()
                return
            if end - offset < total:
                break
            start = lengths_end
            header = unpack(view[start : start + header_length])
            start += header_length
            frames = []
            for length in lengths:
                frames.append(bytes(view[start : start + length]))
                start += length
            offset += total
            self._deliver(header, frames)
            if self.closed:
                return
        self._shift(offset)

    def _shift(self, offset: int) -> None:
        """Drop the first ``offset`` bytes of the shared buffer (they were handed out)."""
        if offset:
            rest = self._filled - offset
            self._buffer[:rest] = self._view[offset : self._filled]
            self._filled = rest

    def _finish_large(self) -> None:
        large, lengths, header_length = self._large, self._large_lengths, self._large_header
        self._large = None
        assert large is not None
        view = memoryview(large).toreadonly()
        header = unpack(view[:header_length])
        start, frames = header_length, []
        for length in lengths:
            frames.append(view[start : start + length])
            start += length
        self._deliver(header, frames)
        if self._filled and not self.closed:
            self._parse()

    def _deliver(self, header: list, frames: list) -> None:
        try:
            self.on_message(self, header, frames)
        except Exception:  # noqa: BLE001 - one bad message must not end the connection
            log.exception("event=ipc_message_failed kind=%r", header[0] if header else None)

    def eof_received(self) -> bool:
        return False  # close the transport: the other side is gone

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.on_lost(self)

    def close(self) -> None:
        """Close the stream once what was sent is written; ``on_lost`` is not called for a close asked for
        here."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()
