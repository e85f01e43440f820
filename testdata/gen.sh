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
rm -f qcow2/pattern.qcow2 sparse/pattern.simg zstd/plain.zst
qemu-img convert -q -f raw -O qcow2 -o compat=1.1,cluster_size=65536 raw/pattern.img qcow2/pattern.qcow2
img2simg raw/pattern.img sparse/pattern.simg 4096
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
