#!/usr/bin/env bash
# Builds the test guest: Debian's kernel (also uncompressed, for a PVH boot) plus a busybox initramfs with the virtio
# modules and vmferry-guest (guest/vmferry-guest.c). Output in build/guest/.
# Quiet when the outputs are newer than every input.
set -euo pipefail
cd "$(dirname "$0")/.."

out=build/guest
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
[[ -n "$kernel" ]] || { echo "build-test-guest: no /boot/vmlinuz-* (install linux-image-amd64)" >&2; exit 1; }
kver=${kernel#/boot/vmlinuz-}
inputs=("$kernel" guest/init guest/vmferry-guest.c "$0")

up_to_date() {
  [[ -f $out/vmlinuz && -f $out/initramfs.cpio.gz ]] || return 1
  for input in "${inputs[@]}"; do
    [[ $input -nt $out/initramfs.cpio.gz ]] && return 1
  done
  return 0
}
# The kernel uncompressed: QEMU boots it through its PVH entry point, skipping the
# in-guest decompression of the xz bzImage, which under TCG takes most of a boot.
if [[ ! -f $out/vmlinux || $kernel -nt $out/vmlinux || $0 -nt $out/vmlinux ]]; then
  offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$kernel" | LC_ALL=C cut -d: -f1 | sed -n 1p)
  [[ -n "$offset" ]] || { echo "build-test-guest: $kernel is not xz-compressed; cannot extract its vmlinux" >&2; exit 1; }
  mkdir -p "$out"
  # The xz stream is followed by the bzImage's trailer: only the first stream is the kernel.
  xz -dc --single-stream < <(tail -c +$((offset + 1)) "$kernel") > "$out/vmlinux.tmp"
  mv "$out/vmlinux.tmp" "$out/vmlinux"
fi

up_to_date && exit 0

echo "build-test-guest: building $out from $kernel"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,etc,lib/modules}

cp /bin/busybox "$root/bin/busybox"
gcc -O2 -static -Wall -Wextra -Werror -pthread -o "$root/bin/vmferry-guest" guest/vmferry-guest.c
install -m 0755 guest/init "$root/init"

# The virtio modules (disks and NICs) and their dependencies, in load order (modprobe resolves it).
: > "$root/etc/modules-order"
for line in $(for m in virtio_pci virtio_blk virtio_net; do modprobe -S "$kver" --show-depends "$m"; done | awk '$1 == "insmod" { print $2 }'); do
  name=$(basename "$line")
  grep -qx "$name" "$root/etc/modules-order" && continue
  case "$line" in
    *.ko.xz) xz -dc "$line" > "$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$line" > "$root/lib/modules/${name%.zst}"; name=${name%.zst} ;;
    *) cp "$line" "$root/lib/modules/$name" ;;
  esac
  echo "$name" >> "$root/etc/modules-order"
done

mkdir -p "$out"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$work/initramfs.cpio.gz"
cp "$kernel" "$work/vmlinuz"
mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
