#!/usr/bin/env bash
# Fetches what the guest boot test (cmd/diskserve TestGuestBoot) needs from
# Debian's packages: the current cloud kernel, as vmlinuz, and the virtio
# modules that kernel builds as modules, into DIR (default:
# $DISKSERVE_GUEST_DIR or ~/.cache/diskserve/guest). Does nothing if DIR
# already has them. Needs apt-get and dpkg; installs nothing.
set -euo pipefail
dir=${1:-${DISKSERVE_GUEST_DIR:-$HOME/.cache/diskserve/guest}}
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)
[ -f "$dir/vmlinuz" ] && [ -f "$dir/modules/virtio_blk.ko" ] && exit 0

pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$pkg" ]; then
	apt-get update -q >/dev/null
	pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q "$pkg" >/dev/null) || {
	apt-get update -q >/dev/null
	(cd "$tmp" && apt-get download -q "$pkg" >/dev/null)
}
dpkg -x "$tmp"/*.deb "$tmp/root"
mkdir -p "$dir/modules"
cp "$tmp"/root/boot/vmlinuz-* "$dir/vmlinuz"
for m in "${modules[@]}"; do
	ko=$(find "$tmp/root/lib/modules" -name "$m.ko*" | head -1)
	case "$ko" in
	*.ko) cp "$ko" "$dir/modules/$m.ko" ;;
	*.ko.xz) xz -dc "$ko" > "$dir/modules/$m.ko" ;;
	*.ko.zst) zstd -qdc "$ko" > "$dir/modules/$m.ko" ;;
	*) echo "fetch-kernel: module $m not found in $pkg" >&2; exit 1 ;;
	esac
done
echo "$pkg" > "$dir/PACKAGE"
