#!/usr/bin/env bash
# Checks the Debian packages packaging/deb.sh built in DIR (CI runs it):
# metadata and contents of each (dpkg-deb -I/-c), lintian without errors,
# then the one for this machine installed for real: the binary runs, the
# man page is found, the service is enabled and not started, remove keeps
# /var/lib/plantgate, purge deletes it and leaves nothing behind.
#   packaging/check.sh DIR
set -euo pipefail
dir=${1:?usage: $0 DIR}
host_arch=$(dpkg --print-architecture)
fail() { echo "packaging/check.sh: $*" >&2; exit 1; }

for deb in "$dir"/plantgate_*.deb; do
    arch=$(dpkg-deb -f "$deb" Architecture)
    echo "== $(basename "$deb")"
    dpkg-deb -I "$deb" | sed -n '/Package:/,$p'
    contents=$(dpkg-deb -c "$deb" | awk '{print $1, $6}')
    for want in "-rwxr-xr-x ./usr/bin/plantgate" \
        "-rw-r--r-- ./lib/systemd/system/plantgate.service" \
        "-rw-r--r-- ./etc/plantgate/plantgate.toml" \
        "-rw-r--r-- ./usr/share/man/man1/plantgate.1.gz" \
        "-rw-r--r-- ./usr/share/man/man1/plantgate-browse.1.gz" \
        "-rw-r--r-- ./usr/share/bash-completion/completions/plantgate" \
        "-rw-r--r-- ./usr/share/zsh/vendor-completions/_plantgate" \
        "-rw-r--r-- ./usr/share/fish/vendor_completions.d/plantgate.fish" \
        "-rw-r--r-- ./usr/share/doc/plantgate/copyright"; do
        grep -qxF -- "$want" <<<"$contents" || fail "$deb lacks $want"
    done
    dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/plantgate/plantgate.toml \
        || fail "$deb: plantgate.toml is not a conffile"
    # The binary is for the package's architecture.
    case "$arch" in
        amd64) machine="X86-64" ;; arm64) machine="AArch64" ;; armhf) machine="ARM" ;;
        *) fail "$deb: unexpected architecture $arch" ;;
    esac
    tmp=$(mktemp -d)
    dpkg-deb -x "$deb" "$tmp"
    readelf -h "$tmp/usr/bin/plantgate" | grep -q "Machine:.*$machine" || fail "$deb: not an $arch binary"
    grep -q '^ExecStart=/usr/bin/plantgate run' "$tmp/lib/systemd/system/plantgate.service" \
        || fail "$deb: the unit does not start /usr/bin/plantgate"
    grep -q '^ExecReload=/usr/bin/plantgate reload' "$tmp/lib/systemd/system/plantgate.service" \
        || fail "$deb: the unit has no ExecReload"
    rm -rf "$tmp"
    if command -v lintian >/dev/null; then
        lintian --fail-on error --tag-display-limit 0 "$deb" 2>&1 | grep -v '^running with root' || true
        lintian --fail-on error "$deb" >/dev/null 2>&1 || fail "lintian reports errors for $deb"
    fi
done

deb=$(ls "$dir"/plantgate_*_"$host_arch".deb)
echo "== installing $(basename "$deb")"
dpkg -i "$deb"
/usr/bin/plantgate --version
man -w plantgate
man -w plantgate-check
[ -L /etc/systemd/system/multi-user.target.wants/plantgate.service ] \
    || fail "the service is not enabled"
# A stand-in for the buffer the service would have written.
mkdir -p /var/lib/plantgate && touch /var/lib/plantgate/buffer.db
echo "== removing"
dpkg -r plantgate
[ ! -e /usr/bin/plantgate ] || fail "remove left /usr/bin/plantgate"
[ -e /var/lib/plantgate/buffer.db ] || fail "remove deleted the buffer"
[ -e /etc/plantgate/plantgate.toml ] || fail "remove deleted the conffile"
echo "== purging"
dpkg -P plantgate
[ ! -e /var/lib/plantgate ] || fail "purge left /var/lib/plantgate"
[ ! -e /etc/plantgate/plantgate.toml ] || fail "purge left the conffile"
[ ! -e /etc/systemd/system/multi-user.target.wants/plantgate.service ] || fail "purge left the service enabled"
dpkg -s plantgate >/dev/null 2>&1 && fail "still installed after purge"
echo "packages ok"
