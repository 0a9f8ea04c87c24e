"""The one client core: what the blocking and the asyncio client both do, written once.

Every operation of the SDK is a *plan*: a generator that builds the request messages,
decides deadlines and retries, maps errors and decodes the answers, and hands the only
two things that differ between the clients to a driver as *effects*:

* :class:`Attempt`: make one gRPC call (the driver sends back the response message, or
  the ``grpc.RpcError`` it failed with, without raising it);
* :class:`Sleep`: wait before the next attempt.

:class:`~tensorwire.client.InferenceClient` drives plans with blocking calls and
``time.sleep``; :class:`~tensorwire.client.AsyncInferenceClient` with ``await`` and
``asyncio.sleep``. The public methods of both are one line each: ``self._drive(plan)``.
Driving a plan costs one generator per call, a microsecond or two against a call's
hundreds.

Input casting (rule in :mod:`tensorwire.client._casting`) needs the datatypes a model
declares: they come from ``ModelMetadata``, fetched once per (model, version) and cached
by the client. A cached entry is dropped when the server answers a call for that model
with NOT_FOUND, INVALID_ARGUMENT or UNAVAILABLE (the model may have been reloaded with
other inputs), when an answer names a version the entry does not list, and before any
input is refused by the casting rule (the refusal is always checked against a fresh
copy). Servers without ``ModelMetadata`` (UNIMPLEMENTED, or PERMISSION_DENIED for this
caller) get inputs exactly as given.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from tensorwire.client._casting import conform
from tensorwire.client._channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ChannelSpec,
    KeepAlive,
    TLSConfig,
    channel_spec,
)
from tensorwire.client._convert import (
    Inputs,
    Outputs,
    ParamValue,
    RepositoryParams,
    build_request,
    parse_response,
    repository_param,
    version_string,
)
from tensorwire.client.errors import InferenceServerError, InvalidInputError, UnavailableError, from_rpc_error
from tensorwire.client.results import InferResult, Tensor
from tensorwire.client.retry import Retrier, RetryPolicy
from tensorwire.proto import inference_pb2 as pb

log = logging.getLogger("tensorwire.client")

T = TypeVar("T")

#: Sent as the gRPC user agent, so server logs can tell SDK traffic apart.
USER_AGENT = "tensorwire-client/0.1"
BF16_MODES = ("float32", "bits", "bfloat16")
DEFAULT_KEEPALIVE = KeepAlive()
#: How many (model, version) signatures a client keeps; the oldest goes first beyond it.
SIGNATURE_CACHE_SIZE = 1024

#: Answers after which a cached signature may be stale (model reloaded, unloaded or changed).
_STALE_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE})
#: ModelMetadata failures after which inputs go out exactly as given (no casting).
_NO_METADATA_CODES = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED})
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Attempt:
    """Effect: call unary ``method`` once with ``request`` and at most ``timeout_s`` seconds (None: no deadline)."""

    method: str
    request: Message
    timeout_s: float | None


@dataclass(frozen=True, slots=True)
class Sleep:
    """Effect: wait ``delay_s`` seconds before going on."""

    delay_s: float


#: A plan: yields effects, receives each Attempt's outcome (response or grpc.RpcError), returns T.
Plan = Generator[Attempt | Sleep, Any, T]


@dataclass(frozen=True, slots=True)
class Signature:
    """What a model's metadata says about its inputs: name -> v2 datatype, and its ready versions."""

    inputs: dict[str, str]
    versions: frozenset[str]

    @classmethod
    def of(cls, metadata: pb.ModelMetadataResponse) -> Signature:
        return cls({t.name: t.datatype for t in metadata.inputs}, frozenset(metadata.versions))


