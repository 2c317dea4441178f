# syntax=docker/dockerfile:1
# The gateway as a container image: built in one stage, run from a clean slim image as a
# non-root user with nothing but the virtualenv. Config and keys are mounted, never baked in:
#   /etc/gateway/gateway.yaml   the config (a ConfigMap in deploy/kubernetes/)
#   /etc/gateway/keys/          the signing key (a Secret)
# Build: docker build -t edge-gateway .    Run: see deploy/README.md

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: compilers live here only, for any dependency without a binary wheel ------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/gateway
WORKDIR /src
# Dependencies first so code changes do not invalidate the dependency layer.
COPY pyproject.toml README.md ./
RUN mkdir gateway && touch gateway/__init__.py \
 && /opt/gateway/bin/pip install . \
 && /opt/gateway/bin/pip uninstall -y edge-gateway
COPY gateway ./gateway
RUN /opt/gateway/bin/pip install --no-deps . \
 && /opt/gateway/bin/python -m compileall -q /opt/gateway

# --- runtime: same base, no build tools, no shell tools needed --------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_PORT=8080
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/gateway/keys
COPY --from=build /opt/gateway /opt/gateway
USER 10001:10001
EXPOSE 8080 9090
# No curl in slim images: the interpreter we already ship does the probe. GATEWAY_PORT must
# match `listen.port` of the mounted config (8080 in every example).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8080'), timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gateway"]
CMD ["serve", "-c", "/etc/gateway/gateway.yaml"]
