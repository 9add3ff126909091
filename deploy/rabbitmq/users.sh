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
#                        agent-<AGENT_ID> with a password of its own, from the first of:
#     AGENT_PASSWORD_<ID>    the variable named after the id, upper-cased, anything but
#                            letters and digits as '_' (demo-1: AGENT_PASSWORD_DEMO_1);
#     $AGENT_SECRETS_DIR/<AGENT_ID>   the file written by an earlier run (or by you);
#     a new random password (32 hex digits), written to that file (mode 600).
#   AGENT_SECRETS_DIR    where agents' passwords are kept, one file per agent id, the
#                        password alone (created mode 700)  (/etc/testflinger/agent-broker-secrets)
#
# Give each agent host its own file (or variable) only: with it, a host can log in as no
# other agent. The shared AGENT_PASSWORD of earlier versions is refused (exit 2) when not
# empty. The script prints where each agent's password is, never the password.
#
# The regular expressions are those of broker/src/permissions.rs (the source of truth;
# `testflinger-server broker-permissions ROLE ...` prints them); broker/tests/
# permissions.rs runs this script and compares. See docs/src/how-to/auth.md.
set -euo pipefail

vhost=${RABBITMQ_VHOST:-testflinger}
node=${RABBITMQ_NODE-rabbit@rabbitmq}
secrets_dir=${AGENT_SECRETS_DIR:-/etc/testflinger/agent-broker-secrets}

if [ -n "${AGENT_PASSWORD:-}" ]; then
    cat >&2 <<'EOF'
users.sh: AGENT_PASSWORD is no longer supported: it gave every agent the same broker
password, so any agent host could log in as any other agent. Unset it; each agent
agent-<id> now gets its own password from AGENT_PASSWORD_<ID> (the id upper-cased,
anything but letters and digits as '_', e.g. AGENT_PASSWORD_DEMO_1), else from the file
$AGENT_SECRETS_DIR/<id>, else a new random one written to that file
(AGENT_SECRETS_DIR defaults to /etc/testflinger/agent-broker-secrets).
EOF
    exit 2
fi

: "${API_USER:?API_USER is required}" "${API_PASSWORD:?API_PASSWORD is required}"

ctl() {
    if [ -n "$node" ]; then
        rabbitmqctl -q -n "$node" "$@" </dev/null
    else
        rabbitmqctl -q "$@" </dev/null
    fi
}

# A name quoted for an Erlang regular expression.
esc() { printf '%s' "$1" | sed -e 's/[][\\^$.|?*+(){}]/\\&/g'; }

# The variable holding agent $1's password: AGENT_PASSWORD_ + the id upper-cased, with
# anything but letters and digits as '_'.
password_var() {
    printf 'AGENT_PASSWORD_%s' "$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]' | sed -e 's/[^A-Z0-9]/_/g')"
}

# 32 hex digits from the kernel's random source.
random_password() {
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n'
}

user() { # NAME PASSWORD CONFIGURE WRITE READ [WHERE-THE-PASSWORD-IS]
    if ctl list_users | awk '{print $1}' | grep -qxF -- "$1"; then
        ctl change_password "$1" "$2" >/dev/null
    else
        ctl add_user "$1" "$2" >/dev/null
    fi
    ctl set_permissions -p "$vhost" "$1" "$3" "$4" "$5" >/dev/null
    echo "users.sh: $1 ready in vhost $vhost${6:+; its password: $6}"
}

