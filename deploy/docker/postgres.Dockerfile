# PostgreSQL from Debian (15): the offline stand-in for the public postgres image.
#   docker build -f deploy/docker/postgres.Dockerfile --build-arg BASE_IMAGE=pneumotriage-base:bookworm deploy/docker
# The first start (empty PGDATA) runs initdb and creates POSTGRES_USER / POSTGRES_DB with
# POSTGRES_PASSWORD (all required: no default password); password (scram) logins from the network.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/pt-postgres
ENV PGDATA=/var/lib/postgresql/data \
    PATH=/usr/lib/postgresql/15/bin:$PATH
USER postgres
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
HEALTHCHECK --interval=5s --timeout=5s --retries=20 CMD ["pg_isready", "-h", "127.0.0.1"]
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/pt-postgres"]
