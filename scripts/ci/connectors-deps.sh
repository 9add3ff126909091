#!/bin/sh
# System packages the connectors' integration tests need: an OpenSSH server binary.
# The tests start their own sshd on a loopback port with a throwaway config; nothing is
# enabled or started here. Idempotent; CI runs it as root, non-interactively.
set -eu

# sshd started as root wants its (empty) privilege separation directory.
mkdir -p /run/sshd 2>/dev/null || true

if [ -x /usr/sbin/sshd ]; then
    echo "connectors-deps: /usr/sbin/sshd present, nothing to do"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends openssh-server openssh-client
mkdir -p /run/sshd
