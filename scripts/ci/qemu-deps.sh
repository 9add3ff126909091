#!/bin/sh
# System packages of the `qemu` device type and its test image (scripts/build-test-image):
#   qemu-system-x86, qemu-utils      the VM and qemu-img (overlays)
#   busybox-static, dropbear-bin     the test image's userland and SSH server
#   syslinux, syslinux-common,       the image's boot loader, written onto a FAT disk
#   mtools, dosfstools, cpio         image file without mounting anything (no root needed)
#   openssh-client                   the connector's ssh
# The Debian kernel of the image is not installed here (it would go to the host's /boot):
# the build script fetches the package with `apt-get download` and unpacks it under
# target/. Idempotent; CI runs it as root, non-interactively.
set -eu

need=""
for pkg in qemu-system-x86 qemu-utils busybox-static dropbear-bin syslinux syslinux-common \
    mtools dosfstools cpio openssh-client; do
    # qemu-utils may come from backports under the same name: any installed version does.
    if [ "$(dpkg-query -W -f '${db:Status-Status}' "$pkg" 2>/dev/null)" != installed ]; then
        need="$need $pkg"
    fi
done

if [ -z "$need" ]; then
    echo "qemu-deps: everything present, nothing to do"
    exit 0
fi
echo "qemu-deps: installing$need"
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $need || {
    apt-get update
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $need
}
# A qemu-utils of another origin (a newer build installed by hand) can be removed by
# apt to satisfy qemu-system-x86's dependencies instead of replaced: qemu-img must be
# there afterwards, so install the matching one when it went.
if ! command -v qemu-img >/dev/null 2>&1; then
    echo "qemu-deps: qemu-img went with the install above; installing the matching qemu-utils"
    apt-get install -y --no-install-recommends qemu-utils
fi
command -v qemu-img >/dev/null 2>&1 || { echo "qemu-deps: qemu-img is still missing" >&2; exit 1; }
