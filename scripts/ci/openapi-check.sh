#!/bin/sh
# Validates api/openapi.json (served at GET /openapi.json) against the OpenAPI 3.0
# specification with the PyPI package openapi-spec-validator, installed into a private
# virtualenv (about 10 s the first time; reused after). `api/tests/api/openapi.rs` checks
# the document against the server's routes; this checks the document itself.
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=${OPENAPI_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/testflinger-ci/openapi-venv}

if [ ! -x "$venv/bin/openapi-spec-validator" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'openapi-spec-validator>=0.7,<1'
fi
"$venv/bin/openapi-spec-validator" --schema 3.0 "$repo/api/openapi.json"
