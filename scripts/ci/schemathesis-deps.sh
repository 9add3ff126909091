#!/usr/bin/env bash
# What scripts/ci/schemathesis-test.sh needs: schemathesis (PyPI, pinned) in a private
# virtualenv under target/schemathesis-venv. Idempotent: installs only when the pinned
# version is missing. scripts/test runs every scripts/ci/*-deps.sh.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SCHEMATHESIS_VERSION=4.32.5

venv=${CARGO_TARGET_DIR:-$repo/target}/schemathesis-venv
have=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null || true)
if [ "$have" != "$SCHEMATHESIS_VERSION" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
