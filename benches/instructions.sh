#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: exact where
# req/s on a shared machine moves by a tenth from turn to turn (and where a
# VM offers no hardware counters to `perf stat`). For plain `axum::serve`
# and axum-handover (the bench binary's two helpers: the same route, the
# same binary, glibc's malloc) and pid-server (its own binary, jemalloc),
# with keep-alive and with a connection per request: the user-space
# instructions of a run of N2 requests minus those of a run of N1, over
# N2 - N1, so that start-up and shutdown cancel out. `ab -c 32` sends them
# to 127.0.0.1 only. About a minute.
#
#   bash benches/instructions.sh          # needs valgrind, ab, curl
#
# Debian: apt-get install valgrind apache2-utils curl
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in valgrind callgrind_annotate ab curl; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "instructions: $tool not found (Debian: apt-get install valgrind apache2-utils curl)" >&2
        exit 69
    fi
done

N1=2000
N2=6000
PORT=18931
if curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then
    echo "instructions: 127.0.0.1:$PORT is taken by another server" >&2
    exit 69
fi

cargo build --release --locked --quiet
# The bench target's executable (the build also lists pid-server's).
bench=$(cargo bench --locked --bench restarts --no-run --message-format=json 2>/dev/null |
    grep '"kind":\["bench"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
if [ ! -x "$bench" ]; then
    echo "instructions: cannot find the bench binary" >&2
    exit 1
fi

work=$(mktemp -d)
server=
cleanup() {
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Sets `total` to the instructions of one server's life serving $1
# requests ($2: -k or nothing); the other arguments: environment
# assignments, then the command. Not run in a subshell, so that a failure
# exits the script and the trap stops the server.
count() {
    local n=$1 keep=$2
    shift 2
    local envs=()
    while [[ $1 == *=* ]]; do
        envs+=("$1")
        shift
    done
    rm -f "$work/cg.out"
    env "${envs[@]}" valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$@" \
        >"$work/server.log" 2>&1 &
    server=$!
    local up=
    for _ in $(seq 300); do
        if curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then
            up=1
            break
        fi
        sleep 0.1
    done
    if [ -z "$up" ]; then
        echo "instructions: $* did not answer on 127.0.0.1:$PORT within 30 s:" >&2
        tail -n 5 "$work/server.log" >&2
        exit 1
    fi
    # shellcheck disable=SC2086 # $keep is -k or nothing
    ab -q $keep -c 32 -n "$n" "http://127.0.0.1:$PORT/" >"$work/ab.out" 2>&1
    if ! grep -q '^Failed requests: *0$' "$work/ab.out"; then
        echo "instructions: ab saw failures against $*:" >&2
        grep -i -E 'failed|error' "$work/ab.out" >&2
        exit 1
    fi
    kill -TERM "$server"
    wait "$server" 2>/dev/null || true
    server=
    total=$(callgrind_annotate "$work/cg.out" 2>/dev/null |
        awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
    if [ -z "$total" ]; then
        echo "instructions: callgrind wrote no totals for $*" >&2
        exit 1
    fi
}

# Sets `per` to the instructions per request (arguments as for `count`).
per_request() {
    local keep=$1 a
    shift
    count "$N1" "$keep" "$@"
    a=$total
    count "$N2" "$keep" "$@"
    per=$(((total - a) / (N2 - N1)))
}

row() {
    local name=$1 keep_alive
    shift
    per_request -k "$@"
    keep_alive=$per
    per_request '' "$@"
    printf '| %s | %s | %s |\n' "$name" "$keep_alive" "$per"
}

printf '| server | keep-alive | one connection per request |\n|---|--:|--:|\n'
row 'axum::serve' RESTARTS_HELPER="plain-axum:$PORT" "$bench"
row 'axum-handover' RESTARTS_HELPER="handover:$PORT" "$bench"
row 'pid-server' target/release/pid-server --listen "127.0.0.1:$PORT"
