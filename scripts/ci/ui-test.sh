#!/usr/bin/env bash
# The web UI in a real browser: starts a lab (API + one fake agent) on its own port,
# Redis prefix and vhost, runs scripts/ci/ui/browser-test.cjs (playwright-core + Debian's
# chromium, headless), and stops the lab. Screenshots go to target/ui-screenshots/.
# Every page visited must carry a Content-Security-Policy and cause no CSP violation in
# the browser; the /docs pages are checked too when docs/book is built (scripts/docs build).
# Bounded: the browser test is killed after 4 minutes.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
bash scripts/ci/ui-deps.sh

target=${CARGO_TARGET_DIR:-$repo/target}
export LAB_DIR=${UI_TEST_DIR:-$target/ui-test}
export LAB_PORT=${UI_TEST_PORT:-18767}
# Fake devices: this test is about the server and the agent, not about VMs.
export LAB_DEVICE=fake
export LAB_PREFIX=tfuitest$$
export LAB_VHOST=tfuitest$$
export LAB_QUEUE=uitest
export LAB_AGENTS=1
export LAB_PROFILE=${LAB_PROFILE:-debug}
out=$target/ui-screenshots

finish() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        for f in "$LAB_DIR"/logs/*.log; do
            [ -e "$f" ] || continue
            echo "---- last lines of $f"
            tail -n 30 "$f" || true
        done
    fi
    scripts/lab down --purge >/dev/null 2>&1 || true
    echo "ui-test: $([ "$rc" -eq 0 ] && echo passed || echo FAILED); screenshots in $out"
    exit "$rc"
}
trap finish EXIT

rm -rf "$LAB_DIR" "$out"
mkdir -p "$LAB_DIR" "$out"
scripts/lab up
PLAYWRIGHT_CORE=$target/ui-node/node_modules/playwright-core \
    timeout 240 node scripts/ci/ui/browser-test.cjs "http://127.0.0.1:$LAB_PORT" "$LAB_QUEUE" "$out"
