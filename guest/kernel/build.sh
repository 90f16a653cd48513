#!/usr/bin/env bash
# Builds the Matchlock guest kernel (an ELF vmlinux booted by QEMU microvm via PVH) from Debian's
# linux-source-6.1 with our patches (patches/*.patch, applied in name order), once per machine,
# cached by the hash of our config fragment and patches:
#   ${MATCHLOCK_CACHE_DIR:-~/.cache/matchlock}/kernel/<hash>/vmlinux
# Prints the path of the vmlinux on stdout; progress goes to stderr.
# MATCHLOCK_KERNEL=/path/to/vmlinux skips the build and is printed as is.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/config"
src_tar=/usr/src/linux-source-6.1.tar.xz
packages=(linux-source-6.1 flex bison bc libelf-dev libssl-dev make gcc xz-utils patch)

say() { printf 'matchlock kernel: %s\n' "$*" >&2; }
die() { printf 'matchlock kernel: error: %s\n' "$*" >&2; exit 1; }

if [[ -n "${MATCHLOCK_KERNEL:-}" ]]; then
    [[ -f "$MATCHLOCK_KERNEL" ]] || die "MATCHLOCK_KERNEL=$MATCHLOCK_KERNEL does not exist; unset it to build ours"
    printf '%s\n' "$MATCHLOCK_KERNEL"
    exit 0
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        say "installing build dependencies: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    else
        die "missing packages: ${missing[*]}; run: sudo apt-get install ${missing[*]}"
    fi
fi

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
# The matchlock binary computes the same hash from its embedded copies of the fragment and the
# patches (matchlock-vmm), so it knows where to find the kernel without running this script.
patches=("$here"/patches/*.patch)
[[ -e "${patches[0]}" ]] || patches=()
hash=$( { cat "$fragment"; echo "script=3"; for p in "${patches[@]}"; do cat "$p"; done; } | sha256sum | cut -c1-16)
cache=${MATCHLOCK_CACHE_DIR:-$HOME/.cache/matchlock}/kernel/$hash
if [[ -f "$cache/vmlinux" ]]; then
    printf '%s\n' "$cache/vmlinux"
    exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

say "unpacking linux-source $src_version (once per machine; cached in $cache)"
tar -xJf "$src_tar" -C "$work"
ksrc=$(echo "$work"/linux-source-*)
cd "$ksrc"
for p in "${patches[@]}"; do
    say "applying $(basename "$p")"
    patch -p1 --forward --quiet <"$p" >&2 || die "$(basename "$p") does not apply to linux-source $src_version"
done
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make -s olddefconfig >&2

# A typo or an unmet dependency makes kconfig drop an option silently: check each one landed.
while IFS= read -r line; do
    [[ "$line" =~ ^CONFIG_([A-Z0-9_]+)=(.*)$ ]] || continue
    opt=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
    if [[ "$want" == n ]]; then
        ! grep -q "^CONFIG_${opt}=y" .config || die "CONFIG_$opt is still enabled"
    else
        grep -qx "CONFIG_${opt}=${want}" .config || die "CONFIG_$opt=$want did not take (dependency missing?)"
    fi
done <"$fragment"

jobs=$(nproc)
say "compiling vmlinux with $jobs jobs (about 6 minutes on 2 cores)"
start=$SECONDS
make -j"$jobs" vmlinux 2>&1 | {
    n=0 last=0
    while IFS= read -r l; do
        [[ "$l" == *" CC "* ]] && n=$((n + 1))
        if ((SECONDS - last >= 10)); then
            last=$SECONDS
            say "  ${n} files compiled, $((SECONDS - start))s elapsed"
        fi
        [[ "$l" == *"error:"* || "$l" == *"Error "* ]] && printf '%s\n' "$l" >&2
    done
} || true
[[ -f vmlinux ]] || die "kernel build failed; see the errors above"
cp vmlinux "$cache/vmlinux.tmp"
cp .config "$cache/config"
mv "$cache/vmlinux.tmp" "$cache/vmlinux"
say "built $cache/vmlinux in $((SECONDS - start))s"
printf '%s\n' "$cache/vmlinux"
