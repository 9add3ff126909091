#!/usr/bin/env bash
# Checks the systemd units of deploy/systemd with systemd-analyze verify (syntax, known
# directives, executables present). The units name /usr/local/bin binaries, so the check
# verifies copies whose ExecStart points at this build's binaries instead.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${CARGO_TARGET_DIR:-$repo/target}/debug
command -v systemd-analyze >/dev/null || { echo "systemd-check: systemd-analyze missing (apt-get install systemd)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in "$repo"/deploy/systemd/*.service; do
    name=$(basename "$unit")
    sed "s|/usr/local/bin/|$bin/|g" "$unit" >"$tmp/$name"
done
# A template is verified through an instance.
cp "$tmp/testflinger-agent@.service" "$tmp/testflinger-agent@demo.service"
rm "$tmp/testflinger-agent@.service"
out=$(cd "$tmp" && SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no ./*.service 2>&1 || true)
# Units this machine lacks (rabbitmq-server.service in After=) are not errors.
bad=$(printf '%s\n' "$out" | grep -v -e '^$' -e 'rabbitmq-server.service' -e 'redis-server.service' -e 'testflinger-server.service' || true)
if [ -n "$bad" ]; then
    printf 'systemd-check: systemd-analyze verify found problems:\n%s\n' "$bad" >&2
    exit 1
fi
for u in "$repo"/deploy/systemd/*.service; do
    grep -q '^ExecStart=/usr/local/bin/testflinger-' "$u" || { echo "systemd-check: $u: unexpected ExecStart" >&2; exit 1; }
done
grep -q '^KillMode=mixed' "$repo/deploy/systemd/testflinger-agent@.service" ||
    { echo "systemd-check: the agent unit must use KillMode=mixed (graceful job hand-back)" >&2; exit 1; }
echo "systemd-check: $(ls "$repo"/deploy/systemd/*.service | wc -l) units verified"
