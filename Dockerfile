# pid-server under a real systemd in a container: pid-server.socket holds
# port 8080, and `systemctl reload pid-server` swaps the process with zero
# failed requests. See docs/src/operator/containers.md.
#
#   podman build -t pid-server .
#   podman run -d --name pid-server --systemd=always \
#       --cap-add SYS_ADMIN --cap-add SYS_PTRACE --cap-add NET_ADMIN \
#       -p 127.0.0.1:8080:8080 pid-server
#   podman exec pid-server systemctl reload pid-server
#
# Debian 13 (systemd 257) is the default base. Its systemd needs
# CAP_SYS_ADMIN and CAP_SYS_PTRACE in the container to set up the unit's
# sandbox (DynamicUser=, PrivateUsers=, ProtectProc=): with an engine's
# default capabilities pid-server.service fails with 226/NAMESPACE.
# CAP_NET_ADMIN lets it apply PrivateNetwork= too (without, it logs that it
# carries on without). A Debian 12 base (systemd 252) starts with the
# defaults (but without the private network namespace; see docs/src/operator/containers.md):
#   --build-arg RUST_IMAGE=rust:1-bookworm --build-arg BASE_IMAGE=debian:bookworm-slim
#
# Targets:
#   runtime (default)   builds the release binary in the build stage
#   runtime-prebuilt    copies an already built binary instead (CI):
#                       --target runtime-prebuilt
#                       [--build-arg PREBUILT_BINARY=target/release/pid-server]
# Base images are build arguments so that local images can stand in for them:
#   --build-arg RUST_IMAGE=...  --build-arg BASE_IMAGE=...
# Keep the two on the same Debian release: a binary built on trixie (glibc
# 2.41) does not start on bookworm (2.36).

ARG RUST_IMAGE=rust:1-trixie
ARG BASE_IMAGE=debian:trixie-slim

# --- runtime-base: systemd and the units, no binary yet -----------------------
FROM ${BASE_IMAGE} AS runtime-base
# systemd as PID 1. Skipped when the base image already has it (a local
# stand-in made from a debootstrap tree, or an offline CI build).
# hadolint ignore=DL3008
RUN if [ ! -x /lib/systemd/systemd ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends systemd systemd-sysv dbus \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY systemd/pid-server.service systemd/pid-server.socket /etc/systemd/system/
COPY packaging/pid-server.toml /etc/pid-server/pid-server.toml
# The very units the tests boot, unchanged, and the configuration file the
# service reads (as the package installs it). (Under an unprivileged engine the
# unit's PrivateNetwork= namespace may not be joinable by later Exec*=
# processes; the reload helper then reaches the server through the control
# socket in RuntimeDirectory=, which does not depend on it.)
# Enabling the service enables the socket too (Also=): both start at boot.
RUN systemctl enable pid-server.socket pid-server.service
# systemd shuts down cleanly on SIGRTMIN+3 (docker/podman stop).
STOPSIGNAL SIGRTMIN+3
EXPOSE 8080
CMD ["/lib/systemd/systemd"]

# --- runtime-prebuilt: a binary built outside (CI) ----------------------------
FROM runtime-base AS runtime-prebuilt
ARG PREBUILT_BINARY=target/release/pid-server
COPY ${PREBUILT_BINARY} /usr/bin/pid-server

# --- build: the release binary ------------------------------------------------
# After runtime-prebuilt, so that builders that build every stage up to the
# target (Docker's legacy builder) never need the Rust image for it.
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The crate as .dockerignore lets it through: the manifest, the lock file and
# every target folder it may declare (src/, benches/, tests/, examples/);
# cargo refuses a manifest whose declared targets are missing. A target/
# folder holds at most the prebuilt binary, which this stage does not use.
COPY . .
RUN CARGO_TARGET_DIR=/build cargo build --release --locked \
    && install -D -m 0755 /build/release/pid-server /out/pid-server

# --- runtime (default): the binary from the build stage -----------------------
FROM runtime-base AS runtime
COPY --from=build /out/pid-server /usr/bin/pid-server
