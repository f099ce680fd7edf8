# syntax=docker/dockerfile:1
# EdgeFaaS runtime image: the prebuilt static edgefaas binary on a small Python base.
# Build it with `make image ARCH=arm|armv6|arm64|amd64` (scripts/image), which first
# builds dist/linux-<arch>/edgefaas. Any base with python3 works: the default
# Alpine one, or a Debian one (BASE=...; CI makes one with debootstrap). Only
# POSIX shell commands below, so busybox and Debian alike run them.
ARG BASE=python:3.12-alpine3.20
FROM ${BASE}

# amd64, arm64, armv7 or armv6: which dist/ binary (passed by scripts/image; not
# TARGETARCH, which some engines leave empty).
ARG ARCH=amd64
ARG VERSION=dev
ARG REVISION=unknown

LABEL org.opencontainers.image.title="edgefaas" \
      org.opencontainers.image.description="Function-as-a-Service runtime for edge devices: many Python functions in one small container" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT"

# Packages every function may import (pip only when the list names any); the user
# app (uid/gid 10001) written directly, as adduser's flags differ between bases.
COPY python/requirements.txt /tmp/requirements.txt
RUN set -eu; \
    if grep -q '^[[:space:]]*[^#[:space:]]' /tmp/requirements.txt; then \
      python3 -m pip --version >/dev/null 2>&1 \
        || { echo "python/requirements.txt lists packages, but this base has no pip" >&2; exit 1; }; \
      python3 -m pip install --no-cache-dir --disable-pip-version-check --break-system-packages \
        -r /tmp/requirements.txt; \
    fi; \
    rm /tmp/requirements.txt; \
    echo 'app:x:10001:10001:EdgeFaaS:/home/app:/sbin/nologin' >> /etc/passwd; \
    echo 'app:x:10001:' >> /etc/group; \
    mkdir -p /home/app/function; \
    chown -R 10001:10001 /home/app

COPY --chmod=0755 dist/linux-${ARCH}/edgefaas /usr/local/bin/edgefaas

ENV EDGEFAAS_FUNCTIONS_DIR=/home/app/function \
    EDGEFAAS_PYTHON=python3 \
    EDGEFAAS_PORT=8080 \
    PYTHONDONTWRITEBYTECODE=1

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/app
VOLUME ["/home/app/function"]
EXPOSE 8080

# The binary checks itself: no curl or wget needed in the image.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/edgefaas", "healthcheck"]

# edgefaas reaps and kills orphans itself (child subreaper), so it can run as PID 1.
ENTRYPOINT ["/usr/local/bin/edgefaas"]
