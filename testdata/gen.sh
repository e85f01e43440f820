#!/usr/bin/env bash
# Regenerates the golden images in this directory with the real tools, and
# records the tools' versions in VERSIONS. Run from anywhere:
#   bash testdata/gen.sh
# Needs qemu-utils, android-sdk-libsparse-utils and zstd (Debian packages).
# Images stay small (a few MiB in all); tests build large images at run time.
set -euo pipefail
cd "$(dirname "$0")"

# raw/pattern.img: 1 MiB raw, written by qemu-io with a distinct byte
# pattern in a few unaligned places; its sha256 is the expected content.
mkdir -p raw
rm -f raw/pattern.img
qemu-img create -q -f raw raw/pattern.img 1M
qemu-io -f raw \
	-c 'write -P 0x11 0 4096' \
	-c 'write -P 0x22 5000 3000' \
	-c 'write -P 0x33 65536 65536' \
	-c 'write -P 0x44 1048064 512' \
	raw/pattern.img >/dev/null
sha256sum raw/pattern.img | cut -d' ' -f1 > raw/pattern.img.sha256

# Images of the formats the opener recognises, made from the same content.
mkdir -p qcow2 sparse zstd
rm -f qcow2/*.qcow2 qcow2/*.sha256 sparse/pattern.simg zstd/plain.zst
qemu-img convert -q -f raw -O qcow2 -o compat=1.1,cluster_size=65536 raw/pattern.img qcow2/pattern.qcow2

# Small qcow2 images, one per feature, for table tests and fuzz seeds.
# Each has a .sha256 of its content as `qemu-img convert -O raw` reads it.
writes=(-c 'write -P 0xa1 0 1536' -c 'write -P 0xb2 5000 700' -c 'write -P 0xc3 40960 8192' -c 'write -z 45056 4096' -c 'write -P 0xd4 65024 512')
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 qcow2/tiny-v2-c512.qcow2 64K
qemu-io -f qcow2 "${writes[@]}" qcow2/tiny-v2-c512.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=1 qcow2/tiny-c4k-rc1.qcow2 64K
qemu-io -f qcow2 "${writes[@]}" qcow2/tiny-c4k-rc1.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=16384,extended_l2=on qcow2/tiny-extl2.qcow2 64K
qemu-io -f qcow2 "${writes[@]}" qcow2/tiny-extl2.qcow2 >/dev/null
qemu-img convert -q -c -f qcow2 -O qcow2 -o cluster_size=4096 qcow2/tiny-c4k-rc1.qcow2 qcow2/tiny-zlib.qcow2
qemu-img convert -q -c -f qcow2 -O qcow2 -o cluster_size=4096,compression_type=zstd qcow2/tiny-c4k-rc1.qcow2 qcow2/tiny-zstd.qcow2
# Two internal snapshots, with writes before, between and after them.
qemu-img create -q -f qcow2 -o cluster_size=4096 qcow2/tiny-snap.qcow2 64K
qemu-io -f qcow2 "${writes[@]}" qcow2/tiny-snap.qcow2 >/dev/null
qemu-img snapshot -c first qcow2/tiny-snap.qcow2
qemu-io -f qcow2 -c 'write -P 0xe5 2048 8192' -c 'write -z 40960 4096' qcow2/tiny-snap.qcow2 >/dev/null
qemu-img snapshot -c second qcow2/tiny-snap.qcow2
qemu-io -f qcow2 -c 'write -P 0xf6 0 1024' qcow2/tiny-snap.qcow2 >/dev/null
# Persistent dirty bitmaps: one enabled, dirtied by writes after it was
# added, and one disabled.
qemu-img create -q -f qcow2 -o cluster_size=4096 qcow2/tiny-bitmaps.qcow2 64K
qemu-io -f qcow2 "${writes[@]}" qcow2/tiny-bitmaps.qcow2 >/dev/null
qemu-img bitmap --add -g 4096 qcow2/tiny-bitmaps.qcow2 b0
qemu-img bitmap --add --disable qcow2/tiny-bitmaps.qcow2 b1
qemu-io -f qcow2 -c 'write -P 0xe7 8192 4096' -c 'write -z 45056 8192' qcow2/tiny-bitmaps.qcow2 >/dev/null
for img in qcow2/*.qcow2; do
	qemu-img convert -f qcow2 -O raw "$img" "$img.raw"
	sha256sum "$img.raw" | cut -d' ' -f1 > "$img.sha256"
	rm "$img.raw"
done
img2simg raw/pattern.img sparse/pattern.simg 4096

# The pattern in the formats of other hypervisors, one image per
# subformat, for golden reads and fuzz seeds. qemu-img rounds some sizes
# up (VHD to its CHS geometry): past 1 MiB they read as zeroes.
mkdir -p vdi
rm -f vdi/*.vdi
qemu-img convert -q -f raw -O vdi raw/pattern.img vdi/pattern.vdi
qemu-img convert -q -f raw -O vdi -o static=on raw/pattern.img vdi/pattern-static.vdi
mkdir -p vpc
rm -f vpc/*.vhd
qemu-img convert -q -f raw -O vpc raw/pattern.img vpc/pattern.vhd
qemu-img convert -q -f raw -O vpc -o subformat=fixed raw/pattern.img vpc/pattern-fixed.vhd
mkdir -p vmdk
rm -f vmdk/*.vmdk
qemu-img convert -q -f raw -O vmdk raw/pattern.img vmdk/pattern.vmdk
qemu-img convert -q -f raw -O vmdk -o subformat=streamOptimized raw/pattern.img vmdk/pattern-stream.vmdk
mkdir -p vhdx
rm -f vhdx/*.vhdx
qemu-img convert -q -f raw -O vhdx -o block_size=1M raw/pattern.img vhdx/pattern.vhdx
# A plain zstd stream without a seek table: recognised as zstd, and refused
# as a disk (it cannot be read at an offset).
zstd -q -19 raw/pattern.img -o zstd/plain.zst

{
	echo "# Tool versions that made the images in this directory (bash gen.sh)"
	qemu-img --version | head -1
	qemu-io --version | head -1
	echo "img2simg: $(dpkg-query -W -f='${Package} ${Version}' android-sdk-libsparse-utils)"
	zstd --version
} > VERSIONS
