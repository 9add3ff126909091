#!/usr/bin/env bash
# Fuzzes the server against its own OpenAPI document (api/openapi.json) with schemathesis
# (pinned in scripts/ci/schemathesis-deps.sh), every check (`--checks all`) and every
# phase (examples, coverage, fuzzing, stateful), against a live server: once with
# authentication off, once with it on and an administrator's bearer token.
#
# The server gets its own Redis key prefix and its own RabbitMQ vhost (schemathesis
# makes up queue and agent names, and the server declares a queue for each): both are
# removed at the end; the shared instances are otherwise untouched. Needs RabbitMQ on
# 127.0.0.1:5672 (guest/guest, `rabbitmqctl` for the vhost) and Redis on 127.0.0.1:6379.
#
# Bounded: SCHEMATHESIS_EXAMPLES (default 30) cases per operation and phase, each run cut
# at SCHEMATHESIS_MAX_TIME seconds (default 60) by schemathesis and at twice that by
# `timeout`. Reports (JUnit, NDJSON) go to target/schemathesis/.
#
# Every check runs on every operation. The documented decisions (answers that depend on
# server state or on rules OpenAPI 3.0 cannot state, accepted as valid-request answers),
# each with its reason, are in scripts/ci/schemathesis.toml. One difference is known and
# left to the artifact work of issue 13 (item 3): an artifact that is not gzip is stored
# and served with `Content-Encoding: gzip`, which schemathesis reports as a network error
# on GET /v1/result/{job_id}/artifact; the document already says such uploads get 400.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
target=${CARGO_TARGET_DIR:-$repo/target}
server=$target/debug/testflinger-server
st=$target/schemathesis-venv/bin/st
[ -x "$server" ] || { echo "schemathesis-test: $server missing: run cargo build -p testflinger-api --bins" >&2; exit 1; }
[ -x "$st" ] || bash scripts/ci/schemathesis-deps.sh

examples=${SCHEMATHESIS_EXAMPLES:-30}
max_time=${SCHEMATHESIS_MAX_TIME:-60}
id=tfst$(date +%s)$$
vhost=$id
out=$target/schemathesis
tmp=$(mktemp -d)
server_pid=
mkdir -p "$out"

cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || true
    # Server-side: schemathesis makes up key parts with newlines and quotes in them.
    redis-cli EVAL "local c = '0' repeat local r = redis.call('SCAN', c, 'MATCH', ARGV[1], 'COUNT', 1000) c = r[1] for _, k in ipairs(r[2]) do redis.call('DEL', k) end until c == '0' return 0" \
        0 "$id:*" >/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

rabbitmqctl -q add_vhost "$vhost" >/dev/null
rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null

# Starts the server on a free port with the given extra environment; sets $url.
start_server() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    url=http://127.0.0.1:$port
    env "$@" AMQP_URI="amqp://guest:guest@127.0.0.1:5672/$vhost" \
        TESTFLINGER_BIND=127.0.0.1:$port TESTFLINGER_REDIS_PREFIX=$id DATA_PATH=$tmp/data \
        TESTFLINGER_SUBMIT_QUEUE=testflinger.submit.$id RUST_LOG=warn \
        "$server" >>"$out/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 100); do curl -sf "$url/readyz" >/dev/null && return 0; sleep 0.1; done
    echo "schemathesis-test: the server did not become ready; its log:" >&2
    tail -n 40 "$out/server.log" >&2
    exit 1
}
stop_server() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}

# One schemathesis run against $url; extra arguments are passed on.
run() {
    local name=$1
    shift
    echo "schemathesis-test: $name"
    # From $out: schemathesis keeps its example database and replay data (`st replay ID`)
    # in .schemathesis/ of the working directory.
    cd "$out"
    timeout $((max_time * 2)) "$st" --config-file "$repo/scripts/ci/schemathesis.toml" run "$url/openapi.json" --url "$url" \
        --checks all --phases examples,coverage,fuzzing,stateful \
        --max-examples "$examples" --max-time "$max_time" --seed 1 \
        --workers 1 --request-timeout 10 --no-color \
        --report junit,ndjson --report-dir "$out/$name" \
        "$@"
}

rc=0
: >"$out/server.log"
start_server
run auth-off || rc=1
stop_server

# Authentication on: the bootstrap administrator's bearer token on every request.
admin_secret=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
start_server JWT_SIGNING_KEY="$(python3 -c 'import secrets; print(secrets.token_hex(32))')" \
    TESTFLINGER_ADMIN_ID=schemathesis-admin TESTFLINGER_ADMIN_SECRET="$admin_secret" \
    TESTFLINGER_ACCESS_TTL=3600
token=$(curl -sf -u "schemathesis-admin:$admin_secret" -X POST "$url/v1/oauth2/token" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])') || {
    echo "schemathesis-test: no access token from $url/v1/oauth2/token" >&2
    exit 1
}
run auth-on -H "Authorization: Bearer $token" || rc=1
stop_server

exit $rc
