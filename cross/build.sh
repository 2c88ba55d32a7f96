#!/usr/bin/env bash
# Builds stripped release binaries of plantgate for ARM gateway boxes:
#   cross/build.sh aarch64|armv7|all        glibc builds with Debian's cross
#                                           compilers (need the build host's
#                                           glibc, 2.34 on Debian 12)
#   cross/build.sh aarch64-musl             fully static musl build through
#                                           cargo-zigbuild: runs on any
#                                           aarch64 Linux, whatever its libc
# Installs what it needs when missing (rustup targets; Debian's cross
# compilers and qemu-user, which needs root/apt; for musl the ziglang wheel
# from PyPI and cargo-zigbuild from crates.io). Prints the binary sizes and
# the oldest glibc each binary needs ("static" for musl).
set -euo pipefail
cd "$(dirname "$0")/.."

want=${1:-all}
case "$want" in
    aarch64) targets=(aarch64-unknown-linux-gnu) ;;
    armv7) targets=(armv7-unknown-linux-gnueabihf) ;;
    all) targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf) ;;
    aarch64-musl) targets=(aarch64-unknown-linux-musl) ;;
    *) echo "usage: $0 aarch64|armv7|all|aarch64-musl" >&2; exit 2 ;;
esac

need_apt=()
need_zig=0
for t in "${targets[@]}"; do
    case "$t" in
        *-musl) need_zig=1 ;;
        aarch64-*) command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
        armv7-*) command -v arm-linux-gnueabihf-gcc >/dev/null || need_apt+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
    esac
done
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
command -v readelf >/dev/null || need_apt+=(binutils)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
if [ "$need_zig" = 1 ]; then
    # zig is the C compiler and linker of the musl builds (bundled SQLite,
    # ring); cargo-zigbuild drives it.
    python3 -m ziglang version >/dev/null 2>&1 || python3 -m pip install --quiet ziglang
    command -v cargo-zigbuild >/dev/null || cargo install --locked cargo-zigbuild
fi
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

# Several glibc targets go through one cargo run: with fat LTO over one
# codegen unit each target ends in a long single-threaded step, which then
# overlaps the other target's compilation.
together=""
if [ "$want" = all ]; then
    echo "== building ${targets[*]}"
    start=$(date +%s)
    cargo build --release "${targets[@]/#/--target=}" --bin plantgate
    together=$(( $(date +%s) - start ))
fi
for t in "${targets[@]}"; do
    start=$(date +%s)
    if [ -z "$together" ]; then
        echo "== building $t"
        case "$t" in
            *-musl) cargo zigbuild --release --target "$t" --bin plantgate ;;
            *) cargo build --release --target "$t" --bin plantgate ;;
        esac
    fi
    bin="${CARGO_TARGET_DIR:-target}/$t/release/plantgate"
    secs=$(( $(date +%s) - start ))
    if [ -n "$together" ]; then took="${together} s (both targets together)"; else took="${secs} s"; fi
    size=$(stat -c %s "$bin")
    # The highest GLIBC_x.y symbol version the binary references is the
    # oldest glibc it runs on.
    # (readelf reads any architecture's ELF; the host's objdump may not.)
    glibc=$(readelf --dyn-syms -W "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -u -V | tail -n 1 || true)
    if [[ "$t" == *-musl ]]; then
        # Must not need any shared library (no NEEDED entries, no interpreter).
        dynamic=$(readelf -d "$bin"; readelf -l "$bin")
        if grep -Eq 'NEEDED|program interpreter' <<<"$dynamic"; then
            echo "$bin is not fully static" >&2
            exit 1
        fi
        glibc=static
    fi
    printf '%-32s %6.1f MiB (%s bytes)  needs %s  built in %s\n' "$t" \
        "$(awk "BEGIN{print $size / 1048576}")" "$size" "${glibc:-no glibc}" "$took"
done
