#!/bin/sh
# Builds the Debian package (release build) and prints the .deb's path on the
# last line of stdout; cargo's and cargo-deb's progress goes to stderr.
#
#   packaging/build-deb.sh              version from Cargo.toml, revision 1 (0.1.0-1)
#   packaging/build-deb.sh 0.1.1-1      any Debian version, e.g. a "higher" one for an upgrade test
#
# Needs cargo-deb (cargo install cargo-deb --locked). Honours
# CARGO_TARGET_DIR; the .deb lands in $CARGO_TARGET_DIR/debian/ (target/debian/).
# PID_SERVER_DEB_NO_BUILD=1 packages the existing release binary without
# running cargo build.
set -eu

cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "build-deb.sh: cargo-deb not found (cargo install cargo-deb --locked)" >&2
    exit 1
fi

if [ -n "${1:-}" ]; then
    set -- --deb-version "$1"
else
    set --
fi
if [ "${PID_SERVER_DEB_NO_BUILD:-}" = 1 ]; then
    set -- "$@" --no-build
fi

# cargo-deb prints the path of the package it wrote as its last line.
out=$(cargo deb --locked "$@" | tail -n 1)
if [ ! -f "$out" ]; then
    echo "build-deb.sh: cargo deb did not report a package (got: $out)" >&2
    exit 1
fi
echo "$out"
