"""What crosses between a front-end process and the engine process, and the socket that carries it.

Transport: one ZeroMQ ``ROUTER`` socket in the engine process, bound to ``ipc://`` in a folder only this
user can enter; one ``DEALER`` per front-end connected to it, its identity naming the front-end. ZeroMQ keeps
messages whole and in order per front-end, and moves them in its own I/O thread, so a send never waits for
the other process.

Every message is a multipart ZeroMQ message: a header frame (msgpack: plain numbers, strings and lists, never
pickle) followed by one frame per tensor. Tensors travel as their own bytes, never serialized: a numeric
array's buffer is handed to ZeroMQ without a copy (``copy=False``; pyzmq copies frames below 64 KiB, where
a copy is cheaper than tracking the buffer), and the receiving side views the frame with ``np.frombuffer``
(no copy either). BYTES tensors travel as Triton's length-prefixed raw contents.

Header layouts (``kind`` first; the tensor frames follow the header in order):

front-end -> engine
    ``HELLO index pid``, ``LISTENING``, ``SUBMIT rid instance priority deadline rows outputs request_id
    arrival_ns specs`` (+ one frame per input; a spec is ``[name, dtype, shape]``), ``CANCEL rid``, ``EVENTS outcomes
    refusals`` (outcome: ``[instance, ns, reason or None]``; refusal: ``[method, reason]``), ``CALL call_id
    op args``, ``ACK seq``.
engine -> front-end
    ``ANSWER rid specs`` (+ one frame per output; a spec is ``[name, datatype, shape]``), ``FAILED rid error``,
    ``RESULT call_id ok value``, ``STATE seq ack payload``, ``STOP grace_s``.

An error crosses as ``[class name, message, retry_after_ms]`` and is raised again as the same
``ServingError`` subclass on the other side.

Deadlines cross as absolute ``time.monotonic()`` seconds: CLOCK_MONOTONIC is one clock for every process of
a host, and it is what asyncio's default event loop reads, so a deadline set by a front-end's data plane is
a valid ``loop.call_at`` time in the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

from tensorwire.proto.codec import deserialize_bytes_tensor, element_count, serialize_bytes_tensor
from tensorwire.server import errors
from tensorwire.server.budget import MemoryBudgetError
from tensorwire.server.errors import ServingError

log = logging.getLogger("tensorwire.ipc")

# front-end -> engine
HELLO, LISTENING, SUBMIT, CANCEL, EVENTS, CALL, ACK = range(1, 8)
# engine -> front-end
ANSWER, FAILED, RESULT, STATE, STOP = range(10, 15)

#: The most messages one reader callback takes in before it lets the event loop run other work.
DRAIN_BATCH = 256
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


# ------------------------------------------------------------------ socket


class Channel:
    """A ZeroMQ socket driven by an asyncio event loop: sends never block, and one reader callback hands
    every message that arrived to ``on_message(frames)``.

    ZeroMQ signals its file descriptor edge-triggered, and sending can consume the signal of a message that
    arrived meanwhile; so after sends a drain is scheduled once per loop iteration, as pyzmq's own asyncio
    integration does. High-water marks are off (0): what is in flight is bounded by the memory budget and
    the queue bounds, not by the socket. ``copy``: receive frames as ``bytes`` (True) or as ``zmq.Frame``
    views of ZeroMQ's buffers (False: large tensors are not copied).
    """

    def __init__(
        self,
        socket: zmq.Socket,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[list], None],
        copy: bool,
    ) -> None:
        self.socket = socket
        self._loop = loop
        self._on_message = on_message
        self._copy = copy
        self._drain_pending = False
        self._closed = False
        self._fd = socket.getsockopt(zmq.FD)
        loop.add_reader(self._fd, self._drain)

    @staticmethod
    def configure(socket: zmq.Socket) -> zmq.Socket:
        """No high-water marks, no lingering at close."""
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        return socket

    def send(self, frames: Sequence[Any]) -> None:
        """Queue one multipart message (never blocks; buffers of 64 KiB and more are sent without a copy)."""
        if self._closed:
            return
        self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        if not self._drain_pending:
            self._drain_pending = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_pending = False
        if self._closed:
            return
        socket, on_message = self.socket, self._on_message
        for _ in range(DRAIN_BATCH):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=self._copy)
            except zmq.Again:
                return
            try:
                on_message(frames)
            except Exception:  # noqa: BLE001 - one bad message must not stop the channel
                log.exception("event=ipc_message_failed")
        if not self._drain_pending:  # more may be waiting: let other work run first
            self._drain_pending = True
            self._loop.call_soon(self._drain)

    def close(self) -> None:
        """Stop reading and close the socket (messages not yet sent are dropped)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self.socket.close(linger=0)
