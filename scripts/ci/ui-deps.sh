#!/usr/bin/env bash
# What the web UI's browser test needs (scripts/ci/ui-test.sh): Debian's chromium, and
# playwright-core (npm, pinned; no browser download) under target/ui-node.
# Idempotent: installs only what is missing. scripts/test runs every scripts/ci/*-deps.sh.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PLAYWRIGHT_VERSION=1.65.1

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
    else
        echo "ui-deps: chromium is missing; install it: sudo apt-get install chromium" >&2
        exit 1
    fi
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
    else
        echo "ui-deps: node and npm are missing; install them: sudo apt-get install nodejs npm" >&2
        exit 1
    fi
fi

dest=${CARGO_TARGET_DIR:-$repo/target}/ui-node
have=$(node -p "try { require('$dest/node_modules/playwright-core/package.json').version } catch (e) { '' }" 2>/dev/null || true)
if [ "$have" != "$PLAYWRIGHT_VERSION" ]; then
    mkdir -p "$dest"
    # Only the driver library: browsers come from Debian, nothing else is downloaded.
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund \
        --prefix "$dest" "playwright-core@$PLAYWRIGHT_VERSION"
fi
