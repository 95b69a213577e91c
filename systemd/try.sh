#!/bin/bash
# Try pid-server under a real systemd, as root, in a throw-away container:
#
#   cargo build --release          (or cargo build)
#   sudo systemd/try.sh            socket on 127.0.0.1:8080
#   sudo systemd/try.sh 8081       another port
#
# Boots the host's own systemd as PID 1 in a systemd-nspawn container (the
# recipe of tests/support/src/nspawn/: a fresh tmpfs root, the host's /usr with
# a throw-away writable layer, the host's network), installs the freshly
# built binary and the repo's units, moves pid-server.socket to
# 127.0.0.1:PORT, starts it, and opens a shell inside. Type
#
#   systemctl reload pid-server
#
# there (and `curl 127.0.0.1:PORT/` here or there). Leaving the shell powers
# the container off and removes everything it made. With a non-terminal stdin
# the shell runs the commands it reads, e.g.
#
#   echo 'systemctl reload pid-server' | sudo systemd/try.sh
#
# Environment: PID_SERVER_BINARY (default target/release/pid-server, else
# target/debug/pid-server, under $CARGO_TARGET_DIR or target/).
# Needs: systemd-container (systemd-nspawn), util-linux (nsenter).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
port=${1:-${PORT:-8080}}

die() { echo "try.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it boots a container)"
command -v systemd-nspawn >/dev/null || die "no systemd-nspawn (apt-get install systemd-container)"
command -v nsenter >/dev/null || die "no nsenter (apt-get install util-linux)"
case $port in '' | *[!0-9]*) die "port must be a number: $port" ;; esac

target=${CARGO_TARGET_DIR:-$repo/target}
binary=${PID_SERVER_BINARY:-}
if [ -z "$binary" ]; then
    for b in "$target/release/pid-server" "$target/debug/pid-server"; do
        if [ -x "$b" ]; then binary=$b; break; fi
    done
fi
if [ -z "$binary" ] || [ ! -x "$binary" ]; then
    die "no pid-server binary: run 'cargo build --release' first (or set PID_SERVER_BINARY)"
fi
binary=$(readlink -f "$binary")
for unit in pid-server.service pid-server.socket; do
    [ -f "$here/$unit" ] || die "missing $here/$unit"
done
if command -v ss >/dev/null && ss -Hltn "sport = :$port" | grep -q .; then
    die "port $port is in use on this machine; pass another: systemd/try.sh 8081"
fi

name=pid-server-try-$$
state=$(mktemp -d /tmp/pid-server-try.XXXXXX)
nspawn_pid=
init=
cgroups=()

# shellcheck disable=SC2317  # called through trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        echo "try.sh: powering $name off" >&2
        # nspawn turns SIGTERM into a clean poweroff of the container.
        kill -TERM "$nspawn_pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$nspawn_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$nspawn_pid" 2>/dev/null; then
            echo "try.sh: still running after 10 s; killing it" >&2
            if [ -n "$init" ]; then kill -KILL "$init" 2>/dev/null || true; fi
            sleep 1
            kill -KILL "$nspawn_pid" 2>/dev/null || true
        fi
        wait "$nspawn_pid" 2>/dev/null || true
    fi
    for cg in "${cgroups[@]}"; do
        # nspawn's payload/ and supervisor/ below it, deepest first.
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
        rmdir "$(dirname "$cg")" 2>/dev/null || true
    done
    if [ -f "$state/temp-dir" ]; then
        t=$(cat "$state/temp-dir")
        case $t in /var/tmp/nspawn-temp-*) rm -rf "$t" ;; esac
    fi
    rm -rf "/run/systemd/nspawn/propagate/$name" "$state"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# A cgroup of its own in each systemd hierarchy: with --keep-unit
# --register=no nspawn makes its payload cgroup right below the one it runs
# in, and two containers sharing one would manage each other's units.
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    roots=(/sys/fs/cgroup)
else
    roots=()
    for h in systemd unified; do
        [ -f "/sys/fs/cgroup/$h/cgroup.procs" ] && roots+=("/sys/fs/cgroup/$h")
    done
