#!/bin/sh
# PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379, for the demo and the tests:
#   1. use the ones already running;
#   2. else start the machine's own servers (Debian's postgresql cluster, redis-server);
#   3. else start project-local instances under .services/ from installed server binaries;
#   4. else print the exact command that installs them, and fail.
set -eu
STATE="${PPL_SERVICES_DIR:-.services}"

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
wait_for() { i=0; while ! "$1"; do i=$((i + 1)); [ "$i" -gt 30 ] && return 1; sleep 1; done; }

if pg_up; then
    echo "PostgreSQL: running on 127.0.0.1:5432"
elif command -v pg_ctlcluster >/dev/null 2>&1 && [ -n "$(ls /etc/postgresql 2>/dev/null)" ]; then
    echo "PostgreSQL: starting the machine's cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
    wait_for pg_up
elif bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1) && [ -x "$bindir/initdb" ]; then
    echo "PostgreSQL: starting a project-local instance in $STATE/postgres"
    mkdir -p "$STATE"
    as=""
    if [ "$(id -u)" = 0 ]; then  # initdb refuses to run as root
        id postgres >/dev/null 2>&1 || { echo "no postgres user to run initdb as" >&2; exit 1; }
        as="runuser -u postgres --"
        chown postgres "$STATE"
    fi
    [ -d "$STATE/postgres" ] || $as "$bindir/initdb" -D "$STATE/postgres" -U postgres -A trust >/dev/null
    $as "$bindir/pg_ctl" -D "$STATE/postgres" -l "$STATE/postgres.log" \
        -o "-p 5432 -k /tmp -c listen_addresses=127.0.0.1" start >/dev/null
    wait_for pg_up
else
    echo "PostgreSQL is not running and not installed. Install it with:" >&2
    echo "    sudo apt-get install -y postgresql" >&2
    exit 1
fi

if redis_up; then
    echo "Redis: running on 127.0.0.1:6379"
elif command -v redis-server >/dev/null 2>&1; then
    echo "Redis: starting a project-local instance in $STATE/redis (append-only file on)"
    mkdir -p "$STATE/redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --dir "$(cd "$STATE/redis" && pwd)" \
        --appendonly yes --logfile "$(cd "$STATE/redis" && pwd)/redis.log"
    wait_for redis_up
else
    echo "Redis is not running and not installed. Install it with:" >&2
    echo "    sudo apt-get install -y redis-server" >&2
    exit 1
fi
