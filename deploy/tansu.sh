#!/usr/bin/env bash
# Tansu (a Kafka-compatible broker written in Rust) for CI, tests and developers.
#
#   deploy/tansu.sh install                   install tansu 0.6.0 with cargo when missing
#   deploy/tansu.sh start STATE_DIR [memory|sqlite]
#                                             start a broker on a free 127.0.0.1 port; waits until it
#                                             answers Kafka metadata requests; prints its bootstrap
#                                             address; keeps pid, port, storage and log in STATE_DIR
#   deploy/tansu.sh stop STATE_DIR            stop the broker started in STATE_DIR (by its pid)
#   deploy/tansu.sh resume STATE_DIR          start a stopped broker again on the same port and storage
#   deploy/tansu.sh restart STATE_DIR         stop, then resume
#   deploy/tansu.sh bootstrap STATE_DIR       print its bootstrap address
#
# sqlite storage keeps data in STATE_DIR/tansu.db across restarts; memory storage does not.
set -euo pipefail

TANSU_VERSION=0.6.0
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "tansu.sh: $*" >&2; exit 1; }

# The tansu of the version this script is for: cargo's install first, then one on PATH.
tansu_bin() {
    local candidate
    for candidate in "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" "$(command -v tansu 2>/dev/null || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] \
            && "$candidate" --version 2>/dev/null | grep -qwF "$TANSU_VERSION"; then
            echo "$candidate"
            return
        fi
    done
    return 1
}

install() {
    if bin=$(tansu_bin); then
        echo "tansu $TANSU_VERSION is installed: $bin"
        return
    fi
    echo "installing tansu $TANSU_VERSION (about 10 minutes on 2 cores)" >&2
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql >&2
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
    local dir=${1:?usage: tansu.sh start STATE_DIR [memory|sqlite]} storage=${2:-memory} port=${3:-}
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local bin
    bin=$(tansu_bin) || die "tansu is not installed: run deploy/tansu.sh install"
    local engine
    case "$storage" in
        memory) engine="memory://tansu/" ;;
        # Tansu 0.6 reads the sqlite path relative to its working directory (a leading / is lost).
        sqlite) engine="sqlite://tansu.db" ;;
        *) die "storage is memory or sqlite, not $storage" ;;
    esac
    # A free port is found, then let go of, before Tansu binds it: another process may take it in
    # between. A broker that exits because its port is in use is started again on another port
    # (not a port given).
    local attempts=1 attempt
    [ -n "$port" ] || attempts=5
    for attempt in $(seq 1 "$attempts"); do
        [ "$attempts" -eq 1 ] || port=$(free_port)
        echo "--- tansu.sh: start (attempt $attempt) on 127.0.0.1:$port" >>"$dir/tansu.log"
        local logged
        logged=$(wc -l <"$dir/tansu.log")
        (cd "$dir" && exec nohup "$bin" broker \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$port" \
            --storage-engine "$engine" >>"$dir/tansu.log" 2>&1) &
        local pid=$!
        echo "$pid" >"$dir/pid"
        echo "$port" >"$dir/port"
        echo "$storage" >"$dir/storage"
        local deadline=$(( $(date +%s) + 60 ))
        # Answered by our broker, still running (not by another on a port taken meanwhile).
        until python3 "$here/kafka_ping.py" "127.0.0.1:$port" 1 && kill -0 "$pid" 2>/dev/null; do
            if ! kill -0 "$pid" 2>/dev/null && [ "$attempt" -lt "$attempts" ] \
                && tail -n "+$((logged + 1))" "$dir/tansu.log" | grep -qE "AddrInUse|Address already in use"; then
                echo "tansu.sh: 127.0.0.1:$port was taken meanwhile; trying another port" >&2
                continue 2
            fi
            if ! kill -0 "$pid" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
                tail -n 20 "$dir/tansu.log" >&2 || true
                stop "$dir"
                die "tansu did not answer metadata requests on 127.0.0.1:$port"
            fi
        done
        echo "127.0.0.1:$port"
        return 0
    done
}

stop() {
    local dir=${1:?usage: tansu.sh stop STATE_DIR}
    [ -f "$dir/pid" ] || return 0
    local pid
    pid=$(cat "$dir/pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/pid"
}

resume() {
    local dir=${1:?usage: tansu.sh resume STATE_DIR}
    start "$dir" "$(cat "$dir/storage")" "$(cat "$dir/port")"
}

restart() {
    stop "${1:?usage: tansu.sh restart STATE_DIR}"
    resume "$1"
}

case "${1:-}" in
    install) install ;;
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    restart) shift; restart "$@" ;;
    resume) shift; resume "$@" ;;
    bootstrap) echo "127.0.0.1:$(cat "${2:?usage: tansu.sh bootstrap STATE_DIR}/port")" ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
