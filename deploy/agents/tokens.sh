#!/usr/bin/env bash
# Creates an `agent` client for each agent id in AGENT_IDS (as the bootstrap admin) and
# writes its upstream-style token file, TOKEN_DIR/<id>.token = {"refresh_token": ...}.
# Idempotent (an existing client gets the secret again). Uses the `testflinger` CLI of the
# image; docker-compose runs it once the API is healthy. See docs/src/how-to/auth.md.
#
#   SERVER (http://api:8000), ADMIN_ID, ADMIN_SECRET, AGENT_IDS, AGENT_CLIENT_SECRET
#   (at least 15 characters), TOKEN_DIR (/var/lib/testflinger/tokens)
set -euo pipefail

server=${SERVER:-http://api:8000}
dir=${TOKEN_DIR:-/var/lib/testflinger/tokens}
host=${server#*://}
host=${host%%/*}
host=${host//:/_}

for id in ${AGENT_IDS:?AGENT_IDS is required}; do
    tmp=$(mktemp -d)
    XDG_CONFIG_HOME=$tmp testflinger --server "$server" \
        --client-id "${ADMIN_ID:?}" --secret-key "${ADMIN_SECRET:?}" \
        admin set client-permissions "$id" --role agent \
        --client-secret "${AGENT_CLIENT_SECRET:?}" >/dev/null
    rm -rf "$tmp"
    tmp=$(mktemp -d)
    XDG_CONFIG_HOME=$tmp testflinger --server "$server" \
        --client-id "$id" --secret-key "$AGENT_CLIENT_SECRET" login >/dev/null
    refresh=$(sed -n 's/^refresh_token = //p' "$tmp/testflinger-cli/$host/auth.conf")
    rm -rf "$tmp"
    [ -n "$refresh" ] || { echo "tokens.sh: no refresh token for $id" >&2; exit 1; }
    (umask 077 && printf '{"refresh_token": "%s"}\n' "$refresh" >"$dir/$id.token")
    echo "tokens.sh: token file for agent $id written"
done
