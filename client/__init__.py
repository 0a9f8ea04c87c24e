"""tensorwire.client: the Python SDK for tensorwire and any Open Inference Protocol (v2) gRPC server.

numpy in, numpy out::

    import numpy as np
    from tensorwire.client import InferenceClient

    with InferenceClient("127.0.0.1:8001") as client:
        result = client.infer("identity", {"INPUT0": np.ones((1, 16), np.float32)})
        print(result["OUTPUT0"])
        client.infer("digits_cnn", np.zeros((1, 1, 8, 8)))  # a single-input model takes a bare value

Inputs are fitted to the datatypes the model declares by one rule, never lossy without
asking (``tensorwire.client._casting``): float64 zeros become FP32, 0.1 stays 0.1, a value
that would change raises :class:`InvalidInputError` naming the explicit form
(``Tensor(x, "FP32")``). The same surface exists for asyncio
(:class:`AsyncInferenceClient`, every method a coroutine). Streaming
(:meth:`InferenceClient.stream`) pipelines many requests on one ``ModelStreamInfer``
call, each paired with its answer by request id. Errors are :class:`InferenceServerError`
subclasses mapped from gRPC status codes; retries (:class:`RetryPolicy`) happen only
where safe. Timeouts are seconds.

This package needs only grpcio, protobuf and numpy: it never imports the server,
the trainer, torch or onnxruntime.
"""

from tensorwire.client._channel import DEFAULT_MAX_MESSAGE_BYTES, KeepAlive, TLSConfig
from tensorwire.client.aio import AsyncInferenceClient, AsyncInferStream
from tensorwire.client.errors import (
    DeadlineExceededError,
    InferenceServerError,
    InternalServerError,
    InvalidInputError,
    ModelNotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ServerBusyError,
    UnauthenticatedError,
    UnavailableError,
    UnsupportedError,
)
from tensorwire.client.results import InferResult, Tensor, bf16
from tensorwire.client.retry import RetryBudget, RetryPolicy
from tensorwire.client.sync import InferenceClient, InferStream

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AsyncInferStream",
    "AsyncInferenceClient",
    "DeadlineExceededError",
    "InferResult",
    "InferStream",
    "InferenceClient",
    "InferenceServerError",
    "InternalServerError",
    "InvalidInputError",
    "KeepAlive",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "RetryBudget",
    "RetryPolicy",
    "ServerBusyError",
    "TLSConfig",
    "Tensor",
    "UnauthenticatedError",
    "UnavailableError",
    "UnsupportedError",
    "bf16",
]
