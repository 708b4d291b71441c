#!/usr/bin/env bash
# Installs everything vmferry needs on a fresh Debian 12 machine (run as root),
# then the npm dependencies, the compiled JavaScript (dist/), then the test guest. Safe to run again: each step
# checks first and stays quiet when there is nothing to do.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every system package the project uses, and why.
packages=(
  qemu-system-x86 qemu-utils       # the hypervisor, qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon
  linux-image-amd64 busybox-static # the test guest's kernel and userland
  gcc libc6-dev cpio kmod          # build the test guest (static workload binary, initramfs, module order)
  syslinux syslinux-common mtools dosfstools fdisk # the test guest's bootable disk image, built without mounting (build-test-disk.sh)
  make g++ python3                 # native npm modules (better-sqlite3) when no prebuilt binary matches
  iproute2                         # network namespaces and veth pairs for test hosts
  libnbd-bin nbdkit fio            # NBD peers: nbdinfo, nbdcopy, nbdkit, fio's nbd engine
  strace                           # durability tests: which writes were fsynced before a call returned (test/support/strace.ts)
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients # libvirt 9.0, the migration benchmark's peer (bench/lib/libvirt.ts)
  libvirt-daemon-system            # ...and the libvirt-qemu user its QEMU driver wants (no service is started here)
  openssl                          # the cluster PKI: vmferry pki init/issue (src/security/pki.ts)
  postgresql-15                    # the PostgreSQL store's tests: a throwaway cluster per test file (test/support/postgres.ts)
  ceph-mon ceph-osd ceph-common     # RBD shared volumes: the rbd and ceph tools, and a throwaway Ceph cluster for tests and the demo (src/demo/ceph.ts)
  ceph-mgr                         # Ceph 16's packaging expects it with the others; the test cluster does not start one
  libxxhash-dev                    # xxhash.h for the memory digest's native hasher (src/qemu/native/ram-hash.c)
  python3-rados python3-rbd        # the RBD switch-over fence's helper, connected before the pause (src/storage/rbd-fence-helper.py); ceph-common pulls them in too
  qemu-block-extra                 # QEMU's rbd block driver (librbd inside QEMU)
  chromium                         # the dashboard's test drives it headless through playwright-core (test/security/tls-cluster.test.ts)
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm ci wipes node_modules, so run it only when the lock file changed since the last run.
lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ ! -f node_modules/.vmferry-lock-hash || "$(cat node_modules/.vmferry-lock-hash)" != "$lock_hash" ]]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_hash" > node_modules/.vmferry-lock-hash
fi

# The compiled CLI and daemons (dist/); quiet when no source changed since the last build.
node scripts/build.js

scripts/build-test-guest.sh
scripts/build-test-disk.sh