class ClientBase:
    """Configuration and behaviour common to :class:`InferenceClient` and :class:`AsyncInferenceClient`.

    Args:
        address: ``"host:port"``, a comma-separated list, or a sequence of them. Several
            addresses are balanced call by call with gRPC's round_robin policy. A host without
            a port gets 8001.
        tls: ``True`` for TLS with the system's CA roots, or a :class:`TLSConfig` with
            PEM file paths (add ``cert_file``/``key_file`` for mutual TLS). ``None``: plaintext.
        token: a bearer token, sent as ``authorization: Bearer <token>`` on every call.
        compression: ``"gzip"`` (or ``"deflate"``) to compress requests; ``None``: none.
        timeout: default deadline in seconds for every unary call (``None``: no deadline);
            each method's own ``timeout`` overrides it. Retries happen within it.
        retry: a :class:`RetryPolicy` (default: conservative, see ``tensorwire.client.retry``);
            ``RetryPolicy.disabled()`` turns retries off.
        keepalive: HTTP/2 keep-alive settings (``None``: gRPC's defaults, no pings).
        max_message_bytes: send and receive limit in bytes; 2 GiB - 1 by default, as on the server.
        load_balancing: a gRPC LB policy name; ``"round_robin"`` is chosen by itself
            when several addresses are given.
        options: extra gRPC channel options, applied last.
        bf16_as: how BF16 outputs come back: ``"float32"`` (exact), ``"bits"`` (uint16
            patterns) or ``"bfloat16"`` (an ``ml_dtypes`` array, if installed).

    Raises:
        ValueError: a bad ``bf16_as``, ``timeout``, ``compression`` or address; a host that
            cannot be resolved (several addresses are resolved here, once).
        OSError: a TLS file that cannot be read (read here, not at the first call).
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
        self._timeout_s = timeout
        self._bf16_as = bf16_as
        self._signatures: dict[tuple[str, str], Signature | None] = {}
        self._setup()

    def _setup(self) -> None:
        """Open the channel (or prepare to): each client kind does its own."""
        raise NotImplementedError

    @property
    def target(self) -> str:
        """The gRPC target this client's channel was opened on (``host:port`` or ``ipv4:a,b``)."""
        return self._spec.target

    @property
    def retries(self) -> int:
        """How many retries this client has made so far (all calls together; first attempts not counted)."""
        return self._retrier.retries

    # ------------------------------------------------------------ deadlines and retries

    def _timeout_for(self, timeout: float | None) -> float | None:
        """A call's timeout in seconds: its own, or else the client's default (None: no deadline)."""
        return self._timeout_s if timeout is None else timeout

    def _deadline(self, timeout: float | None) -> float | None:
        """The retrier clock's value by which a call given ``timeout`` (seconds) must end."""
        return self._retrier.deadline(self._timeout_for(timeout))

    def _unary(self, method: str, request: Message, deadline: float | None) -> Plan[Any]:
        """One unary call with the client's retry policy, all attempts within ``deadline``.

        Returns the response message; raises the mapped :class:`InferenceServerError` when the
        last attempt fails (and the policy allows no further one).
        """
        retrier = self._retrier
        retrier.budget.record_request()
        attempt = 1
        while True:
            outcome = yield Attempt(method, request, retrier.remaining(deadline))
            if not isinstance(outcome, grpc.RpcError):
                return outcome
            code, details = outcome.code(), outcome.details()
            trailing = tuple(outcome.trailing_metadata() or ())
            delay = retrier.next_delay(code, details, trailing, attempt, deadline)
            if delay is None:
                raise from_rpc_error(outcome)
            log.debug("%s failed (%s: %s); retry %d in %.3fs", method, code, details, attempt, delay)
            yield Sleep(delay)
            attempt += 1

    def _call(self, method: str, request: Message, timeout: float | None) -> Plan[Any]:
        return (yield from self._unary(method, request, self._deadline(timeout)))

    # ----------------------------------------------------------- model signatures

    def _signature(self, model: str, version: str, deadline: float | None) -> Plan[Signature | None]:
        """The model's input datatypes from the cache or ``ModelMetadata``; None when the server has none."""
        key = (model, version)
        cached = self._signatures.get(key, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        request = pb.ModelMetadataRequest(name=model, version=version)
        try:
            metadata = yield from self._unary("ModelMetadata", request, deadline)
        except InferenceServerError as error:
            if error.code not in _NO_METADATA_CODES:
                raise
            signature = None
        else:
            signature = Signature.of(metadata)
        if len(self._signatures) >= SIGNATURE_CACHE_SIZE:
            for oldest in list(self._signatures)[:1]:  # a copy: other threads may change the dict meanwhile
                self._signatures.pop(oldest, None)
        self._signatures[key] = signature
        return signature

    def _forget(self, model: str, version: str) -> None:
        """Drop a cached signature (the next call that needs it asks the server again)."""
        self._signatures.pop((model, version), None)

    def _note_failure(self, model: str, version: int | str | None, error: InferenceServerError) -> None:
        """A request for ``model`` failed with ``error``: drop its cached signature if it may be stale."""
        if error.code in _STALE_CODES:
            self._forget(model, version_string(version))

    def _check_version(self, model: str, version: str, served: str) -> None:
        """Drop the cached signature when an answer came from a version it does not list."""
        signature = self._signatures.get((model, version))
        if signature is not None and served and signature.versions and served not in signature.versions:
            self._forget(model, version)

    def _inputs(
        self, model: str, version: str, inputs: Any, deadline: float | None
    ) -> Plan[tuple[Mapping[str, Any], Signature | None]]:
        """``inputs`` named and fitted to the model's declared datatypes (the casting rule).

        A bare value (anything but a mapping) is the one input of a single-input model.
        Returns the fitted inputs and the signature used when it came from the cache (None
        when none was needed, or it was fetched now). Raises InvalidInputError for a bare
        value given to a model with several inputs (or whose metadata is unavailable) and
        for values the casting rule refuses; a refusal made with a cached signature is
        checked again with a fresh one first.
        """
        if not _needs_signature(inputs):
            return inputs, None
        signature = self._signatures.get((model, version), _MISSING)
        cached = signature is not _MISSING
        if not cached:
            signature = yield from self._signature(model, version, deadline)
        try:
            return _fit(model, inputs, signature), signature if cached else None
        except InvalidInputError:
            if not cached:
                raise
        self._forget(model, version)
        signature = yield from self._signature(model, version, deadline)
        return _fit(model, inputs, signature), None

    # ------------------------------------------------------------------- plans

    def _plan_infer(
        self,
        model: str,
        inputs: Inputs | Any,
        outputs: Outputs | None,
        version: int | str | None,
        timeout: float | None,
        priority: int | None,
        request_id: str | None,
        parameters: Mapping[str, ParamValue] | None,
    ) -> Plan[InferResult]:
        """One ModelInfer with fitted inputs.

        When the server refuses the request as invalid and the inputs were fitted with a
        cached signature that a fresh ``ModelMetadata`` contradicts (the model was reloaded
        with other inputs since), they are fitted again and sent once more: a refused
        request never ran, and the first one was built from outdated knowledge.
        """
        if not isinstance(model, str) or not model:
            raise InvalidInputError("a model name is required")
        deadline = self._deadline(timeout)
        wanted = version_string(version)
        named, cached = yield from self._inputs(model, wanted, inputs, deadline)
        while True:
            request = _infer_request(model, named, outputs, version, priority, request_id, parameters)
            try:
                response = yield from self._unary("ModelInfer", request, deadline)
            except InferenceServerError as error:
                self._note_failure(model, wanted, error)
                if cached is None or error.code is not grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                fresh = yield from self._signature(model, wanted, deadline)
                if fresh is None or fresh.inputs == cached.inputs:
                    raise
                named, cached = _fit(model, inputs, fresh), None
                continue
            self._check_version(model, wanted, response.model_version)
            return parse_response(response, self._bf16_as)

    def _plan_stream_request(
        self,
        model: str,
        version: int | str | None,
        outputs: Outputs | None,
        inputs: Inputs | Any,
        request_id: str | None,
        priority: int | None,
        parameters: Mapping[str, ParamValue] | None,
    ) -> Plan[pb.ModelInferRequest | InferenceServerError]:
        """A stream request; a failed metadata lookup is returned (that item fails), bad inputs raise."""
        wanted = version_string(version)
        deadline = self._deadline(None)
        if _needs_signature(inputs):
            try:
                yield from self._signature(model, wanted, deadline)  # the server's refusal fails this item
            except InferenceServerError as error:
                return error
        named, _ = yield from self._inputs(model, wanted, inputs, deadline)
        return _infer_request(model, named, outputs, version, priority, request_id, parameters)

    def _plan_server_live(self, timeout: float | None) -> Plan[bool]:
        return (yield from self._call("ServerLive", pb.ServerLiveRequest(), timeout)).live

    def _plan_server_ready(self, timeout: float | None) -> Plan[bool]:
        return (yield from self._call("ServerReady", pb.ServerReadyRequest(), timeout)).ready

    def _plan_model_ready(self, model: str, version: int | str | None, timeout: float | None) -> Plan[bool]:
        request = pb.ModelReadyRequest(name=model, version=version_string(version))
        return (yield from self._call("ModelReady", request, timeout)).ready

    def _plan_server_metadata(self, timeout: float | None) -> Plan[pb.ServerMetadataResponse]:
        return (yield from self._call("ServerMetadata", pb.ServerMetadataRequest(), timeout))

    def _plan_model_metadata(
        self, model: str, version: int | str | None, timeout: float | None
    ) -> Plan[pb.ModelMetadataResponse]:
        wanted = version_string(version)
        metadata = yield from self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=wanted), timeout)
        self._signatures[(model, wanted)] = Signature.of(metadata)  # the freshest copy there is
        return metadata

    def _plan_model_config(self, model: str, version: int | str | None, timeout: float | None) -> Plan[pb.ModelConfig]:
        request = pb.ModelConfigRequest(name=model, version=version_string(version))
        return (yield from self._call("ModelConfig", request, timeout)).config

    def _plan_model_statistics(
        self, model: str | None, version: int | str | None, timeout: float | None
    ) -> Plan[pb.ModelStatisticsResponse]:
        request = pb.ModelStatisticsRequest(name=model or "", version=version_string(version))
        return (yield from self._call("ModelStatistics", request, timeout))

    def _plan_repository_index(
        self, ready: bool, timeout: float | None
    ) -> Plan[list[pb.RepositoryIndexResponse.ModelIndex]]:
        response = yield from self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), timeout)
        return list(response.models)

    def _plan_load_model(self, model: str, parameters: RepositoryParams | None, timeout: float | None) -> Plan[None]:
        yield from self._repository_call("RepositoryModelLoad", model, parameters, timeout)

    def _plan_unload_model(self, model: str, parameters: RepositoryParams | None, timeout: float | None) -> Plan[None]:
        yield from self._repository_call("RepositoryModelUnload", model, parameters, timeout)

    def _repository_call(
        self,
        method: str,
        model: str,
        parameters: RepositoryParams | None,
        timeout: float | None,
    ) -> Plan[None]:
        """Load or unload ``model``; the model's cached signatures are dropped before and after."""
        kind = pb.RepositoryModelLoadRequest if method == "RepositoryModelLoad" else pb.RepositoryModelUnloadRequest
        request = kind(model_name=model)
        for key, value in (parameters or {}).items():
            request.parameters[key].CopyFrom(repository_param(value))
        self._forget_model(model)
        try:
            yield from self._call(method, request, timeout)
        finally:
            self._forget_model(model)

    def _forget_model(self, model: str) -> None:
        """Drop every cached signature of ``model`` (all versions)."""
        for key in list(self._signatures):  # a copy: other threads may change the dict meanwhile
            if key[0] == model:
                self._signatures.pop(key, None)

    def _plan_wait_until_ready(self, model: str | None, timeout: float, interval: float) -> Plan[None]:
        clock = self._retrier.clock
        deadline = clock() + timeout
        probe_timeout_s = max(interval, 1.0)
        last: Exception | None = None
        while True:
            try:
                if model is None:
                    ready = yield from self._plan_server_ready(probe_timeout_s)
                else:  # only this model: under strict readiness another model may keep the server not ready
                    ready = yield from self._plan_server_live(probe_timeout_s)
                    ready = ready and (yield from self._plan_model_ready(model, None, probe_timeout_s))
                if ready:
                    return
            except InferenceServerError as error:
                last = error
            if clock() + interval > deadline:
                what = f"model {model!r}" if model else "server"
                why = last or "not ready"
                raise UnavailableError(f"{what} at {self.target} not ready after {timeout}s ({why})")
            yield Sleep(interval)


