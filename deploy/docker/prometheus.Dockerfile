# Prometheus from Debian (2.42): the offline stand-in for the public prom/prometheus image.
#   docker build -f deploy/docker/prometheus.Dockerfile --build-arg BASE_IMAGE=pneumotriage-base:bookworm deploy/docker
# compose mounts deploy/prometheus/prometheus.yml and alerts.yml into /etc/prometheus.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
HEALTHCHECK --interval=15s --timeout=5s --retries=5 CMD ["wget", "-q", "-O-", "http://127.0.0.1:9090/-/ready"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
