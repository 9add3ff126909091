#!/usr/bin/env bash
# Runs the tutorial (docs/src/tutorial.md): every ```sh block, in order, as one bash
# script with `set -euo pipefail`, from the repository's top directory, against a lab of
# its own (port, Redis prefix, vhost and lab dir of this test; debug binaries). Bounded
# by TUTORIAL_TIMEOUT seconds (default 600); the lab is torn down (and purged) whatever
# happens.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

export LAB_DIR=${TUTORIAL_LAB_DIR:-$repo/target/tutorial-lab}
export LAB_PORT=${TUTORIAL_LAB_PORT:-18768}
export LAB_PREFIX=tftut$$
export LAB_VHOST=tftut$$
export LAB_PROFILE=${LAB_PROFILE:-debug}
unset LAB_QUEUE TESTFLINGER_SERVER
export XDG_CONFIG_HOME=$LAB_DIR/cli-config
page=docs/src/tutorial.md
script=$(mktemp)

finish() {
    local rc=$?
    rm -f "$script"
    scripts/lab down --purge >/dev/null 2>&1 || true
    if [ "$rc" -ne 0 ]; then
        for f in "$LAB_DIR"/logs/*.log; do
            [ -e "$f" ] || continue
            echo "---- last lines of $f"
            tail -n 30 "$f" || true
        done
        echo "tutorial-test: FAILED (rc $rc): a command of $page failed (see above)"
    fi
    exit "$rc"
}
trap finish EXIT

rm -rf "$LAB_DIR"
mkdir -p "$LAB_DIR" "$XDG_CONFIG_HOME"

# The ```sh blocks, each echoed before it runs.
python3 - "$page" >"$script" <<'PY'
import re, shlex, sys
text = open(sys.argv[1], encoding="utf-8").read()
blocks = re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)
if len(blocks) < 5:
    sys.exit(f"only {len(blocks)} sh blocks in {sys.argv[1]}")
print("set -euo pipefail")
for i, b in enumerate(blocks, 1):
    print(f"echo {shlex.quote(f'==== tutorial block {i}/{len(blocks)}')}")
    print(f"printf '%s\\n' {shlex.quote(b.rstrip())} | sed 's/^/$ /'")
    print(b)
PY
n=$(grep -c '^echo .==== tutorial block' "$script")
echo "tutorial-test: running $n blocks of $page"
start=$(date +%s)
timeout --kill-after=10 "${TUTORIAL_TIMEOUT:-600}" bash "$script"
echo "tutorial-test: ok, $n blocks in $(($(date +%s) - start)) s"