def _infer_request(
    model: str,
    named: Mapping[str, Any],
    outputs: Outputs | None,
    version: int | str | None,
    priority: int | None,
    request_id: str | None,
    parameters: Mapping[str, ParamValue] | None,
) -> pb.ModelInferRequest:
    return build_request(
        model, named, outputs=outputs, version=version, priority=priority, request_id=request_id, parameters=parameters
    )


def _needs_signature(inputs: Any) -> bool:
    """Whether fitting ``inputs`` needs the model's metadata (a bare value, or any datatype left implicit)."""
    if not isinstance(inputs, Mapping):
        return True
    for value in inputs.values():
        if type(value) is not Tensor or value.datatype is None:
            return True
    return False


def _fit(model: str, inputs: Any, signature: Signature | None) -> Mapping[str, Any]:
    """Name a bare value and apply the casting rule to every input the signature declares."""
    named = {_single_input(model, signature): inputs} if not isinstance(inputs, Mapping) else inputs
    if signature is None:
        return named
    declared = signature.inputs
    return {
        name: value if declared.get(name) is None else conform(name, value, declared[name])
        for name, value in named.items()
    }


def _single_input(model: str, signature: Signature | None) -> str:
    """The name of a single-input model's input, for a bare value."""
    if signature is None:
        raise InvalidInputError(
            f"a bare value needs model {model!r}'s input name, and the server offers no model metadata; "
            "pass {input name: value}"
        )
    if len(signature.inputs) != 1:
        names = ", ".join(signature.inputs) or "none"
        raise InvalidInputError(
            f"model {model!r} has {len(signature.inputs)} inputs ({names}): "
            "pass {input name: value}, not a bare value"
        )
    return next(iter(signature.inputs))
