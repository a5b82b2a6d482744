#!/bin/sh
# The user and password of the public image's contract (RABBITMQ_DEFAULT_USER / _PASS, required),
# written into the node's config: Debian's 3.10 reads default_user / default_pass from there on
# the first boot (an empty database), like the official image.
set -eu
: "${RABBITMQ_DEFAULT_USER:?set RABBITMQ_DEFAULT_USER}" "${RABBITMQ_DEFAULT_PASS:?set RABBITMQ_DEFAULT_PASS}"
conf=/var/lib/rabbitmq/pneumotriage.conf
umask 077
{ cat /etc/rabbitmq/rabbitmq.conf
  echo "default_user = $RABBITMQ_DEFAULT_USER"
  echo "default_pass = $RABBITMQ_DEFAULT_PASS"
} > "$conf"
unset RABBITMQ_DEFAULT_PASS
export RABBITMQ_CONFIG_FILE="$conf"
exec /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
