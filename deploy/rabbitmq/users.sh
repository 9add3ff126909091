#!/usr/bin/env bash
# Creates (or updates) one least-privilege RabbitMQ user per Testflinger component in a
# vhost, with rabbitmqctl. Idempotent: run it at every deployment.
#
#   RABBITMQ_VHOST       the vhost (created if missing)                 (testflinger)
#   RABBITMQ_NODE        the node rabbitmqctl talks to; empty = its default (rabbit@rabbitmq)
#   API_USER, API_PASSWORD               the API's user: everything in the vhost
#   SUBMIT_USER, SUBMIT_PASSWORD         optional: a user for other systems that submit
#                                        jobs (publish to the testflinger.submit exchange)
#   AGENTS               space-separated AGENT_ID:QUEUE[,QUEUE...]; each gets the user
#                        agent-<AGENT_ID> with password AGENT_PASSWORD
#
# The regular expressions are those of broker/src/permissions.rs (the source of truth;
# `testflinger-server broker-permissions ROLE ...` prints them); broker/tests/
# permissions.rs runs this script and compares. See docs/src/how-to/auth.md.
set -euo pipefail

vhost=${RABBITMQ_VHOST:-testflinger}
node=${RABBITMQ_NODE-rabbit@rabbitmq}
ctl() {
    if [ -n "$node" ]; then
        rabbitmqctl -q -n "$node" "$@" </dev/null
    else
        rabbitmqctl -q "$@" </dev/null
    fi
}

# A name quoted for an Erlang regular expression.
esc() { printf '%s' "$1" | sed -e 's/[][\\^$.|?*+(){}]/\\&/g'; }

user() { # NAME PASSWORD CONFIGURE WRITE READ
    if ctl list_users | awk '{print $1}' | grep -qxF -- "$1"; then
        ctl change_password "$1" "$2" >/dev/null
    else
        ctl add_user "$1" "$2" >/dev/null
    fi
    ctl set_permissions -p "$vhost" "$1" "$3" "$4" "$5" >/dev/null
    echo "users.sh: $1 ready in vhost $vhost"
}

ctl await_startup >/dev/null 2>&1 || true
if ! ctl list_vhosts | grep -qxF -- "$vhost"; then
    ctl add_vhost "$vhost" >/dev/null
fi

user "${API_USER:?API_USER is required}" "${API_PASSWORD:?API_PASSWORD is required}" '.*' '.*' '.*'

if [ -n "${SUBMIT_USER:-}" ]; then
    user "$SUBMIT_USER" "${SUBMIT_PASSWORD:?SUBMIT_PASSWORD is required with SUBMIT_USER}" \
        '^amq\.gen-.*$' '^testflinger\.submit$' '^amq\.gen-.*$'
fi

for spec in ${AGENTS:-}; do
    id=${spec%%:*}
    queues=${spec#*:}
    [ -n "$id" ] && [ "$queues" != "$spec" ] || {
        echo "users.sh: AGENTS entry '$spec': expected AGENT_ID:QUEUE[,QUEUE...]" >&2
        exit 2
    }
    alts=""
    IFS=, read -r -a qs <<<"$queues"
    for q in "${qs[@]}"; do
        alts="$alts$(esc "$q")|"
    done
    own="^(${alts}$(esc "testflinger.control.$id"))\$"
    # Declaring a job queue with its dead-letter exchange needs write on testflinger.dlx.
    user "agent-$id" "${AGENT_PASSWORD:?AGENT_PASSWORD is required with AGENTS}" "$own" \
        "^($(esc testflinger.dlx))\$" "$own"
done
