# syntax=docker/dockerfile:1
# cloudhub: the cloud side of KubeEdge, on Twisted.
#
#   docker build -t cloudhub:0.1.0 .
#   docker run -d --name cloudhub -p 10000:10000 -p 10002:10002 \
#       -v cloudhub-data:/var/lib/cloudhub cloudhub:0.1.0
#   docker exec cloudhub cloudhub token --config /etc/cloudhub/cloudhub.yaml
#
# The hub runs as `twistd -n cloudhub --config /etc/cloudhub/cloudhub.yaml` (uid 10001), logs
# JSON lines to stdout and keeps its CA, certificates and store in the volume /var/lib/cloudhub.
# Mount your own config over /etc/cloudhub/cloudhub.yaml (deploy/cloudhub.container.yaml is the
# default one) and, to use an existing CA, the PEM files under /etc/kubeedge (see that file).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: the wheel, from the build context (.dockerignore keeps local clutter out) ---------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . .
RUN python -m pip wheel --no-deps -w /dist .

# --- the image: the wheel installed by packaging/install.sh, as `make package-check` tests it --
FROM ${PYTHON_IMAGE}
ARG CLOUDHUB_UID=10001
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN groupadd --gid "${CLOUDHUB_UID}" cloudhub \
    && useradd --uid "${CLOUDHUB_UID}" --gid cloudhub --no-create-home --no-log-init \
        --home-dir /var/lib/cloudhub --shell /usr/sbin/nologin cloudhub \
    && mkdir -p /var/lib/cloudhub /etc/cloudhub \
    && chown cloudhub:cloudhub /var/lib/cloudhub && chmod 0750 /var/lib/cloudhub
COPY packaging/install.sh /usr/local/lib/cloudhub/install.sh
COPY --from=builder /dist/ /tmp/dist/
RUN bash /usr/local/lib/cloudhub/install.sh /opt/cloudhub /tmp/dist/cloudhub-*.whl \
    && rm -rf /tmp/dist
COPY deploy/cloudhub.container.yaml /etc/cloudhub/cloudhub.yaml

ENV PATH=/opt/cloudhub/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLOUDHUB_LOG_FORMAT=json

# Generated CA and certificates, and the SQLite store (hub.dataDir).
VOLUME /var/lib/cloudhub
# 10000 WebSocket (edgecore), 10002 certificate server. 10350 is the HTTP API, which the default
# config keeps on loopback: publish it only after setting hub.api.address and hub.api.token.
EXPOSE 10000 10002 10350
# QUIC is optional (cloudHub.quic.enable): EXPOSE 10001/udp
USER ${CLOUDHUB_UID}:${CLOUDHUB_UID}
WORKDIR /var/lib/cloudhub

# Ready when /readyz on the certificate server answers 200 ("ok" once every listener is up).
# (The API answers /readyz too, on 127.0.0.1:10350 in the default config.) The probe stays on
# the container's loopback and only reads a status code, so it does not verify the server
# certificate (which may come from your own CA).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import ssl, sys, urllib.request; c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; sys.exit(urllib.request.urlopen('https://127.0.0.1:10002/readyz', context=c, timeout=4).status != 200)"]

# SIGTERM (docker stop) stops the hub cleanly, exit status 0. No pid file: a stale one in a
# restarted container would name a live PID (1) and stop twistd from starting.
STOPSIGNAL SIGTERM
CMD ["twistd", "-n", "--pidfile=", "--logger", "cloudhub.logs.observer", "cloudhub", "--config", "/etc/cloudhub/cloudhub.yaml"]
