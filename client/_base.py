"""What the blocking and asyncio clients share: configuration and the request messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tensorwire.client._channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ChannelSpec,
    KeepAlive,
    TLSConfig,
    channel_spec,
)
from tensorwire.client._convert import repository_param, version_string
from tensorwire.client.retry import Retrier, RetryPolicy
from tensorwire.proto import inference_pb2 as pb

#: Sent as the gRPC user agent, so server logs can tell SDK traffic apart.
USER_AGENT = "tensorwire-client/0.1"

BF16_MODES = ("float32", "bits", "bfloat16")
DEFAULT_KEEPALIVE = KeepAlive()


class ClientBase:
    """Configuration common to :class:`InferenceClient` and :class:`AsyncInferenceClient`.

    Args:
        address: ``"host:port"``, a comma-separated list, or a sequence of them. Several
            addresses are balanced call by call with gRPC's round_robin policy.
        tls: ``True`` for TLS with the system's CA roots, or a :class:`TLSConfig` with
            PEM file paths (add ``cert_file``/``key_file`` for mutual TLS).
        token: a bearer token, sent as ``authorization: Bearer <token>`` on every call.
        compression: ``"gzip"`` (or ``"deflate"``) to compress requests.
        timeout: default deadline in seconds for every unary call (``None``: no deadline);
            each method's own ``timeout`` overrides it. Retries happen within it.
        retry: a :class:`RetryPolicy` (default: conservative, see ``tensorwire.client.retry``);
            ``RetryPolicy.disabled()`` turns retries off.
        keepalive: HTTP/2 keep-alive settings (``None``: gRPC's defaults, no pings).
        max_message_bytes: send/receive limit; 2 GiB - 1 by default, as on the server.
        load_balancing: a gRPC LB policy name; ``"round_robin"`` is chosen by itself
            when several addresses are given.
        options: extra gRPC channel options, applied last.
        bf16_as: how BF16 outputs come back: ``"float32"`` (exact), ``"bits"`` (uint16
            patterns) or ``"bfloat16"`` (an ``ml_dtypes`` array, if installed).
    """

    def __init__(
        self,
        address: str | Sequence[str] = "127.0.0.1:8001",
        *,
        tls: TLSConfig | bool | None = None,
        token: str | None = None,
        compression: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        keepalive: KeepAlive | None = DEFAULT_KEEPALIVE,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        load_balancing: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        bf16_as: str = "float32",
    ) -> None:
        if bf16_as not in BF16_MODES:
            raise ValueError(f"bf16_as must be one of {', '.join(BF16_MODES)}, not {bf16_as!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive seconds (or None for no deadline)")
        self.retry_policy: RetryPolicy = retry if retry is not None else RetryPolicy()
        self._spec: ChannelSpec = channel_spec(
            address,
            tls=tls,
            token=token,
            compression=compression,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
            load_balancing=load_balancing,
            retry=self.retry_policy,
            options=options,
            user_agent=USER_AGENT,
        )
        self._retrier = Retrier(self.retry_policy)
        self._timeout = timeout
        self._bf16_as = bf16_as
        self._setup()

    def _setup(self) -> None:
        """Open the channel (or prepare to): each client kind does its own."""
        raise NotImplementedError

    @property
    def target(self) -> str:
        """The gRPC target this client's channel was opened on."""
        return self._spec.target

    @property
    def retries(self) -> int:
        """How many retries this client has made so far (all calls together)."""
        return self._retrier.retries

    def _timeout_for(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    # -- request messages (identical for both clients)

    @staticmethod
    def _model_ready_request(model: str, version: int | str | None) -> pb.ModelReadyRequest:
        return pb.ModelReadyRequest(name=model, version=version_string(version))

    @staticmethod
    def _model_metadata_request(model: str, version: int | str | None) -> pb.ModelMetadataRequest:
        return pb.ModelMetadataRequest(name=model, version=version_string(version))

    @staticmethod
    def _model_config_request(model: str, version: int | str | None) -> pb.ModelConfigRequest:
        return pb.ModelConfigRequest(name=model, version=version_string(version))

    @staticmethod
    def _statistics_request(model: str | None, version: int | str | None) -> pb.ModelStatisticsRequest:
        return pb.ModelStatisticsRequest(name=model or "", version=version_string(version))

    @staticmethod
    def _load_request(
        model: str, parameters: Mapping[str, bool | int | str | bytes] | None
    ) -> pb.RepositoryModelLoadRequest:
        request = pb.RepositoryModelLoadRequest(model_name=model)
        for key, value in (parameters or {}).items():
            request.parameters[key].CopyFrom(repository_param(value))
        return request

    @staticmethod
    def _unload_request(
        model: str, parameters: Mapping[str, bool | int | str | bytes] | None
    ) -> pb.RepositoryModelUnloadRequest:
        request = pb.RepositoryModelUnloadRequest(model_name=model)
        for key, value in (parameters or {}).items():
            request.parameters[key].CopyFrom(repository_param(value))
        return request
