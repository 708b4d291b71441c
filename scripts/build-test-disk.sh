#!/usr/bin/env bash
# Builds build/guest/disk.qcow2: a bootable disk image of the test guest, as a
# user's VM has one. MBR (syslinux's mbr.bin) and an MBR partition table;
# partition 1, FAT16 and active, holds SYSLINUX, the kernel and the initramfs
# of build/guest (so build-test-guest.sh runs first); partition 2 is where the
# test guest writes its records (it never writes over a partitioned disk's
# boot partition). The boot loader starts the workload with the kernel command
# line the test guest gets when vmferry boots it directly.
# Made without mounting anything or a loop device (mtools and syslinux work on
# the image file). Quiet when the image is newer than every input.
set -euo pipefail
cd "$(dirname "$0")/.."

out=build/guest/disk.qcow2
inputs=(build/guest/vmlinuz build/guest/initramfs.cpio.gz src/guest/test-guest.ts /usr/lib/syslinux/mbr/mbr.bin "$0")

up_to_date() {
  [[ -f $out ]] || return 1
  for input in "${inputs[@]}"; do
    [[ $input -nt $out ]] && return 1
  done
  return 0
}
up_to_date && exit 0

echo "build-test-disk: building $out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
raw=$work/disk.raw
# Sizes in 512-byte sectors: a 32 MiB boot partition at 1 MiB, the records' partition after it, 128 MiB in all.
boot_start=2048
boot_sectors=65536
truncate -s 128M "$raw"
sfdisk --quiet "$raw" <<EOF
label: dos
start=$boot_start, size=$boot_sectors, type=6, bootable
start=$((boot_start + boot_sectors)), type=83
EOF
# mkfs.fat warns that the partition is smaller than the file, as intended: its output is shown only if it fails.
mkfs.fat -F 16 -n VMFBOOT --offset "$boot_start" "$raw" $((boot_sectors / 2)) >"$work/mkfs.log" 2>&1 || { cat "$work/mkfs.log" >&2; exit 1; }

append=$(node --import tsx -e "import('./src/guest/test-guest.ts').then((m) => console.log(m.guestKernelAppend({ mode: 'workload' })))")
cat > "$work/syslinux.cfg" <<EOF
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  KERNEL vmlinuz
  INITRD initramfs.cpio.gz
  APPEND $append
EOF
export MTOOLS_SKIP_CHECK=1
part="$raw@@$((boot_start * 512))"
mcopy -i "$part" build/guest/vmlinuz build/guest/initramfs.cpio.gz "$work/syslinux.cfg" ::
syslinux --install --offset $((boot_start * 512)) "$raw"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none

qemu-img convert -q -f raw -O qcow2 "$raw" "$work/disk.qcow2"
mv "$work/disk.qcow2" "$out"
