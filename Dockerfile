# syntax=docker/dockerfile:1
# EdgeFaaS runtime image: the prebuilt static edgefaas binary on a small Python base.
# Build it with `make image ARCH=arm|arm64|amd64`, which first builds
# dist/linux-<arch>/edgefaas (docker's TARGETARCH names: arm, arm64, amd64).
FROM python:3.12-alpine3.20

ARG TARGETARCH
ARG VERSION=dev
ARG REVISION=unknown

LABEL org.opencontainers.image.title="edgefaas" \
      org.opencontainers.image.description="Function-as-a-Service runtime for edge devices: many Python functions in one small container" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT"

# Packages every function may import; a layer of its own so code changes do not redo it.
COPY python/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && addgroup -S -g 10001 app \
    && adduser -S -u 10001 -G app -h /home/app -s /sbin/nologin app \
    && mkdir -p /home/app/function \
    && chown app:app /home/app/function

COPY --chmod=0755 dist/linux-${TARGETARCH}/edgefaas /usr/local/bin/edgefaas

ENV EDGEFAAS_FUNCTIONS_DIR=/home/app/function \
    EDGEFAAS_PYTHON=python3 \
    EDGEFAAS_PORT=8080 \
    PYTHONDONTWRITEBYTECODE=1

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/app
VOLUME ["/home/app/function"]
EXPOSE 8080

# busybox wget is in the base image; no curl needed.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD ["sh", "-c", "wget -q -O /dev/null http://127.0.0.1:${EDGEFAAS_PORT}/_/health || exit 1"]

# edgefaas reaps and kills orphans itself (child subreaper), so it can run as PID 1.
ENTRYPOINT ["/usr/local/bin/edgefaas"]
