#!/usr/bin/env bash
# scripts/postgres.sh: makes sure a PostgreSQL server is reachable for the test suite and
# prints, as the only line on stdout, a connection URL for a superuser that needs no
# password, e.g. postgres://postgres@127.0.0.1:5432/postgres. Everything else goes to stderr.
#
# In this order:
#   1. PARLEY_TEST_POSTGRES is set (non-empty): print it as is; the operator chose a server.
#   2. A server on 127.0.0.1:5432 lets role `postgres` in without a password and it is a
#      superuser (checked with psql; with only pg_isready, a server that answers is taken):
#      print postgres://postgres@127.0.0.1:5432/postgres.
#   3. Otherwise start (or reuse) a private cluster with trust auth, listening on 127.0.0.1
#      only, on port PARLEY_POSTGRES_PORT (default 55432; not 5432, which may belong to
#      someone else). The server binaries are `pg_config --bindir` or the newest
#      /usr/lib/postgresql/*/bin; if there are none, the Debian package `postgresql` is
#      installed with apt-get (through `sudo -n` when not root). The cluster lives in
#        ${XDG_CACHE_HOME:-$HOME/.cache}/parley-tools/postgres/<major>   (normal user)
#        /var/tmp/parley-tools/postgres/<major>                          (root)
#      As root the cluster is owned and run by an unprivileged user (initdb and postgres
#      refuse root): the owner of an existing cluster, else `postgres` (made by the Debian
#      package), else `parley-pg`, created with useradd. Settings: fsync on (the tests
#      check durability), max_connections=200; the server log is <cluster>/log. A cluster
#      that already runs is reused, also when it runs on another port than
#      PARLEY_POSTGRES_PORT asks (the URL then names the port it runs on; stop it to
#      change). Step 3 holds a flock on <cluster parent>/lock, so concurrent callers
#      start one server and print the same URL.
#
# The private server keeps running after the script exits. To stop it and start afresh:
#   normal user: /usr/lib/postgresql/<major>/bin/pg_ctl -D <cluster> stop; rm -rf <cluster>
#   root:        runuser -u <owner> -- /usr/lib/postgresql/<major>/bin/pg_ctl -D <cluster> stop
#                rm -rf <cluster>
#
# Environment:
#   PARLEY_TEST_POSTGRES         URL of a server to use as is; nothing is checked or started.
#   PARLEY_POSTGRES_PORT         port of the private cluster (default 55432).
#   PARLEY_POSTGRES_SKIP_SYSTEM  1: skip step 2 and always use the private cluster (tests
#                                of this script; a server on 5432 that must not be used).
#
# Exit codes: 0 a URL was printed; 1 no server could be found or started (the reason is on
# stderr); 2 usage error (an argument, or a PARLEY_POSTGRES_PORT that is not a port).
set -euo pipefail

# stdout is kept for the URL alone: fd 3 is the real stdout, fd 1 goes to stderr, so no
# tool's chatter can reach the caller's stdout. Commands that may leave a daemon behind
# (pg_ctl, apt-get) run through `detached`, which closes every descriptor above 2 (fd 3,
# the lock's fd 9, and whatever pipes the caller passed down): a server holding the
# caller's stdout pipe would make `$(scripts/postgres.sh)` wait forever, and one holding
# fd 9 would keep the lock taken for good. The server's own stdout/stderr go to its log.
exec 3>&1 1>&2

PROG=postgres.sh
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
detached() {
  (
    fds=(3 9)
    if [[ -d /proc/$BASHPID/fd ]]; then
      fds=()
      for f in /proc/"$BASHPID"/fd/*; do
        f="${f##*/}"
        if [[ "$f" =~ ^[0-9]+$ ]] && ((f > 2)); then fds+=("$f"); fi
      done
    fi
    for f in "${fds[@]}"; do eval "exec $f>&-" 2>/dev/null || true; done
    "$@"
  )
}
print_url() {
  printf '%s\n' "$1" >&3
  exit 0
}

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

# ---- 1. the operator's server -------------------------------------------------------------
if [[ -n "${PARLEY_TEST_POSTGRES:-}" ]]; then
  log "using PARLEY_TEST_POSTGRES"
  print_url "$PARLEY_TEST_POSTGRES"
