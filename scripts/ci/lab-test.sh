#!/usr/bin/env bash
# End-to-end test of the native lab: `scripts/lab up`, submit a job to the demo queue with
# our CLI, see it complete with its output, `scripts/lab down`, and check that nothing
# the lab started is still running.
#
# Uses its own port, Redis prefix, vhost and lab dir, so it never touches a developer's
# lab. Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and Redis on 127.0.0.1:6379, or
# both installed (the lab starts them). LAB_PROFILE defaults to debug here to share the
# build with `cargo test`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

export LAB_DIR=${LAB_TEST_DIR:-$repo/target/lab-test}
export LAB_PORT=${LAB_TEST_PORT:-18765}
export LAB_PREFIX=tflabtest$$
export LAB_VHOST=tflabtest$$
export LAB_QUEUE=labtest
export LAB_AGENTS=2
# qemu devices where qemu works (the lab's default), on addresses apart from a
# developer's lab.
export LAB_DEVICE_NET=${LAB_TEST_DEVICE_NET:-127.0.3}
export LAB_PROFILE=${LAB_PROFILE:-debug}
URL=http://127.0.0.1:$LAB_PORT

case "$LAB_PROFILE" in release) prof=release ;; *) prof=debug ;; esac
CLI=${CARGO_TARGET_DIR:-$repo/target}/$prof/testflinger

# The CLI keeps its config and job history under XDG_CONFIG_HOME: a throwaway one.
export XDG_CONFIG_HOME=$LAB_DIR/cli-config
unset TESTFLINGER_SERVER

