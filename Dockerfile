# One image for every toolmesh component: `toolmesh operator`, `toolmesh sidecar`, `toolmesh registry`.
# Build: docker build -t ghcr.io/toolmesh/toolmesh:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the wheel, then a virtualenv holding it and its pinned dependencies ----------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY api/ api/
COPY operator/ operator/
COPY sidecar/ sidecar/
COPY registry/ registry/
COPY cli/ cli/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .
# mcp-server-time is the stdio server the quickstart runs from this image (an MCPServer with only a command).
# tiktoken's vocabularies are written where the tokenizer looks, so the sidecar downloads nothing at start.
# pip goes last: the runtime stage must not be able to install anything.
RUN python -m venv /opt/toolmesh \
 && /opt/toolmesh/bin/pip install --no-cache-dir --constraint constraints.txt /dist/toolmesh-*.whl mcp-server-time==2026.10.19 \
 && TIKTOKEN_CACHE_DIR=/opt/toolmesh/tiktoken /opt/toolmesh/bin/python -c "from toolmesh.sidecar.chain.stages import tokenizer; [tokenizer.encoding(name) for name in tokenizer.ENCODINGS]" \
 && /opt/toolmesh/bin/python -m pip uninstall --yes pip

# --- runtime: slim Python, the virtualenv, a non-root user --------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="toolmesh" \
      org.opencontainers.image.description="Kubernetes operator and sidecar that make any MCP server production-ready without changing it" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/toolmesh/toolmesh"
# The base image's pip, setuptools and wheel are build tools: removed. A fixed numeric uid lets Kubernetes check
# runAsNonRoot; its group is 10001 too, named, so `USER 10001:10001` and `docker run --user 10001` agree.
RUN python -m pip uninstall --yes pip setuptools wheel \
 && groupadd --system --gid 10001 toolmesh \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin toolmesh
COPY --from=build /opt/toolmesh /opt/toolmesh
# TIKTOKEN_CACHE_DIR names a folder of vocabularies, not a secret.
# hadolint ignore=DL3064
ENV PATH=/opt/toolmesh/bin:$PATH \
    TIKTOKEN_CACHE_DIR=/opt/toolmesh/tiktoken \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 10001:10001
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz.
ENTRYPOINT ["toolmesh"]
CMD ["--help"]
