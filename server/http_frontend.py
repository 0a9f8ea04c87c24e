"""The HTTP/REST front-end: the Open Inference Protocol's REST binding (KServe v2) and Triton's extensions.

Endpoints (``--http-port``, 8000 by default as Triton's; the same data plane, batchers, statistics,
budget, token and TLS as the gRPC port):

=====  ============================================================  =========================================
GET    ``/v2``                                                       server metadata
GET    ``/v2/health/live``, ``/v2/health/ready``                     200 when live / ready, else 400 (open)
GET    ``/v2/models/{name}[/versions/{v}]``                          model metadata
GET    ``/v2/models/{name}[/versions/{v}]/ready``                    200 when ready, else 400
GET    ``/v2/models/{name}[/versions/{v}]/config``                   Triton's ModelConfig as JSON
POST   ``/v2/models/{name}[/versions/{v}]/infer``                    inference: JSON and binary tensors
GET    ``/v2/models[/{name}[/versions/{v}]]/stats``                  Triton's ModelStatistics as JSON
POST   ``/v2/repository/index``                                      RepositoryIndex (body ``{"ready": b}``)
POST   ``/v2/repository/models/{name}/load`` and ``.../unload``     RepositoryModelLoad / Unload
=====  ============================================================  =========================================

Errors are ``{"error": "<message>"}`` with the HTTP status of the core error's gRPC status, as gRPC's own
mapping to HTTP gives it (``google.rpc.Code``) and Triton's HTTP endpoint uses where it has one:
INVALID_ARGUMENT and FAILED_PRECONDITION 400, UNAUTHENTICATED 401, NOT_FOUND 404, RESOURCE_EXHAUSTED 429
(queue full: with ``Retry-After``; a body over the size limit: 413), CANCELLED 499, INTERNAL 500,
UNAVAILABLE 503, DEADLINE_EXCEEDED 504. A body that is not a v2 request is 400 and counted ``malformed``;
a compressed request body (``Content-Encoding``) is 415, on any path.

Bodies are never decompressed (aiohttp's ``auto_decompress`` is off): a compressed body is refused unread, and
what the client sends with a refused request is discarded as raw bytes. A body the client breaks (a malformed
chunk, a connection dropped mid-body) is one rate-limited warning (``event=bad_http_request``), never a traceback:
such failures are the client's, and anyone on the network could otherwise flood the log.

Cost of a refusal: a request without the token (or, with mutual TLS, without a verified client
certificate) is answered 401 on its headers, before its body is read; whatever body the client sends anyway
is discarded as it arrives (never held) for at most ``LINGER_S`` so that the client can read the answer,
then the connection is closed. An inference request is refused unread while the memory budget is spent or when
its ``Content-Length`` does not fit, is charged its size from the moment it is read until its answer has
been sent, and is cancelled (withdrawn from its batcher) when the client disconnects. The health
endpoints stay open (probes carry no token); with mutual TLS the handshake accepts clients without a
certificate so that Kubernetes' ``scheme: HTTPS`` probes work, and every other path asks for one.

The server is aiohttp's low-level server on the same event loop as gRPC (no router: paths are split
once and matched by their segments).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_request import BaseRequest

from tensorwire.server.dataplane import DataPlane, internal_error
from tensorwire.server.errors import QueueFullError, ServingError
from tensorwire.server.http_json import (
    HEADER_LENGTH,
    MalformedRequest,
    encode_infer_response,
    message_to_json,
    parse_infer_request,
    parse_json,
)
from tensorwire.server.lograte import RateLimitedLog

log = logging.getLogger("tensorwire.http")

#: gRPC status name -> HTTP status (google.rpc.Code's documented HTTP mapping; Triton's where it has one)
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
#: Paths answered without a token or a client certificate: what probes call.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
#: After refusing a request whose body was not read, how long its bytes are read and discarded before the
#: connection closes (closing at once would reset it before many clients, which send the whole body before
#: reading, see the answer).
LINGER_S = 0.5
#: The most a non-inference request body may hold (they are small JSON objects).
MAX_CONTROL_BODY_BYTES = 64 * 2**10
_JSON = "application/json"
_BINARY = "application/octet-stream"
_MESSAGE_UNAUTHENTICATED = "missing or invalid bearer token (send the header 'Authorization: Bearer <token>')"
_MESSAGE_NO_CERTIFICATE = "this server requires a client certificate signed by its --tls-client-ca (mutual TLS)"

Handler = Callable[[BaseRequest, list[str]], Awaitable[web.StreamResponse]]
#: Failures a client causes in aiohttp's parser or payload reader (bad HTTP, a malformed chunk, a body that
#: ends early or a dropped connection): logged as one rate-limited line, without a traceback.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (HttpProcessingError, RequestPayloadError, ConnectionError)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return web.Response(
        status=status, body=json.dumps({"error": message}).encode(), content_type=_JSON, headers=headers
    )


def json_response(value: Any, status: int = 200) -> web.Response:
    """``value`` as a compact JSON body with ``status``."""
    return web.Response(status=status, body=json.dumps(value, separators=(",", ":")).encode(), content_type=_JSON)


def serving_error_response(err: ServingError) -> web.Response:
    """The HTTP answer for a core error: its status mapped, ``Retry-After`` (seconds) for a full queue."""
    headers = None
    if isinstance(err, QueueFullError):
        headers = {"Retry-After": str(max(1, math.ceil(err.retry_after_ms / 1000)))}
    return error_response(HTTP_STATUS.get(err.status, 500), str(err), headers)


def _model_path(parts: list[str]) -> tuple[str, str, list[str]] | None:
    """(name, version, rest) of ``models/{name}[/versions/{v}]/rest...`` segments after ``v2``."""
    if len(parts) < 2 or parts[0] != "models":
        return None
    name, rest = parts[1], parts[2:]
    version = ""
    if len(rest) >= 2 and rest[0] == "versions":
        version, rest = rest[1], rest[2:]
    return name, version, rest


class HttpFrontend:
    """The REST endpoints over ``dataplane`` on one TCP port (see the module docstring).

    ``auth_token``: the bearer token every non-health request must carry (None: none). ``ssl_context``:
    TLS (None: plaintext); ``client_certificate_required``: with mutual TLS, the paths that need a verified
    client certificate (every one but health). ``max_message_bytes``: the largest request body.
    ``reuse_port``: bind with ``SO_REUSEPORT``, so that several front-end processes share the port.
    """

    def __init__(
        self,
        dataplane: DataPlane,
        max_message_bytes: int,
        auth_token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        client_certificate_required: bool = False,
        reuse_port: bool = False,
    ) -> None:
        if auth_token is not None and not auth_token:
            raise ValueError("an empty auth token would accept anyone")
        self.dataplane = dataplane
        self.max_message_bytes = max_message_bytes
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        self._ssl_context = ssl_context
        self._certificate_required = client_certificate_required
        self._reuse_port = reuse_port
        self._runner: web.ServerRunner | None = None
        self._limited_log = RateLimitedLog(log)
        self.port = 0

    def _refuse_encoding(self, request: BaseRequest) -> web.Response | None:
        """415 (connection closed, body unread) when the body is compressed, else None."""
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "identity" or not request.body_exists:
            return None
        response = error_response(
            415, f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed"
        )
        response.force_close()
        return response

    # ------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port. Raises OSError when it is taken."""
        server = web.Server(
            self._handle,
            handler_cancellation=True,
            access_log=None,
            lingering_time=LINGER_S,
            auto_decompress=False,  # bodies are never decompressed: a compressed one is refused (415) unread
            logger=_ServerLog(self._limited_log),
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            host,
            port,
            ssl_context=self._ssl_context,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Stop listening and close the connections (after the drain has finished the accepted requests)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------- routing

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        path = request.path
        method = self._method_name(path)
        if path not in OPEN_PATHS:
            refusal = self._authenticate(request, method)
            if refusal is not None:
                return refusal
        try:
            return await self._route(request, path)
        except _Answer as answer:
            return answer.response
        except ServingError as err:
            return serving_error_response(err)
        except MalformedRequest as err:
            self.dataplane.refuse(method, "malformed")
            self._limited_log.warning("malformed_http", "path=%s peer=%s error=%r", path, request.remote, str(err))
            return error_response(400, f"malformed request: {err}")
        except (asyncio.CancelledError, web.HTTPException, ConnectionError):
            raise
        except (HttpProcessingError, RequestPayloadError) as err:  # the client broke its body
            self._limited_log.warning("bad_http_request", "path=%s peer=%s error=%r", path, request.remote, _brief(err))
            response = error_response(400, f"the request body could not be read: {_brief(err)}")
            response.force_close()
            return response
        except Exception as err:  # noqa: BLE001 - a bug of ours: 500 without internals, traceback to the log
            return serving_error_response(internal_error(path[:100], err))

    @staticmethod
    def _method_name(path: str) -> str:
        """The protocol method a path calls (the ``method`` label of refusal counts, as on gRPC)."""
        if path.endswith("/infer"):
            return "ModelInfer"
        if path.startswith("/v2/repository/"):
            return {"index": "RepositoryIndex", "load": "RepositoryModelLoad", "unload": "RepositoryModelUnload"}.get(
                path.rsplit("/", 1)[-1], "Repository"
            )
        if path.endswith("/stats"):
            return "ModelStatistics"
        if path.endswith("/ready"):
            return "ServerReady" if path == "/v2/health/ready" else "ModelReady"
        if path.endswith("/config"):
            return "ModelConfig"
        if path.startswith("/v2/models/"):
            return "ModelMetadata"
        return "ServerLive" if path == "/v2/health/live" else "ServerMetadata"

    def _authenticate(self, request: BaseRequest, method: str) -> web.Response | None:
        """401 (counted ``unauthenticated``, connection closed so no body is read) or None when allowed."""
        message = None
        if self._certificate_required and not (
            request.transport is not None and request.transport.get_extra_info("peercert")
        ):
            message = _MESSAGE_NO_CERTIFICATE
        elif self._expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):
                message = _MESSAGE_UNAUTHENTICATED
        if message is None:
            return None
        self.dataplane.refuse(method, "unauthenticated")
        response = error_response(401, message, {"WWW-Authenticate": 'Bearer realm="tensorwire"'})
        if request.body_exists:
            response.force_close()
        return response

    async def _route(self, request: BaseRequest, path: str) -> web.StreamResponse:
        parts = path.strip("/").split("/")
        if not parts or parts[0] != "v2":
            return error_response(404, f"no such endpoint: {path[:100]}; the v2 REST endpoints are under /v2")
        parts = parts[1:]
        verb = request.method
        if not parts:
            return self._only(verb, "GET") or self._server_metadata()
        if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
            return self._only(verb, "GET") or self._health(parts[1])
        if parts == ["models", "stats"]:
            return self._only(verb, "GET") or json_response({"model_stats": await self._stats("", "")})
        if parts[0] == "repository":
            return await self._repository(request, parts[1:])
        located = _model_path(parts)
        if located is None:
            return error_response(404, f"no such endpoint: {path[:100]}")
        name, version, rest = located
        if not rest:
            return self._only(verb, "GET") or self._model_metadata(name, version)
        if rest == ["ready"]:
            return self._only(verb, "GET") or self._model_ready(name, version)
        if rest == ["config"]:
            return self._only(verb, "GET") or json_response(message_to_json(self.dataplane.model_config(name, version)))
        if rest == ["stats"]:
            return self._only(verb, "GET") or json_response({"model_stats": await self._stats(name, version)})
        if rest == ["infer"]:
            return self._only(verb, "POST") or await self._infer(request, name, version)
        return error_response(404, f"no such endpoint: {path[:100]}")

    @staticmethod
    def _only(verb: str, allowed: str) -> web.Response | None:
        if verb == allowed or (allowed == "GET" and verb == "HEAD"):
            return None
        return error_response(405, f"use {allowed} here, not {verb}", {"Allow": allowed})

    # ---------------------------------------------------- health, metadata

    def _health(self, which: str) -> web.Response:
        if which == "live":
            live = self.dataplane.live()
            return json_response({"live": live}, 200 if live else 400)
        ready = self.dataplane.ready()
        return json_response({"ready": ready}, 200 if ready else 400)

    def _server_metadata(self) -> web.Response:
        name, version, extensions = self.dataplane.server_metadata()
        return json_response({"name": name, "version": version, "extensions": extensions})

    def _model_metadata(self, name: str, version: str) -> web.Response:
        meta = self.dataplane.model_metadata(name, version)
        return json_response(
            {
                "name": meta.name,
                "versions": meta.versions,
                "platform": meta.platform,
                "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in meta.inputs],
                "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in meta.outputs],
            }
        )

    def _model_ready(self, name: str, version: str) -> web.Response:
        ready = self.dataplane.model_ready(name, version)
        return json_response({"name": name, "ready": ready}, 200 if ready else 400)

    async def _stats(self, name: str, version: str) -> list[dict]:
        return [message_to_json(stats) for stats in await self.dataplane.statistics(name, version)]

    # ---------------------------------------------------------- repository

    async def _repository(self, request: BaseRequest, parts: list[str]) -> web.StreamResponse:
        if parts == ["index"]:
            if request.method not in ("GET", "POST"):
                return error_response(405, f"use POST here, not {request.method}", {"Allow": "POST, GET"})
            body = await self._control_body(request)
            ready = body.get("ready", False)
            if not isinstance(ready, bool):
                raise MalformedRequest("'ready' must be true or false")
            rows = []
            for row in await self.dataplane.repository_index(ready_only=ready):
                entry = {"name": row.name}
                if row.version:
                    entry["version"] = row.version
                entry["state"] = row.state
                if row.reason:
                    entry["reason"] = row.reason
                rows.append(entry)
            return json_response(rows)
        if len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload"):
            refused = self._only(request.method, "POST")
            if refused is not None:
                return refused
            body = await self._control_body(request)
            if parts[2] == "load":
                await self.dataplane.load(parts[1], body.get("parameters"))
            else:
                await self.dataplane.unload(parts[1])  # unload_dependents: no ensembles here, nothing to do
            return web.Response(status=200, body=b"", content_type=_JSON)
        return error_response(404, f"no such endpoint: /v2/repository/{'/'.join(parts)[:100]}")

    async def _control_body(self, request: BaseRequest) -> dict:
        """The small JSON object a control request may carry ({} when empty)."""
        if not request.body_exists:
            return {}
        refused = self._refuse_encoding(request)
        if refused is not None:
            raise _Answer(refused)
        length = request.content_length
        if length is not None and length > MAX_CONTROL_BODY_BYTES:
            response = error_response(413, f"this request's body is limited to {MAX_CONTROL_BODY_BYTES} bytes")
            response.force_close()
            raise _Answer(response)
        body = await self._read(request, MAX_CONTROL_BODY_BYTES, method=self._method_name(request.path))
        if not body.strip():
            return {}
        value = parse_json(body)
        if not isinstance(value, dict):
            raise MalformedRequest("the body must be a JSON object")
        params = value.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise MalformedRequest("'parameters' must be a JSON object")
        return value

    # ----------------------------------------------------------- inference

    async def _infer(self, request: BaseRequest, name: str, version: str) -> web.StreamResponse:
        """One inference: budget and size checks before the body is read, the data plane, the answer; the
        request's and the answer's bytes stay charged until the answer has been written."""
        dataplane, budget = self.dataplane, self.dataplane.budget
        refused = self._refuse_encoding(request)
        if refused is not None:
            return refused
        dataplane.admit_unread("ModelInfer")
        length = request.content_length
        if length is not None and length > self.max_message_bytes:
            dataplane.refuse("ModelInfer", "memory_budget")
            response = error_response(
                413,
                f"the request body of {length} bytes is larger than this server's limit of "
                f"{self.max_message_bytes} bytes (tensorwire serve --max-message-bytes)",
            )
            response.force_close()
            return response
        held = 0
        try:
            if length is not None:
                dataplane.hold("ModelInfer", length)
                held = length
                body = await self._read(request, self.max_message_bytes, length)
            else:  # chunked: read (counted as a large recent request meanwhile), then charge
                expected = budget.start_read()
                body = None
                try:
                    body = await self._read(request, self.max_message_bytes)
                finally:
                    budget.end_read(expected, None if body is None else len(body))
                dataplane.hold("ModelInfer", len(body))
                held = len(body)
            header_length = request.headers.get(HEADER_LENGTH)
            if header_length is not None:
                try:
                    header_length = int(header_length)
                except ValueError:
                    raise MalformedRequest(f"{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}") from None
            neutral, binary_outputs, binary_default = parse_infer_request(body, header_length, name, version)
            del body

            def encode(served, request_id, outputs):
                return encode_infer_response(served, request_id, outputs, binary_outputs, binary_default)

            answer, json_length = await dataplane.infer(neutral, None, encode)
            del neutral
            budget.charge(len(answer))
            held += len(answer)
            headers = {HEADER_LENGTH: str(json_length)} if json_length is not None else None
            response = web.Response(
                body=answer, content_type=_JSON if json_length is None else _BINARY, headers=headers
            )
            await response.prepare(request)
            await response.write_eof()
            return response
        finally:
            if held:
                budget.release(held)

    async def _read(
        self, request: BaseRequest, limit: int, length: int | None = None, method: str = "ModelInfer"
    ) -> bytearray:
        """The request body, at most ``limit`` bytes (413 beyond, counted under ``method``, connection
        closed); with a known ``length``, read into one buffer of that size (no second copy)."""
        content = request.content
        if length is not None:
            body = bytearray(length)
            offset = 0
            while offset < length:
                chunk = await content.readany()
                if not chunk:
                    break
                body[offset : offset + len(chunk)] = chunk
                offset += len(chunk)
            if offset != length:
                raise MalformedRequest(f"the body ended after {offset} of its {length} bytes")
            return body
        body = bytearray()
        while True:
            chunk = await content.readany()
            if not chunk:
                return body
            body += chunk
            if len(body) > limit:
                self.dataplane.refuse(method, "memory_budget")
                response = error_response(413, f"the request body is larger than this server's limit of {limit} bytes")
                response.force_close()
                raise _Answer(response)


class _Answer(Exception):
    """Raised to answer at once with ``response`` from deep inside a handler."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _brief(err: BaseException) -> str:
    """One line for a client-caused aiohttp error (its message without aiohttp's line breaks)."""
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())[:200]


class _ServerLog(logging.LoggerAdapter):
    """The logger aiohttp's server writes to (``aiohttp.server``), where a failure the client caused (see
    ``CLIENT_ERRORS``: raised while aiohttp discards a refused request's body or parses a malformed message)
    becomes one rate-limited ``event=bad_http_request`` line instead of an ERROR with a traceback; any other
    exception is logged as aiohttp logs it."""

    def __init__(self, limited: RateLimitedLog) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._limited = limited

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        err = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(err, CLIENT_ERRORS):
            self._limited.warning("bad_http_request", "error=%r", _brief(err))
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)
