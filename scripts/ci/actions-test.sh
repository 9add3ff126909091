#!/usr/bin/env bash
# Runs the steps of the composite actions .github/actions/submit and poll-multi
# (scripts/ci/run-action.py: each step's run: script with its inputs as env, its if:,
# GITHUB_OUTPUT) against a live server and agents: a lab of this test's own (port,
# Redis prefix, vhost, lab dir), plus a `multi` agent for poll-multi. Bounded by
# ACTIONS_TIMEOUT seconds per action run (default 300); everything is stopped at the end.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

export LAB_DIR=${ACTIONS_LAB_DIR:-$repo/target/actions-lab}
export LAB_PORT=${ACTIONS_LAB_PORT:-18767}
# Fake devices: this test is about the server and the agent, not about VMs.
export LAB_DEVICE=fake
export LAB_PREFIX=tfact$$
export LAB_VHOST=tfact$$
export LAB_QUEUE=actions
export LAB_PROFILE=${LAB_PROFILE:-debug}
unset TESTFLINGER_SERVER
export XDG_CONFIG_HOME=$LAB_DIR/cli-config
URL=http://127.0.0.1:$LAB_PORT
MULTI_QUEUE=actions-multi
T=${ACTIONS_TIMEOUT:-300}

passed=0
failed=0
ok() { echo "ok - $*"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $*"; failed=$((failed + 1)); }
multi_pid=

finish() {
    local rc=$?
    if [ -n "$multi_pid" ]; then
        kill -TERM -- "-$multi_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$multi_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$multi_pid" 2>/dev/null || true
    fi
    scripts/lab down --purge >/dev/null 2>&1 || true
    if [ "$failed" -gt 0 ] || [ "$rc" -ne 0 ]; then
        for f in "$LAB_DIR"/logs/*.log "$LAB_DIR"/multi/*.log; do
            [ -e "$f" ] || continue
            echo "---- last lines of $f"
            tail -n 30 "$f" || true
        done
    fi
    echo "actions-test: $passed passed, $failed failed"
    [ "$failed" -eq 0 ] && [ "$rc" -eq 0 ] || exit 1
}
trap finish EXIT

rm -rf "$LAB_DIR"
mkdir -p "$LAB_DIR" "$XDG_CONFIG_HOME"
scripts/lab up >"$LAB_DIR/up.log" 2>&1 || { cat "$LAB_DIR/up.log"; exit 1; }
eval "$(scripts/lab env)"
# shellcheck disable=SC1091
. "$LAB_DIR/lab.env"

# A multi-device agent: its child jobs go to the lab's queue.
mkdir -p "$LAB_DIR/multi"
conn="$BIN/testflinger-device-connectors multi"
cat >"$LAB_DIR/multi/device.yaml" <<EOF
agent_name: actions-multi
testflinger_server: $URL
poll_interval: 1
EOF
cat >"$LAB_DIR/multi/agent.yaml" <<EOF
agent_id: actions-multi-$$
server_address: $URL
job_queues: [$MULTI_QUEUE]
polling_interval: 2
shutdown_grace: 5
execution_basedir: $LAB_DIR/multi/run
logging_basedir: $LAB_DIR/multi/logs
results_basedir: $LAB_DIR/multi/results
provision_type: multi
provision_command: $conn provision -c $LAB_DIR/multi/device.yaml testflinger.json
test_command: $conn runtest -c $LAB_DIR/multi/device.yaml testflinger.json
cleanup_command: $conn cleanup -c $LAB_DIR/multi/device.yaml testflinger.json
EOF
# With the lab's authentication on, the multi agent gets its own agent client and token
# file, as the lab's agents do (created by the lab's admin).
token_args=()
if [ -s "$LAB_DIR/auth.env" ]; then
    # shellcheck disable=SC1091
    . "$LAB_DIR/auth.env"
    field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
    admin_token=$(curl -fsS --max-time 10 -u "$LAB_ADMIN_ID:$LAB_ADMIN_SECRET" -X POST \
        "$URL/v1/oauth2/token" | field access_token)
    multi_id=actions-multi-$$
    multi_secret=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    curl -fsS --max-time 10 -X PUT -H "Authorization: Bearer $admin_token" \
        -H 'content-type: application/json' \
        -d "{\"client_secret\": \"$multi_secret\", \"role\": \"agent\"}" \
        "$URL/v1/client-permissions/$multi_id" >/dev/null
    (umask 077 && printf '{"refresh_token": "%s"}\n' "$(curl -fsS --max-time 10 \
        -u "$multi_id:$multi_secret" -X POST "$URL/v1/oauth2/token" | field refresh_token)" \
        >"$LAB_DIR/multi/token")
    token_args=(--token-file "$LAB_DIR/multi/token")
fi
vhost=$LAB_VHOST
[ "$vhost" = / ] && vhost=%2f
setsid env AMQP_URI="amqp://guest:guest@127.0.0.1:5672/$vhost" NO_COLOR=1 \
    "$BIN/testflinger-agent" -c "$LAB_DIR/multi/agent.yaml" "${token_args[@]}" \
    </dev/null >"$LAB_DIR/multi/agent.log" 2>&1 &
multi_pid=$!
for _ in $(seq 1 60); do
    curl -fsS "$URL/v1/queues/$MULTI_QUEUE/agents" 2>/dev/null | grep -q actions-multi && break
    sleep 0.5
done

# run_action NAME OUTFILE INPUT=VALUE...: runs the action, its outputs JSON into OUTFILE.
run_action() {
    local name=$1 out=$2
    shift 2
    timeout --kill-after=10 "$T" python3 scripts/ci/run-action.py ".github/actions/$name" \
        server="$URL" "$@" >"$out" 2>"$out.log"
}
output() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' "$1" "$2"; }
is_uuid() { [[ "$1" =~ ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$ ]]; }
state_of() { testflinger status "$1" 2>/dev/null | tail -n 1; }
O=$LAB_DIR/out
mkdir -p "$O"

# The lab's server serves the built documentation site (scripts/docs build, run before
# this test in CI) under /docs.
if [ -f docs/book/index.html ]; then
    if curl -fsSL --max-time 10 "$URL/docs" | grep -q "Testflinger in Rust"; then
        ok "the lab's server serves the documentation site under /docs"
    else
        not_ok "GET $URL/docs does not serve docs/book"
    fi
fi

# ---------------------------------------------------------------- submit: a passing job
marker="actions-marker-$$"
job="job_queue: $LAB_QUEUE
test_data:
  test_cmds: |
    echo $marker
    exit 0"
if run_action submit "$O/pass.json" job="$job" poll=true; then
    ok "submit with poll: a passing job makes the step succeed"
else
    not_ok "submit with poll failed (rc $?)"; tail -n 30 "$O/pass.json.log"
fi
id=$(output "$O/pass.json" id)
is_uuid "$id" && ok "submit output id is a job id ($id)" || not_ok "submit output id '$id'"
grep -q "$marker" "$O/pass.json.log" && ok "the job's output was followed" || not_ok "no job output in the step log"
[ "$(state_of "$id")" = complete ] && ok "the job is complete" || not_ok "job state '$(state_of "$id")'"

# ---------------------------------------------------------------- submit: a failing test
printf 'job_queue: %s\ntest_data:\n  test_cmds: |\n    echo failing on purpose\n    exit 3\n' \
    "$LAB_QUEUE" >"$O/fail.yaml"
set +e
run_action submit "$O/fail.json" job-path="$O/fail.yaml" poll=true
rc=$?
set -e
[ "$rc" = 3 ] && ok "a test failing with 3 fails the step with 3" || { not_ok "failing job: step rc $rc, expected 3"; tail -n 20 "$O/fail.json.log"; }
grep -q "::error::The test phase of job .* failed with status 3" "$O/fail.json.log" &&
    ok "the failure is annotated" || not_ok "no ::error:: annotation for the failed test phase"

# ---------------------------------------------------------------- submit: dry run, bad input
if run_action submit "$O/dry.json" job-path="$O/fail.yaml" dry-run=true && [ -z "$(output "$O/dry.json" id)" ]; then
    ok "dry-run submits nothing and outputs no id"
else
    not_ok "dry-run"; tail -n 20 "$O/dry.json.log"
fi
grep -q "exit 3" "$O/dry.json.log" && ok "dry-run displays the job" || not_ok "dry-run did not display the job"
set +e
run_action submit "$O/none.json"
rc=$?
set -e
if [ "$rc" != 0 ] && grep -q "Neither of the 'job' or 'job-path' inputs" "$O/none.json.log"; then
    ok "no job: the step fails saying so"
else
    not_ok "no job: rc $rc"; tail -n 10 "$O/none.json.log"
fi

# ---------------------------------------------------------------- submit: a reservation
ssh-keygen -q -t ed25519 -N '' -C actions -f "$O/key"
res_job="job_queue: $LAB_QUEUE
reserve_data:
  ssh_keys:
    - $(cat "$O/key.pub")
  timeout: 600"
if run_action submit "$O/res.json" job="$res_job" poll=true poll-interval=1; then
    ok "submit with poll follows a reservation until the device is reserved"
else
    not_ok "reservation step failed (rc $?)"; tail -n 30 "$O/res.json.log"
fi
res_id=$(output "$O/res.json" id)
ip=$(output "$O/res.json" device-ip)
[ "$ip" = 127.0.0.1 ] && ok "device-ip output is the reserved device's address" || not_ok "device-ip '$ip'"
[ "$(state_of "$res_id")" = reserve ] && ok "the reservation job is in the reserve phase" || not_ok "reservation state '$(state_of "$res_id")'"
testflinger cancel "$res_id" >/dev/null
for _ in $(seq 1 60); do
    case "$(state_of "$res_id")" in cancelled | complete) break ;; esac
    sleep 0.5
done

# ---------------------------------------------------------------- poll-multi
multi_job="job_queue: $MULTI_QUEUE
provision_data:
  jobs:
    - job_queue: $LAB_QUEUE
      provision_data: {distro: noble}
    - job_queue: $LAB_QUEUE
      provision_data: {distro: noble}
test_data:
  test_cmds: |
    echo \"devices \$DEVICE_IP_1 \$DEVICE_IP_2\"
    sleep 60"
if run_action submit "$O/multi.json" job="$multi_job"; then
    ok "submit without poll: the multi-device job is submitted"
else
    not_ok "submitting the multi-device job (rc $?)"; tail -n 20 "$O/multi.json.log"
fi
parent=$(output "$O/multi.json" id)
if run_action poll-multi "$O/pm.json" job-id="$parent" sentinel-phase=allocated poll-interval=1; then
    ok "poll-multi waits for the children and ends once they are allocated"
else
    not_ok "poll-multi failed (rc $?)"; tail -n 40 "$O/pm.json.log"
fi
if python3 - "$O/pm.json" <<'PY'
import json, re, sys
jobs = json.loads(json.load(open(sys.argv[1]))["jobs"])
assert len(jobs) == 2, jobs
for j in jobs:
    assert re.fullmatch(r"[0-9a-f-]{36}", j["id"]), j
    assert j["device-ip"] == "127.0.0.1", j
assert jobs[0]["id"] != jobs[1]["id"], jobs
PY
then
    ok "poll-multi outputs both children with their device-ip"
else
    not_ok "poll-multi jobs output: $(cat "$O/pm.json")"
fi
for child in $(python3 -c 'import json,sys; [print(j["id"]) for j in json.loads(json.load(open(sys.argv[1]))["jobs"])]' "$O/pm.json" 2>/dev/null); do
    [ "$(state_of "$child")" = allocated ] && ok "child $child is allocated" || not_ok "child $child is '$(state_of "$child")'"
done
testflinger cancel "$parent" >/dev/null || true
set +e
run_action poll-multi "$O/pm-bad.json" job-id="$parent" sentinel-phase=no-such-phase poll-interval=1
rc=$?
set -e
[ "$rc" != 0 ] && grep -q "without reaching no-such-phase" "$O/pm-bad.json.log" &&
    ok "poll-multi fails when a child ends before the sentinel phase" ||
    { not_ok "poll-multi with an unreachable sentinel: rc $rc"; tail -n 20 "$O/pm-bad.json.log"; }
