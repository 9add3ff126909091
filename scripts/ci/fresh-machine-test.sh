#!/usr/bin/env bash
# The README's set-up on a fresh Debian machine: a minimal Debian root made with
# debootstrap (from Debian's own mirror, cached under target/fresh-root), where
# `scripts/lab up` must install what is missing (RabbitMQ, Redis, curl, python3, OpenSSH,
# a C linker) with apt-get, start it all, and run the demo job; then `scripts/lab down`.
#
# Isolation: the run happens in new mount, network, PID, UTS and IPC namespaces. The
# network namespace has only its own loopback, so the RabbitMQ (5672) and Redis (6379)
# the lab installs and starts there never meet the host's; when the run ends the PID
# namespace ends and with it every process started inside. The cached root is the
# read-only lower layer of an overlay: every run starts from the same fresh root.
#
# Prerequisites taken from the host, as the README asks of a machine: a Rust toolchain
# (~/.cargo, ~/.rustup, bind-mounted) and this repository (bind-mounted at the same path,
# so the debug build in target/ is reused). Packages come from the distribution: the
# preparation (with network, once) downloads them into the root's apt cache, because
# the isolated run has no network; the install itself happens inside the run.
#
#   scripts/ci/fresh-machine-test.sh           prepare if needed, then run (bounded)
#   FRESH_TIMEOUT=900 (seconds for the run)    FRESH_SUITE=bookworm
# Needs root, debootstrap, unshare, overlayfs.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
SUITE=${FRESH_SUITE:-bookworm}
MIRROR=${FRESH_MIRROR:-http://deb.debian.org/debian}
CACHE=${CARGO_TARGET_DIR:-$repo/target}/fresh-root
ROOT=$CACHE/$SUITE
TIMEOUT=${FRESH_TIMEOUT:-900}
die() { printf 'fresh-machine-test: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'fresh-machine-test: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, namespaces, mounts)"
for c in unshare chroot mount ip; do command -v "$c" >/dev/null || die "$c is missing"; done
[ -x "$HOME/.cargo/bin/cargo" ] || die "no Rust toolchain in $HOME/.cargo (the README's prerequisite)"
PACKAGES=$(LAB_NO_BUILD=0 scripts/lab packages | tr '\n' ' ')
start=$(date +%s)

# ------------------------------------------------------------------------ preparation
prepare() {
    if [ ! -x "$ROOT/bin/bash" ]; then
        command -v debootstrap >/dev/null || {
            say "installing debootstrap"
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >/dev/null
        }
        say "debootstrap --variant=minbase $SUITE from $MIRROR into $ROOT"
        rm -rf "$ROOT.tmp"
        mkdir -p "$CACHE"
        timeout 900 debootstrap --variant=minbase "$SUITE" "$ROOT.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
            die "debootstrap failed; see $CACHE/debootstrap.log"
        mv "$ROOT.tmp" "$ROOT"
    fi
    local want
    want=$(printf '%s %s' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-16)
    if [ "$(cat "$ROOT/.fresh-downloaded" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    say "downloading (not installing) into the root's apt cache: $PACKAGES"
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    timeout 900 unshare --mount --fork bash -euc '
        root=$1; shift
        mount --make-rprivate /
        mount -t proc proc "$root/proc"
        mount --bind /dev "$root/dev"
        chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
            sh -c "apt-get update -q && apt-get install -q -y --download-only --no-install-recommends $*"
    ' prep "$ROOT" $PACKAGES >"$CACHE/download.log" 2>&1 || die "downloading the packages failed; see $CACHE/download.log"
    echo "$want" >"$ROOT/.fresh-downloaded"
}
prepare
prepared=$(date +%s)
say "root ready in $((prepared - start)) s"

# --------------------------------------------------------------------------- the run
# Same debug build as the lab test, so the build inside is a no-op check.
say "building the lab's binaries on the host (debug)"
cargo build -q --bins -p testflinger-api -p testflinger-agent -p testflinger-connectors -p testflinger-cli

RUN=$CACHE/run-$$
mkdir -p "$RUN/upper" "$RUN/work" "$RUN/merged"
cleanup() {
    rm -rf "$RUN" 2>/dev/null || { sleep 1; rm -rf "$RUN"; } || say "warning: could not remove $RUN"
    # Earlier runs' leftovers (a run killed before its trap), never a live one.
    local d
    for d in "$CACHE"/run-*; do
        [ -d "$d" ] && [ "$d" != "$RUN" ] && ! grep -qF "$d" /proc/mounts && ! kill -0 "${d##*-}" 2>/dev/null && rm -rf "$d"
    done
    return 0
}
trap cleanup EXIT

# What runs inside: the README's two set-up lines (lab up, then the printed first job),
# then checks, then lab down. LAB_PROFILE=debug reuses the host's build.
cat >"$RUN/inside.sh" <<EOS
set -euo pipefail
cd "$repo"
echo "== inside: \$(. /etc/os-release; echo \$PRETTY_NAME), hostname \$(hostname)"
for p in rabbitmq-server redis-server curl python3 sshd; do
    if command -v \$p >/dev/null 2>&1; then echo "before: \$p present"; else echo "before: \$p missing"; fi
done
# Not root: nothing is installed; the lab names the one command to run.
if setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/tmp LAB_DIR=/tmp/nobody-lab \
    bash scripts/lab up >/root/nobody.txt 2>&1; then
    echo "scripts/lab up as nobody succeeded on a machine without the packages"; cat /root/nobody.txt; exit 1
fi
cat /root/nobody.txt
grep -q "sudo apt-get install -y --no-install-recommends rabbitmq-server redis-server" /root/nobody.txt
echo "== not root: lab up printed the install command"
# Root: the README's quick start.
scripts/lab up
target/debug/testflinger --server http://127.0.0.1:8000 submit /root/lab/demo-job.yaml --poll | tee /root/poll.txt
grep -q "hello from" /root/poll.txt
job=\$(sed -n 's/^job_id: //p' /root/poll.txt | head -n 1)
state=\$(target/debug/testflinger --server http://127.0.0.1:8000 status "\$job")
echo "demo job \$job: \$state"
[ "\$state" = complete ]
scripts/lab down
echo "== inside: done"
EOS

say "run: unshare --mount --net --pid --uts --ipc (timeout ${TIMEOUT}s)"
set +e
timeout --kill-after=20 "$TIMEOUT" unshare --mount --net --pid --uts --ipc --fork --kill-child bash -euc '
    root=$1 run=$2 repo=$3
    mount --make-rprivate /
    hostname freshlab
    ip link set lo up
    m=$run/merged
    mount -t overlay overlay -o "lowerdir=$root,upperdir=$run/upper,workdir=$run/work" "$m"
    mount -t proc proc "$m/proc"
    mount --bind /dev "$m/dev"
    mount -t tmpfs tmpfs "$m/run"
    mount -t tmpfs tmpfs "$m/tmp"
    mkdir -p "$m$repo" "$m/root/.cargo" "$m/root/.rustup"
    mount --bind "$repo" "$m$repo"
    mount --bind "$HOME/.cargo" "$m/root/.cargo"
    mount --bind "$HOME/.rustup" "$m/root/.rustup"
    printf "127.0.0.1 localhost freshlab\n::1 localhost\n" >"$m/etc/hosts"
    echo freshlab >"$m/etc/hostname"
    cp "$run/inside.sh" "$m/root/inside.sh"
    chroot "$m" /usr/bin/env -i HOME=/root USER=root LANG=C.UTF-8 TERM=dumb \
        PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LAB_PROFILE=debug LAB_DIR=/root/lab XDG_CONFIG_HOME=/root/.config \
        bash /root/inside.sh
' fresh "$ROOT" "$RUN" "$repo" 2>&1 | tee "$CACHE/run.log"
rc=${PIPESTATUS[0]}
set -e
end=$(date +%s)

# Nothing of the run may be left: no process whose root is the run's tree.
left=$(for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    case "$r" in "$RUN"*) echo "${p#/proc/}" ;; esac
done)
[ -z "$left" ] || { say "processes left from the run: $left"; rc=1; }
if grep -q "$RUN" /proc/mounts; then say "mounts left from the run"; rc=1; fi

say "preparation $((prepared - start)) s, run $((end - prepared)) s, total $((end - start)) s"
if [ "$rc" -ne 0 ]; then
    say "FAILED (rc $rc); log: $CACHE/run.log"
    exit 1
fi
grep -q "installing missing packages" "$CACHE/run.log" || die "scripts/lab up did not install the missing packages"
grep -q "== inside: done" "$CACHE/run.log" || die "the run did not finish"
grep -q "== not root: lab up printed the install command" "$CACHE/run.log" ||
    die "scripts/lab up as a user did not print the install command"
say "ok: a fresh $SUITE root got its packages from scripts/lab up, ran the demo job, and left nothing running"
