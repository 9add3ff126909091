#!/bin/sh
# System packages of the documentation checks: jq (the GitHub Actions' steps),
# python3-venv (mdBook is installed with pip into target/docs-venv), systemd-analyze
# (unit checks), debootstrap (the fresh-machine test), ssh-keygen (tutorial, actions),
# PyYAML (the actions' step runner). Idempotent; CI runs it as root, non-interactively.
set -eu
need=""
command -v jq >/dev/null 2>&1 || need="$need jq"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need="$need python3-venv"
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
command -v debootstrap >/dev/null 2>&1 || need="$need debootstrap"
command -v ssh-keygen >/dev/null 2>&1 || need="$need openssh-client"
if [ -n "$need" ]; then
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $need || { apt-get update && apt-get install -y --no-install-recommends $need; }
fi
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    python3 -m pip install --quiet pyyaml 2>/dev/null ||
        { export DEBIAN_FRONTEND=noninteractive; apt-get install -y --no-install-recommends python3-yaml; }
fi
echo "docs-deps: ok"