# Sets password and where for agent $1 (see the header); a new password is written to
# its file first, so a later failure loses nothing.
agent_password() {
    local id=$1 var file
    var=$(password_var "$id")
    file=$secrets_dir/$id
    if [ -n "${!var:-}" ]; then
        password=${!var}
        where="from $var"
    elif [ -f "$file" ]; then
        password=$(cat -- "$file")
        [ -n "$password" ] || {
            echo "users.sh: $file is empty: write agent $id's password there, or delete the file to have one generated" >&2
            exit 1
        }
        where="kept in $file"
    else
        if [ ! -d "$secrets_dir" ]; then
            # Only the last directory is private: its parents (/etc/testflinger) keep
            # the usual modes.
            { mkdir -p -- "$(dirname -- "$secrets_dir")" && mkdir -m 700 -- "$secrets_dir"; } || {
                echo "users.sh: cannot create AGENT_SECRETS_DIR $secrets_dir for the agents' passwords" >&2
                exit 1
            }
        fi
        password=$(random_password)
        [ "${#password}" -eq 32 ] || {
            echo "users.sh: could not read a random password from /dev/urandom" >&2
            exit 1
        }
        # Written whole or not at all: a new file, renamed into place.
        (umask 077 && printf '%s' "$password" >"$file.new.$$" && mv -f -- "$file.new.$$" "$file") || {
            rm -f -- "$file.new.$$"
            echo "users.sh: cannot write agent $id's password to $file" >&2
            exit 1
        }
        where="generated, in $file"
    fi
}

# Check every AGENTS entry and find its password before the broker is touched.
declare -A seen_var=()
agent_ids=()
agent_queues=()
agent_passwords=()
agent_wheres=()
for spec in ${AGENTS:-}; do
    id=${spec%%:*}
    queues=${spec#*:}
    [ -n "$id" ] && [ "$queues" != "$spec" ] || {
        echo "users.sh: AGENTS entry '$spec': expected AGENT_ID:QUEUE[,QUEUE...]" >&2
        exit 2
    }
    case $id in
    . | .. | */*)
        echo "users.sh: AGENTS entry '$spec': '$id' cannot name a password file" >&2
        exit 2
        ;;
    esac
    var=$(password_var "$id")
    if [ -n "${seen_var[$var]:-}" ]; then
        echo "users.sh: agents '${seen_var[$var]}' and '$id' would share the password variable $var (and may be the same agent): rename one" >&2
        exit 2
    fi
    seen_var[$var]=$id
done
# A misspelt variable would silently leave an agent with a generated password.
while IFS= read -r var; do
    if [ -z "${seen_var[$var]:-}" ]; then
        echo "users.sh: warning: $var is set but no AGENTS entry has that id; ignored" >&2
    fi
done < <(compgen -e | grep '^AGENT_PASSWORD_' || true)
for spec in ${AGENTS:-}; do
    id=${spec%%:*}
    agent_password "$id"
    agent_ids+=("$id")
    agent_queues+=("${spec#*:}")
    agent_passwords+=("$password")
    agent_wheres+=("$where")
done

ctl await_startup >/dev/null 2>&1 || true
if ! ctl list_vhosts | grep -qxF -- "$vhost"; then
    ctl add_vhost "$vhost" >/dev/null
fi

user "${API_USER:?API_USER is required}" "${API_PASSWORD:?API_PASSWORD is required}" '.*' '.*' '.*'

if [ -n "${SUBMIT_USER:-}" ]; then
    user "$SUBMIT_USER" "${SUBMIT_PASSWORD:?SUBMIT_PASSWORD is required with SUBMIT_USER}" \
        '^amq\.gen-.*$' '^testflinger\.submit$' '^amq\.gen-.*$'
fi

for i in "${!agent_ids[@]}"; do
    id=${agent_ids[$i]}
    queues=${agent_queues[$i]}
    password=${agent_passwords[$i]}
    where=${agent_wheres[$i]}
    alts=""
    IFS=, read -r -a qs <<<"$queues"
    for q in "${qs[@]}"; do
        alts="$alts$(esc "$q")|"
    done
    own="^(${alts}$(esc "testflinger.control.$id"))\$"
    # Declaring a job queue with its dead-letter exchange needs write on testflinger.dlx.
    user "agent-$id" "$password" "$own" "^($(esc testflinger.dlx))\$" "$own" "$where"
done
