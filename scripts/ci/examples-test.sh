#!/usr/bin/env bash
# Runs the direct-publishing examples (Python/pika and Rust/lapin) against a live server
# and agent: each job gets its id back and runs to completion. Uses its own Redis prefix,
# queue names and submit queue, and removes them. Prints "N passed, N failed".
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
bin=$repo/target/debug
for b in testflinger-server testflinger-agent testflinger-device-connectors; do
    [ -x "$bin/$b" ] || { echo "examples-test: $bin/$b missing: run cargo build --workspace --bins" >&2; exit 1; }
done
python3 -c "import pika" 2>/dev/null || python3 -m pip install -q pika >/dev/null || { echo "examples-test: cannot install pika" >&2; exit 1; }
cargo build -q -p testflinger-example-lapin || exit 1

id=ex$(date +%s)$RANDOM
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
queue=examples-$id
submitq=testflinger.submit.$id
url=http://127.0.0.1:$port
passed=0; failed=0
ok() { echo "ok: $*"; passed=$((passed+1)); }
bad() { echo "FAILED: $*"; failed=$((failed+1)); }

cleanup() {
    [ -n "${agent_pid:-}" ] && kill "$agent_pid" 2>/dev/null
    [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null
    wait 2>/dev/null
    for q in "$queue" "$submitq"; do rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1; done
    redis-cli --scan --pattern "$id:*" | xargs -r redis-cli del >/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

TESTFLINGER_BIND=127.0.0.1:$port TESTFLINGER_REDIS_PREFIX=$id DATA_PATH=$tmp/data \
    TESTFLINGER_SUBMIT_QUEUE=$submitq RUST_LOG=warn "$bin/testflinger-server" >"$tmp/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do curl -sf "$url/readyz" >/dev/null && break; sleep 0.1; done

cat >"$tmp/device.yaml" <<YAML
agent_name: ex-agent-$id
device_ip: 127.0.0.1
YAML
cat >"$tmp/agent.yaml" <<YAML
agent_id: ex-agent-$id
server_address: $url
job_queues: [$queue]
execution_basedir: $tmp/run
logging_basedir: $tmp/logs
results_basedir: $tmp/results
polling_interval: 1
test_command: $bin/testflinger-device-connectors fake runtest -c $tmp/device.yaml testflinger.json
YAML
"$bin/testflinger-agent" -c "$tmp/agent.yaml" >"$tmp/agent.log" 2>&1 &
agent_pid=$!

wait_complete() {
    local job=$1
    for _ in $(seq 1 300); do
        state=$(curl -s "$url/v1/result/$job" | python3 -c 'import sys,json; print(json.load(sys.stdin).get("job_state",""))' 2>/dev/null)
        [ "$state" = complete ] && return 0
        sleep 0.1
    done
    return 1
}

out=$(TESTFLINGER_SUBMIT_QUEUE=$submitq TESTFLINGER_EVENTS_WAIT=1 timeout 120 python3 examples/publish_pika.py "$queue" "echo hello-from-pika" 2>&1)
job=$(echo "$out" | sed -n 's/^job_id: //p')
if [ -n "$job" ] && echo "$out" | grep -q "event: complete"; then
    ok "pika: job $job answered and ran to completion (events seen)"
else
    bad "pika example: $out"
fi
if [ -n "$job" ] && curl -s "$url/v1/result/$job" | grep -q "hello-from-pika"; then
    ok "pika: the job's test output is in its results"
else
    bad "pika: output missing from results"
fi

out=$(TESTFLINGER_SUBMIT_QUEUE=$submitq timeout 60 "$repo/target/debug/testflinger-example-lapin" "$queue" "echo hello-from-lapin" 2>&1)
job=$(echo "$out" | sed -n 's/^job_id: //p')
if [ -n "$job" ] && wait_complete "$job" && curl -s "$url/v1/result/$job" | grep -q "hello-from-lapin"; then
    ok "lapin: job $job answered and ran to completion"
else
    bad "lapin example: $out"
fi

out=$(TESTFLINGER_SUBMIT_QUEUE=$submitq timeout 60 python3 - "$queue" <<'PY' 2>&1
import json, os, sys, uuid, pika
conn = pika.BlockingConnection(pika.URLParameters(os.environ.get("AMQP_URI", "amqp://guest:guest@127.0.0.1:5672/%2f")))
ch = conn.channel()
reply = ch.queue_declare(queue="", exclusive=True).method.queue
ch.basic_publish("", os.environ["TESTFLINGER_SUBMIT_QUEUE"], json.dumps({"job_queue": sys.argv[1], "test_data": {"test_cmd": "typo"}}),
                 pika.BasicProperties(content_type="application/json", reply_to=reply, correlation_id="c1"))
for m, p, body in ch.consume(reply, auto_ack=True, inactivity_timeout=30):
    print(body.decode()); break
PY
)
if echo "$out" | grep -q '"error"' && echo "$out" | grep -q "test_cmd"; then
    ok "pika: an invalid job is answered with an error naming the field"
else
    bad "invalid job reply: $out"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