fi

PORT="${PARLEY_POSTGRES_PORT:-55432}"
if ! [[ "$PORT" =~ ^[0-9]{1,5}$ ]] || ((10#$PORT < 1 || 10#$PORT > 65535)); then
  log "error: PARLEY_POSTGRES_PORT=$PORT is not a port number"
  exit 2
fi
PORT=$((10#$PORT))

url_for_port() { printf 'postgres://postgres@127.0.0.1:%s/postgres' "$1"; }

# Server binaries (initdb, pg_ctl, postgres) without installing anything; prints the bindir.
find_bindir() {
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]]; then
      printf '%s\n' "$d"
      return 0
    fi
  fi
  # Newest first (sort -V puts 9.6 before 10 before 15).
  for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV); do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]]; then
      printf '%s\n' "$d"
      return 0
    fi
  done
  return 1
}

# A client tool: on PATH, else next to the server binaries.
client_tool() {
  local name="$1" d
  if command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
    return 0
  fi
  if d="$(find_bindir)" && [[ -x "$d/$name" ]]; then
    printf '%s\n' "$d/$name"
    return 0
  fi
  return 1
}

# psql against exactly the URL that would be printed, never prompting and ignoring stored
# passwords (the tests connect without one). Succeeds if the role is a superuser.
probe_psql() {
  local psql="$1" url="$2" out errf
  errf="$(mktemp)"
  out="$(env -u PGPASSWORD -u PGSERVICE PGPASSFILE=/nonexistent/parley-pgpass PGCONNECT_TIMEOUT=5 \
    "$psql" "$url" -w -X -Atc "select current_setting('is_superuser')" </dev/null 2>"$errf")" || {
    PROBE_ERR="$(head -n 1 "$errf")"
    rm -f "$errf"
    return 1
  }
  rm -f "$errf"
  if [[ "$out" != on ]]; then
    PROBE_ERR="role postgres is not a superuser (is_superuser=$out)"
    return 1
  fi
}

# Step 2. Returns 0 usable, 1 not usable, 2 cannot tell (no psql/pg_isready anywhere).
check_system() {
  local url psql isready rc=0
  url="$(url_for_port 5432)"
  if psql="$(client_tool psql)"; then
    if probe_psql "$psql" "$url"; then
      log "PostgreSQL on 127.0.0.1:5432 accepts postgres without a password"
      return 0
    fi
    log "not using 127.0.0.1:5432: ${PROBE_ERR:-no answer}"
    return 1
  fi
  if isready="$(client_tool pg_isready)"; then
    "$isready" -q -h 127.0.0.1 -p 5432 -U postgres -d postgres -t 5 </dev/null || rc=$?
    if ((rc == 0)); then
      log "PostgreSQL answers on 127.0.0.1:5432 (no psql to check the password; taking it)"
      return 0
    fi
    log "not using 127.0.0.1:5432: pg_isready exit code $rc"
    return 1
  fi
  log "no psql or pg_isready: cannot check 127.0.0.1:5432 yet"
  return 2
}

# ---- 2. a trust server on 5432 --------------------------------------------------------------
SYSTEM_STATE=1
case "${PARLEY_POSTGRES_SKIP_SYSTEM:-}" in
  '' | 0 | false | no) ;;
  *) SYSTEM_STATE=skip ;;
esac
if [[ "$SYSTEM_STATE" == skip ]]; then
  log "PARLEY_POSTGRES_SKIP_SYSTEM is set: not looking at 127.0.0.1:5432"
else
  SYSTEM_STATE=0
  check_system || SYSTEM_STATE=$?
  if [[ "$SYSTEM_STATE" == 0 ]]; then
    print_url "$(url_for_port 5432)"
  fi
fi

# ---- 3. the private cluster -----------------------------------------------------------------
IS_ROOT=0
[[ "$(id -u)" == 0 ]] && IS_ROOT=1

if ((IS_ROOT)); then
  TOOLS=/var/tmp/parley-tools
