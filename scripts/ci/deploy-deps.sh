#!/bin/sh
# What the deployment checks need: docker-compose (Debian's package, only to validate
# docker-compose.yml with `docker-compose config -q`: no Docker engine is used), PyYAML
# for scripts/ci/check-chart.py, curl for scripts/lab. Idempotent; CI runs it as root,
# non-interactively.
#
# Rendering the chart with Helm is optional (scripts/ci/check-chart.py renders it when a
# `helm` binary or the helm_python module is there); DEPLOY_DEPS_HELM=1 installs the PyPI
# package helm-python-sdk (Helm's Go SDK in a wheel, about 75 MB) for that.
set -eu

need_apt=""
command -v docker-compose >/dev/null 2>&1 || need_apt="$need_apt docker-compose"
command -v curl >/dev/null 2>&1 || need_apt="$need_apt curl"

if [ -n "$need_apt" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $need_apt
else
    echo "deploy-deps: docker-compose and curl present"
fi

if python3 -c 'import yaml' 2>/dev/null; then
    echo "deploy-deps: PyYAML present"
else
    python3 -m pip install --quiet pyyaml
fi

if [ "${DEPLOY_DEPS_HELM:-0}" = 1 ] && ! python3 -c 'import helm_python' 2>/dev/null; then
    python3 -m pip install --quiet helm-python-sdk
fi
