#!/usr/bin/env bash
# Runs diskserve's whole test suite on a Debian machine: installs the tools
# the interop tests compare against when any is missing, checks that gofmt
# has nothing to change, then runs go vet and every test under the race
# detector. Interop tests fail, not skip, when a tool is missing
# (DISKSERVE_REQUIRE_INTEROP=1).
set -euo pipefail
cd "$(dirname "$0")"

# The tools the tests run, and the Debian package of each.
declare -A package=(
	[qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
	[nbdkit]=nbdkit [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin
	[fio]=fio [fusermount3]=fuse3 [img2simg]=android-sdk-libsparse-utils
	[zstd]=zstd [mkfs.ext4]=e2fsprogs [debugfs]=e2fsprogs [sgdisk]=gdisk [losetup]=mount
	[qemu-system-x86_64]=qemu-system-x86 [busybox]=busybox-static [cpio]=cpio [sfdisk]=fdisk
	[rsvg-convert]=librsvg2-bin [nginx]=nginx [vhdimount]=libvhdi-utils
)
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin:/usr/local/go/bin
missing=$(for tool in "${!package[@]}"; do
	command -v "$tool" >/dev/null || echo "${package[$tool]}"
done | sort -u)
# qemu's curl driver, which the remote-image tests read URLs with.
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ] || missing="$missing qemu-block-extra"
if [ -n "$missing" ]; then
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	echo "installing: $missing"
	$sudo apt-get update -q
	# The tests start nginx with their own configuration: keep the
	# package's post-install from starting a system service on port 80.
	policy=""
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		policy=/usr/sbin/policy-rc.d
		printf '#!/bin/sh\nexit 101\n' | $sudo tee $policy >/dev/null
		$sudo chmod +x $policy
	fi
	# shellcheck disable=SC2086 # one package per word
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $missing
	[ -z "$policy" ] || $sudo rm -f $policy
fi

# The kernel that TestGuestBoot boots, from Debian's cloud kernel package.
bash testdata/guest/fetch-kernel.sh

# The S3 server the remote-image tests start (versitygw), built from its
# own tool module so that its dependencies stay out of go.mod; the Go build
# cache makes later builds a link.
export DISKSERVE_VERSITYGW="${XDG_CACHE_HOME:-$HOME/.cache}/diskserve-test/versitygw"
mkdir -p "$(dirname "$DISKSERVE_VERSITYGW")"
go build -C internal/remotetest/tool -o "$DISKSERVE_VERSITYGW" github.com/versity/versitygw/cmd/versitygw

export DISKSERVE_REQUIRE_INTEROP=1
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then
	echo "gofmt would change: $unformatted" >&2
	exit 1
fi
go vet ./...
# staticcheck finds what vet does not (unused code, misused APIs).
go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...
# -count=1: never report a cached pass; -race: the contract is concurrent.
go test -race -count=1 -timeout 30m ./...
# The race detector allocates, so the tests that pin zero allocations per
# request skip under it; run them once more without it.
go test -count=1 -run 'Allocs' ./async ./export/nbd

# Every fuzz target, for a bounded time each (crashers land in the
# package's testdata/fuzz and are replayed by every later go test). Inputs
# are not minimized (-fuzzminimizetime 0): the fuzzer minimizes every new
# interesting input, and with images of tens of KiB that took nearly the
# whole budget: the image fuzzers ran a few hundred inputs each, against
# tens of thousands without. Go 1.26's fuzzing coordinator can fail a run
# that found nothing with "context deadline exceeded" as -fuzztime ends
# (go.dev/issue/75804, fixed in 1.27), so fuzzing alone runs on Go 1.27.3,
# which the go command fetches from the module proxy.
grep -l --include='*_test.go' -r '^func Fuzz' . | while read -r file; do
	for target in $(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' "$file"); do
		GOTOOLCHAIN=go1.27.3 go test -run '^$' -fuzz "^$target\$" -fuzztime "${DISKSERVE_FUZZTIME:-30s}" -fuzzminimizetime 0 "./$(dirname "$file")"
	done
done