else
  cache="${XDG_CACHE_HOME:-}"
  # The XDG spec says relative paths are to be ignored.
  [[ "$cache" == /* ]] || cache="${HOME:?HOME is not set}/.cache"
  TOOLS="$cache/parley-tools"
fi
PARENT="$TOOLS/postgres"
(umask 022 && mkdir -p "$PARENT") || die "cannot create $PARENT"
if ((IS_ROOT)); then
  # /var/tmp is world-writable: refuse directories someone else planted there.
  for d in "$TOOLS" "$PARENT"; do
    if [[ -L "$d" || ! -d "$d" || "$(stat -c %u "$d")" != 0 ]]; then
      die "$d must be a directory owned by root (not a symlink); remove it and run again"
    fi
  done
  chmod 0755 "$TOOLS" "$PARENT"
fi
cd /

exec 9>>"$PARENT/lock"
if ! flock -n 9; then
  log "waiting for another postgres.sh (lock $PARENT/lock)"
  flock -w 900 9 || die "gave up after 15 minutes waiting for $PARENT/lock"
fi

install_postgresql() {
  local -a sudo=()
  command -v apt-get >/dev/null 2>&1 ||
    die "no PostgreSQL server binaries and no apt-get to install them; install PostgreSQL or set PARLEY_TEST_POSTGRES"
  if ((!IS_ROOT)); then
    command -v sudo >/dev/null 2>&1 ||
      die "no PostgreSQL server binaries; installing the Debian package needs root or sudo: run 'apt-get install postgresql' as root, or set PARLEY_TEST_POSTGRES"
    sudo=(sudo -n)
  fi
  log "no PostgreSQL server binaries: installing the Debian package postgresql"
  detached "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q ||
    die "apt-get update failed${sudo:+ (sudo -n needs passwordless sudo)}; install postgresql yourself or set PARLEY_TEST_POSTGRES"
  detached "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends postgresql ||
    die "apt-get install postgresql failed; install it yourself or set PARLEY_TEST_POSTGRES"
}

BINDIR="$(find_bindir)" || {
  install_postgresql
  BINDIR="$(find_bindir)" || die "postgresql was installed but no initdb/pg_ctl/postgres were found"
}
VERSION="$("$BINDIR/postgres" -V | grep -oE '[0-9]+(\.[0-9]+)?' | head -n 1)" ||
  die "cannot read the version of $BINDIR/postgres"
MAJOR="${VERSION%%.*}"
((MAJOR >= 10)) || MAJOR="$VERSION" # 9.6 and older: the major version has two parts
log "PostgreSQL server binaries: $BINDIR (version $VERSION)"

# Step 2 could not run before the install (no client at all): try it now.
if [[ "$SYSTEM_STATE" == 2 ]]; then
  if check_system; then
    print_url "$(url_for_port 5432)"
  fi
fi

DIR="$PARENT/$MAJOR"
OWNER="$(id -un)"
if ((IS_ROOT)); then
  if [[ -f "$DIR/PG_VERSION" && "$(stat -c %u "$DIR")" != 0 ]]; then
    OWNER="$(stat -c %U "$DIR")"
  elif id -u postgres >/dev/null 2>&1; then
    OWNER=postgres
  else
    if ! id -u parley-pg >/dev/null 2>&1; then
      command -v useradd >/dev/null 2>&1 || die "running as root and no useradd to create the user parley-pg"
      log "creating the system user parley-pg to run the private cluster"
      useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin parley-pg || die "useradd parley-pg failed"
    fi
    OWNER=parley-pg
  fi
  [[ "$(id -u "$OWNER")" != 0 ]] || die "the cluster owner must not be root"
fi

# Runs a command as the cluster's owner (as root: the unprivileged user).
as_owner() {
  if ((!IS_ROOT)); then
    "$@"
  elif command -v runuser >/dev/null 2>&1; then
    runuser -u "$OWNER" -- "$@"
  else
    su -s /bin/bash "$OWNER" -c "$(printf '%q ' "$@")"
  fi
}

isready() { # exit code of pg_isready on the private port: 0 accepting, 1 starting, 2 no answer
  local rc=0
  "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -t 3 </dev/null || rc=$?
  return "$rc"
}

if [[ ! -f "$DIR/PG_VERSION" ]]; then
  if [[ -e "$DIR" ]]; then
    log "removing the unfinished cluster directory $DIR (no PG_VERSION)"
    rm -rf "$DIR"
  fi
  (umask 077 && mkdir "$DIR") || die "cannot create $DIR"
  if ((IS_ROOT)); then chown "$OWNER:" "$DIR"; fi
  log "initdb $DIR (superuser postgres, trust auth)"
  if ! as_owner "$BINDIR/initdb" -D "$DIR" -U postgres --auth=trust -E UTF8 --no-locale \
    </dev/null 9>&- 3>&-; then
    rm -rf "$DIR"
    die "initdb failed"
  fi
elif ((IS_ROOT)) && [[ "$(stat -c %U "$DIR")" != "$OWNER" ]]; then
  chown -R "$OWNER:" "$DIR"
fi

# A server that runs already (postmaster.pid names its port): reuse it.
RUN_PORT=""
if [[ -f "$DIR/postmaster.pid" ]]; then
  pid_port="$(sed -n 4p "$DIR/postmaster.pid" 2>/dev/null || true)"
  if [[ "$pid_port" =~ ^[0-9]+$ ]]; then
    rc=0
    isready "$pid_port" || rc=$?
    if ((rc == 0 || rc == 1)); then
      RUN_PORT="$pid_port"
      log "reusing the private cluster $DIR, running on port $RUN_PORT"
      if ((RUN_PORT != PORT)); then
        log "note: it runs on port $RUN_PORT, not PARLEY_POSTGRES_PORT=$PORT; stop it to change the port"
      fi
    fi
  fi
fi

DEADLINE=$((SECONDS + 30))
if [[ -z "$RUN_PORT" ]]; then
  rc=0
  isready "$PORT" || rc=$?
  if ((rc == 0 || rc == 1)); then
    die "another PostgreSQL server answers on 127.0.0.1:$PORT; choose a free port with PARLEY_POSTGRES_PORT"
  fi
  # pg_ctl hands -o to /bin/sh: quote the socket directory. Unix socket paths are limited
  # to 107 bytes; the tests use TCP, so without room for the socket there is none.
  [[ "$DIR" != *"'"* ]] || die "the cluster path $DIR contains a quote"
  sockdir="$DIR"
  if ((${#DIR} + 16 > 107)); then
    log "note: $DIR is too long for a Unix socket; TCP only"
    sockdir=""
  fi
  # Up to three tries: after a crash, a dying old postmaster can hold postmaster.pid for
  # a moment ("lock file already exists").
  for try in 1 2 3; do
    log "starting the private cluster $DIR on 127.0.0.1:$PORT (log: $DIR/log)"
    if detached as_owner "$BINDIR/pg_ctl" -D "$DIR" -l "$DIR/log" -w -t 30 \
      -o "-h 127.0.0.1 -p $PORT -k '$sockdir' -c max_connections=200 -c fsync=on" \
      start </dev/null; then
      break
    fi
    if ((try == 3)); then
      log "pg_ctl start failed; the end of $DIR/log:"
      tail -n 20 "$DIR/log" >&2 2>/dev/null || true
      exit 1
    fi
    log "pg_ctl start failed; trying again in 2 s"
    sleep 2
  done
  RUN_PORT="$PORT"
  DEADLINE=$((SECONDS + 30))
fi

URL="$(url_for_port "$RUN_PORT")"
PSQL="$BINDIR/psql"
[[ -x "$PSQL" ]] || PSQL="$(client_tool psql || true)"
while :; do
  if [[ -n "$PSQL" ]]; then
    probe_psql "$PSQL" "$URL" && break
  else
    isready "$RUN_PORT" && break
  fi
  if ((SECONDS >= DEADLINE)); then
    log "the private cluster does not accept connections after 30 s: ${PROBE_ERR:-}"
    tail -n 20 "$DIR/log" >&2 2>/dev/null || true
    exit 1
  fi
  sleep 0.5
done
log "private cluster ready"
print_url "$URL"
