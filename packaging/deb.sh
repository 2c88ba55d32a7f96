#!/usr/bin/env bash
# Builds the Debian package of plantgate for one architecture from a built
# binary, with dpkg-deb (Debian's own tool; nothing to install):
#   packaging/deb.sh ARCH BINARY OUTDIR      ARCH: amd64, arm64 or armhf
# The man pages and completions come from `plantgate generate`, run with a
# binary of this machine (HOST_BINARY, default target/release/plantgate):
# they are the same for every architecture.
# Contents: /usr/bin/plantgate, the systemd unit, /etc/plantgate/plantgate.toml
# (a conffile: an upgrade never overwrites the operator's), man pages,
# bash/zsh/fish completions, copyright and changelog. The service is enabled
# on install but not started: it needs its configuration first. Remove keeps
# /var/lib/plantgate (the buffer: undelivered records); purge deletes it.
set -euo pipefail
cd "$(dirname "$0")/.."

arch=${1:?usage: $0 amd64|arm64|armhf BINARY OUTDIR}
bin=${2:?binary}
out=${3:?output directory}
host=${HOST_BINARY:-target/release/plantgate}
case "$arch" in amd64|arm64|armhf) ;; *) echo "unknown architecture $arch" >&2; exit 2 ;; esac

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
revision=1
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/plantgate_${version}-${revision}_$arch"
mkdir -p "$root/DEBIAN"

install -D -m 0755 "$bin" "$root/usr/bin/plantgate"
# The unit as the repository has it, pointing at the packaged binary.
install -d "$root/lib/systemd/system"
sed 's#/usr/local/bin/plantgate#/usr/bin/plantgate#g' systemd/plantgate.service \
    > "$root/lib/systemd/system/plantgate.service"
chmod 0644 "$root/lib/systemd/system/plantgate.service"
install -D -m 0644 systemd/plantgate.toml "$root/etc/plantgate/plantgate.toml"

"$host" generate man "$stage/man"
install -d "$root/usr/share/man/man1"
for page in "$stage"/man/*.1; do
    gzip -9n <"$page" >"$root/usr/share/man/man1/$(basename "$page").gz"
done
chmod 0644 "$root"/usr/share/man/man1/*
"$host" generate completions "$stage/completions"
install -D -m 0644 "$stage/completions/plantgate.bash" "$root/usr/share/bash-completion/completions/plantgate"
install -D -m 0644 "$stage/completions/_plantgate" "$root/usr/share/zsh/vendor-completions/_plantgate"
install -D -m 0644 "$stage/completions/plantgate.fish" "$root/usr/share/fish/vendor_completions.d/plantgate.fish"

doc="$root/usr/share/doc/plantgate"
install -d "$doc"
cat >"$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: plantgate
Source: https://example.invalid/plantgate

Files: *
Copyright: 2026 the plantgate authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
{
    echo "plantgate ($version-$revision) stable; urgency=medium"
    echo
    echo "  * Release $version (docs/ in the source tree lists what it does)."
    echo
    echo " -- plantgate maintainers <plantgate@example.invalid>  $(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n >"$doc/changelog.Debian.gz"
chmod 0644 "$doc"/*

# Not a Debian upload: there is no bug to close.
install -d "$root/usr/share/lintian/overrides"
echo "plantgate: initial-upload-closes-no-bugs" >"$root/usr/share/lintian/overrides/plantgate"
chmod 0644 "$root/usr/share/lintian/overrides/plantgate"

echo /etc/plantgate/plantgate.toml >"$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: plantgate
Version: $version-$revision
Architecture: $arch
Maintainer: plantgate maintainers <plantgate@example.invalid>
Installed-Size: $size
Depends: libc6 (>= 2.34)
Section: net
Priority: optional
Homepage: https://example.invalid/plantgate
Description: edge gateway: OPC UA (DeltaV, OptoMES) to TLS MQTT
 plantgate reads batch, recipe, OEE and tag data from plant OPC UA servers,
 keeps every record in a local SQLite buffer until the MQTT broker has
 acknowledged it, and publishes over TLS, with online/offline status for
 the gateway and each plant connection, a health endpoint and live reload.
 .
 Configure /etc/plantgate/plantgate.toml (plantgate browse finds the node
 ids, plantgate check --connect tests the setup), then start plantgate.
CONTROL
cat >"$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ] || [ "$1" = abort-upgrade ]; then
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
    fi
    # Enabled, not started: the service needs its configuration first.
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        deb-systemd-helper unmask plantgate.service >/dev/null || true
        deb-systemd-helper enable plantgate.service >/dev/null || true
    fi
    # An upgrade restarts a running service with the new binary.
    if [ -n "$2" ] && [ -d /run/systemd/system ]; then
        deb-systemd-invoke try-restart plantgate.service >/dev/null || true
    fi
fi
POSTINST
cat >"$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    deb-systemd-invoke stop plantgate.service >/dev/null || true
fi
PRERM
cat >"$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = remove ] && command -v deb-systemd-helper >/dev/null 2>&1; then
    deb-systemd-helper mask plantgate.service >/dev/null || true
fi
if [ "$1" = purge ]; then
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        deb-systemd-helper purge plantgate.service >/dev/null || true
        deb-systemd-helper unmask plantgate.service >/dev/null || true
    fi
    # The buffer and the OPC UA PKI (DynamicUser keeps them under
    # /var/lib/private, /var/lib/plantgate is its link): purge means gone.
    rm -rf /var/lib/plantgate /var/lib/private/plantgate
fi
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out/plantgate_${version}-${revision}_$arch.deb" >/dev/null
echo "$out/plantgate_${version}-${revision}_$arch.deb"
