# syntax=docker/dockerfile:1
# keyspace-proxy: a RESP proxy that adds/strips key namespaces. See README.md, "Deployment".
#
# Build:  docker build -t keyspace-proxy .
# Run:    docker run -e REDIS_URL=redis://redis:6379/0 -e PROXY_NAMESPACE=sidekiq -p 9121:9121 keyspace-proxy
# Every flag has a PROXY_* variable (flags given after the image name win).
# Safe by default: clients are taken on 127.0.0.1 only (a sidecar: the pod's or the network
# namespace's own containers); set PROXY_LISTEN=0.0.0.0:6380 to take them from elsewhere. The
# metrics port serves /metrics, /healthz, /readyz; POST /-/reload is off until an admin token is
# given (PROXY_ADMIN_TOKEN or PROXY_ADMIN_TOKEN_FILE, e.g. from a secret).

# --- builder: the full python image has the compilers; it builds wheels of the project (with its
#     C hot path, proxy/_speedups.c, see setup.py) and of its deps
FROM python:3.11-bookworm AS builder
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- final: slim base, only the wheels installed, no compilers, not root
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="keyspace-proxy" \
      org.opencontainers.image.description="RESP proxy that adds or strips Redis key namespaces" \
      org.opencontainers.image.licenses="MIT"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROXY_LISTEN=127.0.0.1:6380 \
    PROXY_METRICS_LISTEN=0.0.0.0:9121
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin proxy
USER 10001:10001
# 6380 is not exposed: it listens on the container's own localhost unless PROXY_LISTEN says otherwise
EXPOSE 9121
# slim has no curl: ask /healthz on the metrics port with the standard library
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('PROXY_METRICS_LISTEN', ':9121').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["keyspace-proxy"]
