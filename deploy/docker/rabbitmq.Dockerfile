# RabbitMQ from Debian (rabbitmq-server 3.10) with the management and Prometheus plugins:
# the offline stand-in for the public rabbitmq:3-management image (docker-compose.yml).
#   docker build -f deploy/docker/rabbitmq.Dockerfile --build-arg BASE_IMAGE=pneumotriage-base:bookworm deploy/docker
# The first start creates RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS (required: no guest login
# from other hosts, no default password). AMQP 5672, management 15672, Prometheus 15692.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* \
 && echo '[rabbitmq_management,rabbitmq_prometheus].' > /etc/rabbitmq/enabled_plugins \
 && printf 'loopback_users.guest = true\nlisteners.tcp.default = 5672\nmanagement.tcp.port = 15672\nprometheus.tcp.port = 15692\n' \
      > /etc/rabbitmq/rabbitmq.conf \
 && mkdir -p /var/lib/rabbitmq /var/log/rabbitmq \
 && chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq /etc/rabbitmq
COPY rabbitmq-entrypoint.sh /usr/local/bin/pt-rabbitmq
# logs to stdout; the node name stays rabbit@<hostname> (compose pins hostname: rabbitmq)
ENV RABBITMQ_LOGS=- \
    HOME=/var/lib/rabbitmq
USER rabbitmq
VOLUME ["/var/lib/rabbitmq"]
EXPOSE 5672 15672 15692
HEALTHCHECK --interval=10s --timeout=10s --start-period=30s --retries=10 CMD ["rabbitmq-diagnostics", "-q", "ping"]
ENTRYPOINT ["/usr/local/bin/pt-rabbitmq"]
