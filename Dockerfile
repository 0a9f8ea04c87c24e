# tensorwire server image (CPU).
#
#   docker build -t tensorwire:0.1.0 .
#   docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v "$PWD/models:/models:ro" tensorwire:0.1.0
#
# The install steps are the README's ("Install"), run in the clone: build a wheel, install it with the
# pinned versions. TorchScript models need torch too: --build-arg EXTRAS=server,torch.
# The GPU variant is deploy/Dockerfile.gpu.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY . .
RUN python -m pip wheel --no-deps --wheel-dir dist .

FROM ${PYTHON_IMAGE}
ARG EXTRAS=server
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# tini as PID 1: forwards SIGTERM to the server (which then drains) and reaps any child process.
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY --from=wheel /src/dist dist
COPY constraints.txt .
RUN python -m pip install -c constraints.txt "$(ls dist/tensorwire-*.whl)[${EXTRAS}]"
RUN rm -rf /src && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin tensorwire \
    && mkdir /models && chown 10001:10001 /models
WORKDIR /
USER 10001:10001
# The model repository: <model>/config.toml (or config.pbtxt, or none) and <model>/<version>/model.onnx ...
VOLUME ["/models"]
# 8000 HTTP/REST (v2 REST, /v2/health/live and /ready); 8001 gRPC (inference, health, reflection);
# 8002 Prometheus /metrics.
EXPOSE 8000 8001 8002
STOPSIGNAL SIGTERM
# Docker has one health state: healthy = live and ready (every configured model READY, not draining), what
# `depends_on: condition: service_healthy` waits for; a long first load gets 5 minutes. Orchestrators with
# separate probes use /v2/health/live and /v2/health/ready (or gRPC health "" and the inference service).
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["tensorwire", "health", "--address", "127.0.0.1:8001", "--timeout", "3", "--retries", "1"]
ENTRYPOINT ["tini", "--", "tensorwire"]
CMD ["serve", "--repo", "/models", "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002", "--drain-seconds", "5", "--grace-seconds", "30"]
