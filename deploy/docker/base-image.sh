#!/usr/bin/env bash
# A Debian bookworm base image built offline from the Debian mirror this machine already uses
# (no registry pull): debootstrap --variant=minbase, then `docker import`.
#   deploy/docker/base-image.sh [NAME]        default NAME: pneumotriage-base:bookworm
# The rootfs tarball is cached (PT_BASE_CACHE, default ~/.cache/pneumotriage) and re-used; an image
# that already exists is kept. The Dockerfiles take it as a build argument:
#   docker build --build-arg BASE_IMAGE=pneumotriage-base:bookworm ...   (compose: PT_BASE_IMAGE)
# Without it they build FROM the public python:3.11-slim-bookworm / debian:bookworm-slim.
# Needs root (debootstrap), debootstrap, and a Docker daemon (DOCKER_HOST is honoured).
set -euo pipefail
NAME=${1:-pneumotriage-base:bookworm}
SUITE=${PT_BASE_SUITE:-bookworm}
CACHE=${PT_BASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pneumotriage}
TARBALL=$CACHE/rootfs-$SUITE-minbase.tar
ROOT="" CTX=""
trap 'rm -rf ${ROOT:+"$ROOT"} ${CTX:+"$CTX"}' EXIT

mirror() {  # the first Debian (not -security) URI in the deb822 or one-line sources
  local uri
  uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
        | grep -v -- '-security' | head -1 || true)
  [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '{print $2}' | grep -i debian | grep -v -- '-security' | head -1 || true)
  echo "${PT_DEBIAN_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

if [ "${PT_BASE_REBUILD:-0}" != 1 ] && docker image inspect "$NAME" >/dev/null 2>&1; then
  echo "==> $NAME already exists (PT_BASE_REBUILD=1 to rebuild)"; exit 0
fi
if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || { echo "apt-get install -y debootstrap" >&2; exit 1; }
  MIRROR=$(mirror)
  ROOT=$(mktemp -d)
  echo "==> debootstrap --variant=minbase $SUITE from $MIRROR"
  debootstrap --variant=minbase "$SUITE" "$ROOT/rootfs" "$MIRROR" > "$ROOT/debootstrap.log" 2>&1 \
    || { tail -20 "$ROOT/debootstrap.log" >&2; exit 1; }
  # the same mirror inside containers (security updates too), no apt caches or docs kept
  SEC=${MIRROR%/debian}/debian-security
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
    "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SEC" "$SUITE" > "$ROOT/rootfs/etc/apt/sources.list"
  printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \
    > "$ROOT/rootfs/etc/dpkg/dpkg.cfg.d/01-nodoc"
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    > "$ROOT/rootfs/etc/apt/apt.conf.d/01-norecommends"
  rm -rf "$ROOT"/rootfs/var/cache/apt/archives/*.deb "$ROOT"/rootfs/var/lib/apt/lists/*
  mkdir -p "$CACHE"
  tar -C "$ROOT/rootfs" --numeric-owner -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
fi
# This host's own CA certificates (/usr/local/share/ca-certificates: e.g. a TLS-inspecting proxy in
# front of PyPI) go into the image too, as a bundle that pip and Python trust (PIP_CERT,
# SSL_CERT_FILE) and where update-ca-certificates keeps them when an image installs ca-certificates.
# PT_BASE_HOST_CA=0 leaves them out.
LOCAL_CA=$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
if [ "${PT_BASE_HOST_CA:-1}" = 1 ] && [ -n "$LOCAL_CA" ]; then
  CTX=$(mktemp -d)
  mkdir -p "$CTX/local"
  cp $LOCAL_CA "$CTX/local/"
  cp /etc/ssl/certs/ca-certificates.crt "$CTX/bundle.crt"
  echo "==> docker import $TARBALL, plus $(echo "$LOCAL_CA" | wc -l) local CA certificate(s), as $NAME"
  docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$TARBALL" "$NAME-rootfs" >/dev/null
  cat > "$CTX/Dockerfile" <<DOCKERFILE
FROM $NAME-rootfs
COPY local/ /usr/local/share/ca-certificates/
COPY bundle.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
DOCKERFILE
  docker build -q -t "$NAME" "$CTX"
else
  echo "==> docker import $TARBALL as $NAME"
  docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$TARBALL" "$NAME"
fi
