#!/usr/bin/env bash
# scripts/nats.sh: makes sure the NATS server binary is on this machine and prints its path,
# as the only line on stdout (everything else goes to stderr). The tests start their own
# nats-server processes from it, on ports of their own, so they can stop and restart them.
#
# In this order: PARLEY_NATS_SERVER (a path) when set; `nats-server` on PATH or in
# /usr/sbin, /usr/bin, /usr/local/bin; otherwise the Debian package `nats-server` is
# installed with apt-get (through `sudo -n` when not root).
#
# Exit codes: 0 a path was printed; 1 no binary could be found or installed (the reason is
# on stderr); 2 usage error.
set -euo pipefail
exec 3>&1 1>&2

PROG=nats.sh
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

case "${1:-}" in
  '') ;;
  -h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&3
    exit 0
    ;;
  *)
    log "usage: $0 (no arguments; see the header of this script)"
    exit 2
    ;;
esac

found() {
  printf '%s\n' "$1" >&3
  exit 0
}

if [[ -n "${PARLEY_NATS_SERVER:-}" ]]; then
  [[ -x "$PARLEY_NATS_SERVER" ]] || { log "error: PARLEY_NATS_SERVER=$PARLEY_NATS_SERVER is not executable"; exit 1; }
  found "$PARLEY_NATS_SERVER"
fi

find_binary() {
  local candidate
  if candidate="$(command -v nats-server 2>/dev/null)"; then
    printf '%s\n' "$candidate"
    return 0
  fi
  for candidate in /usr/sbin/nats-server /usr/bin/nats-server /usr/local/bin/nats-server; do
    if [[ -x "$candidate" ]]; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  return 1
}

if binary="$(find_binary)"; then
  found "$binary"
fi

log "nats-server not found: installing the Debian package nats-server"
if [[ "$(id -u)" -eq 0 ]]; then
  apt=(apt-get)
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  apt=(sudo -n apt-get)
else
  log "error: nats-server is missing and apt-get needs root (install the package nats-server, or set PARLEY_NATS_SERVER)"
  exit 1
fi
# A lock, so concurrent test processes install once.
exec 9>"${TMPDIR:-/tmp}/parley-nats-install.lock"
flock 9
if binary="$(find_binary)"; then
  found "$binary"
fi
DEBIAN_FRONTEND=noninteractive "${apt[@]}" -y -q update </dev/null >&2 || true
DEBIAN_FRONTEND=noninteractive "${apt[@]}" -y -q install --no-install-recommends nats-server </dev/null >&2 ||
  { log "error: apt-get install nats-server failed"; exit 1; }
# The package enables and starts a system service; the tests do not use it.
if binary="$(find_binary)"; then
  found "$binary"
fi
log "error: nats-server is still missing after the install"
exit 1
