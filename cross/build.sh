#!/usr/bin/env bash
# Builds stripped release binaries of plantgate for ARM gateway boxes:
#   cross/build.sh aarch64|armv7|all
# Installs what it needs when missing (rustup targets; Debian's cross
# compilers and qemu-user, which needs root/apt). Prints the binary sizes and
# the oldest glibc each binary needs.
set -euo pipefail
cd "$(dirname "$0")/.."

want=${1:-all}
case "$want" in
    aarch64) targets=(aarch64-unknown-linux-gnu) ;;
    armv7) targets=(armv7-unknown-linux-gnueabihf) ;;
    all) targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf) ;;
    *) echo "usage: $0 aarch64|armv7|all" >&2; exit 2 ;;
esac

need_apt=()
for t in "${targets[@]}"; do
    case "$t" in
        aarch64-*) command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
        armv7-*) command -v arm-linux-gnueabihf-gcc >/dev/null || need_apt+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
    esac
done
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
command -v aarch64-linux-gnu-objdump >/dev/null || command -v objdump >/dev/null || need_apt+=(binutils)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

for t in "${targets[@]}"; do
    echo "== building $t"
    start=$(date +%s)
    cargo build --release --target "$t" --bin plantgate
    bin="target/$t/release/plantgate"
    secs=$(( $(date +%s) - start ))
    size=$(stat -c %s "$bin")
    # The highest GLIBC_x.y symbol version the binary references is the
    # oldest glibc it runs on.
    glibc=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -t. -k1,1 -k2,2n -V | tail -n 1)
    printf '%-32s %6.1f MB  needs %s  built in %ss\n' "$t" "$(echo "$size / 1048576" | bc -l)" "$glibc" "$secs"
done