passed=0
failed=0
ok() { echo "ok - $*"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $*"; failed=$((failed + 1)); }

finish() {
    local rc=$?
    if [ -d "$LAB_DIR/pids" ] && ls "$LAB_DIR/pids"/*.pid >/dev/null 2>&1; then
        echo "lab-test: cleaning up after a failure"
        scripts/lab down --purge || true
    fi
    if [ "$failed" -gt 0 ] || [ "$rc" -ne 0 ]; then
        for f in "$LAB_DIR"/logs/*.log; do
            [ -e "$f" ] || continue
            echo "---- last lines of $f"
            tail -n 40 "$f" || true
        done
    fi
    echo "lab-test: $passed passed, $failed failed"
    [ "$failed" -eq 0 ] && [ "$rc" -eq 0 ] || exit 1
}
trap finish EXIT

rm -rf "$LAB_DIR"
mkdir -p "$LAB_DIR" "$XDG_CONFIG_HOME"

# ------------------------------------------------------------------------------- up
scripts/lab up
ok "scripts/lab up"

if curl -fsS --max-time 5 "$URL/readyz" >/dev/null; then
    ok "API ready at $URL"
else
    not_ok "API not ready at $URL"
fi

# Remember every pid the lab started, to check after `down`.
mapfile -t started < <(for f in "$LAB_DIR"/pids/*.pid; do head -n 1 "$f"; done)
if [ "${#started[@]}" -ge 3 ]; then
    ok "lab started ${#started[@]} processes (${started[*]})"
else
    not_ok "lab started ${#started[@]} processes, expected at least 3"
fi

scripts/lab status | tee "$LAB_DIR/status.txt"
if [ "$(grep -c ' running ' "$LAB_DIR/status.txt")" -ge 3 ]; then
    ok "scripts/lab status shows the API and the agents running"
else
    not_ok "scripts/lab status does not show 3 running processes"
fi

# ------------------------------------------------------------------------------ a job
marker="lab-test-marker-$$-$RANDOM"
cat >"$LAB_DIR/job.yaml" <<EOF
job_queue: $LAB_QUEUE
provision_data:
  distro: noble
test_data:
  test_cmds: |
    echo "$marker from \$AGENT_NAME"
    echo "device kind: \$DEVICE_KIND"
    if [ "\$DEVICE_KIND" = qemu ]; then ssh \$DEVICE_IP uname -a; fi
EOF

job_id=$("$CLI" --server "$URL" submit -q "$LAB_DIR/job.yaml" | tail -n 1)
if [[ "$job_id" =~ ^[0-9a-fA-F-]{36}$ ]]; then
    ok "submitted job $job_id to queue $LAB_QUEUE"
else
    not_ok "submit printed '$job_id', not a job id"
fi

# Follow it: `poll` returns once the job has completed (bounded by timeout).
if timeout 400 "$CLI" --server "$URL" poll "$job_id" >"$LAB_DIR/poll.txt" 2>&1; then
    ok "poll followed the job to its end"
else
    not_ok "poll failed or timed out (rc $?)"
fi
if grep -qF "$marker" "$LAB_DIR/poll.txt"; then
    ok "the job's output came through poll"
else
    not_ok "the job's output is not in poll's output"
    cat "$LAB_DIR/poll.txt" || true
fi

lab_device=$(sed -n 's/^LAB_DEVICE=//p' "$LAB_DIR/lab.env")
if [ "$lab_device" = qemu ]; then
    release=$(cat "${CARGO_TARGET_DIR:-$repo/target}/test-image/kernel-release")
    if grep -q "^Linux lab-.* $release " "$LAB_DIR/poll.txt"; then
        ok "ssh \$DEVICE_IP reached the qemu device: its kernel $release answered"
    else
        not_ok "the job's ssh \$DEVICE_IP uname -a did not show the VM's kernel $release"
    fi
else
    echo "lab-test: the lab runs $lab_device devices (qemu unavailable here)"
fi

state=""
for _ in $(seq 1 60); do
    state=$("$CLI" --server "$URL" status "$job_id" 2>/dev/null | tail -n 1 || true)
    case "$state" in *complete* | *cancelled*) break ;; esac
    sleep 1
done
case "$state" in
    *complete*) ok "job state is '$state'" ;;
    *) not_ok "job state is '$state', expected complete" ;;
esac

"$CLI" --server "$URL" results "$job_id" >"$LAB_DIR/results.json" 2>&1 || true
if grep -qF "$marker" "$LAB_DIR/results.json"; then
    ok "testflinger results shows the test output"
else
    not_ok "testflinger results does not show the test output"
    head -c 2000 "$LAB_DIR/results.json" || true
fi
if python3 - "$LAB_DIR/results.json" <<'EOF'; then
import json, sys
r = json.load(open(sys.argv[1]))
status = r.get("test_status", r.get("status", {}).get("test") if isinstance(r.get("status"), dict) else None)
sys.exit(0 if status in (0, "0") else 1)
EOF
    ok "test phase exit status is 0"
else
    not_ok "test phase exit status is not 0"
fi

# ------------------------------------------------------------------------------ down
# Every agent consumes its queue from the start under its own broker user (a refused
# declaration would leave it retrying until the API happened to declare the queue).
if grep -l "cannot consume the job queues" "$LAB_DIR"/logs/agent-*.log >/dev/null 2>&1; then
    not_ok "an agent could not consume its job queue: $(grep -h -m1 "cannot consume the job queues" "$LAB_DIR"/logs/agent-*.log | head -n1)"
else
    ok "every agent consumed its job queue without a refusal"
fi

scripts/lab down --purge
ok "scripts/lab down"

sleep 0.5
left=()
for pid in "${started[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then left+=("$pid"); fi
done
if [ "${#left[@]}" -eq 0 ]; then
    ok "nothing the lab started is still running"
else
    not_ok "still running after down: ${left[*]}"
    ps -o pid,pgid,cmd -p "${left[*]// /,}" || true
    kill -KILL "${left[@]}" 2>/dev/null || true
fi
# Nor anything else from this lab (phases run by the agents, say).
if pgrep -f -- "$LAB_DIR/" >/dev/null; then
    not_ok "processes naming $LAB_DIR are still running: $(pgrep -f -- "$LAB_DIR/" | tr '\n' ' ')"
else
    ok "no process of this lab dir is left"
fi
if curl -fsS --max-time 2 "$URL/healthz" >/dev/null 2>&1; then
    not_ok "something still answers on $URL"
else
    ok "port $LAB_PORT is free again"
fi
# Nor the RabbitMQ users the lab made (when it could run rabbitmqctl).
if command -v rabbitmqctl >/dev/null 2>&1 && users=$(rabbitmqctl -q list_users </dev/null 2>/dev/null); then
    leftover=$(awk '{print $1}' <<<"$users" | grep "^$LAB_VHOST-" | tr '\n' ' ' || true)
    if [ -n "$leftover" ]; then
        not_ok "RabbitMQ users of the lab are left: $leftover"
    else
        ok "the lab's RabbitMQ users are gone"
    fi
fi