fi
for r in "${roots[@]}"; do
    if mkdir -p "$r/pid-server-try/$name" 2>/dev/null; then
        cgroups+=("$r/pid-server-try/$name")
    fi
done

# Without it the empty /etc is a "first boot" and the host's services get
# enabled.
echo 'disable *' >"$state/00-try.preset"

echo "try.sh: booting $name (systemd $(systemctl --version | head -n1 | cut -d' ' -f2)) with $binary"
(
    for cg in "${cgroups[@]}"; do echo "$BASHPID" >"$cg/cgroup.procs"; done
    exec systemd-nspawn -D / --volatile=yes --overlay=/usr::/usr \
        --register=no --keep-unit -M "$name" \
        --bind-ro="$state/00-try.preset:/etc/systemd/system-preset/00-try.preset" \
        --bind-ro="$(dirname "$binary"):/run/pid-server-build" \
        -b systemd.firstboot=off systemd.log_color=0
) </dev/null >"$state/console.log" 2>&1 &
nspawn_pid=$!

# The container's PID 1: the child of nspawn whose NSpid ends in 1, once it
# has exec'd systemd.
for _ in $(seq 200); do
    for p in $(pgrep -P "$nspawn_pid" 2>/dev/null); do
        if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ] \
            && grep -Eq '^NSpid:.*[[:space:]]1$' "/proc/$p/status" 2>/dev/null; then
            init=$p
        fi
    done
    [ -n "$init" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 0.05
done
if [ -z "$init" ]; then
    tail -n 30 "$state/console.log" >&2
    die "the container did not start"
fi
grep -o 'upperdir=/var/tmp/nspawn-temp-[^/,]*' "/proc/$init/mountinfo" 2>/dev/null \
    | head -n1 | cut -d= -f2 >"$state/temp-dir" || true

inside() { nsenter -t "$init" -a env -u NOTIFY_SOCKET SYSTEMD_COLORS=0 "$@"; }

st=
for _ in $(seq 200); do
    st=$(inside systemctl is-system-running 2>/dev/null || true)
    case $st in running | degraded) break ;; esac
    sleep 0.1
done
case $st in running | degraded) ;; *)
    tail -n 30 "$state/console.log" >&2
    die "systemd in the container did not come up (is-system-running: $st)" ;;
esac

root=/proc/$init/root
mkdir -p "$root/etc/systemd/system/pid-server.socket.d"
install -m 0755 "$binary" "$root/usr/bin/pid-server"
install -m 0644 "$here/pid-server.service" "$here/pid-server.socket" "$root/etc/systemd/system/"
install -D -m 0644 "$here/../packaging/pid-server.toml" "$root/etc/pid-server/pid-server.toml"
printf '[Socket]\nListenStream=\nListenStream=127.0.0.1:%s\n' "$port" \
    >"$root/etc/systemd/system/pid-server.socket.d/try-port.conf"
inside systemctl daemon-reload
inside systemctl enable --quiet --now pid-server.socket
inside systemctl start pid-server.service

cat <<EOF

pid-server runs under systemd in container $name (PID 1 is host PID $init).
Its socket is 127.0.0.1:$port, shared with this machine. Try, in here:

  curl 127.0.0.1:$port/                 OK. Handled by PID: ...
  systemctl reload pid-server           a new process takes over, none fails
  curl 127.0.0.1:$port/                 another PID
  systemctl status pid-server
  journalctl -u pid-server              every generation, one identifier
  install /run/pid-server-build/pid-server /usr/bin/ && systemctl reload pid-server
                                        after a rebuild on the host: the new binary takes over

Leave the shell (exit or Ctrl-D) to power the container off.

EOF

shell_env=(env -i "TERM=${TERM:-xterm}" HOME=/root
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    "PS1=[pid-server-try \\W]# " SYSTEMD_COLORS=0 LANG=C.UTF-8)
set +e
if [ -t 0 ]; then
    nsenter -t "$init" -a "${shell_env[@]}" bash --norc -i
else
    nsenter -t "$init" -a "${shell_env[@]}" bash --norc -s
fi
status=$?
set -e
exit "$status"
