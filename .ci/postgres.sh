# Sourced by .ci/run (and by hand, to run the PostgreSQL tests locally): a throwaway PostgreSQL
# server (Debian's package) on 127.0.0.1, for the shared-storage sweep tests.
#   ENGINE_TEST_POSTGRES_URL         a superuser, no password (trust)
#   ENGINE_TEST_POSTGRES_SECRET_URL  a role that must give its password (scram-sha-256), which
#                                    the secret-handling tests look for in every file a sweep writes
# The tests skip where these are unset. The server stops when the sourcing shell exits.
if ! command -v pg_ctl >/dev/null && ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGDATA=$(mktemp -d /tmp/engine-ci-pg.XXXXXX)
PGPORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PGSECRET=$(python -c 'import secrets; print(secrets.token_hex(16))')
chown postgres "$PGDATA"
su postgres -c "$PGBIN/initdb -D $PGDATA -A trust -U postgres" >/dev/null
# First match wins: the password role over TCP must authenticate; everything else is trusted.
cat > "$PGDATA/pg_hba.conf" <<HBA
local all all trust
host all engine_secret 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
HBA
chown postgres "$PGDATA/pg_hba.conf"
su postgres -c "$PGBIN/pg_ctl -D $PGDATA -o '-h 127.0.0.1 -p $PGPORT -k $PGDATA' -l $PGDATA/server.log -w start" >/dev/null
trap 'su postgres -c "$PGBIN/pg_ctl -D $PGDATA -m fast stop" >/dev/null; rm -rf "$PGDATA"' EXIT
su postgres -c "$PGBIN/createdb -h 127.0.0.1 -p $PGPORT -U postgres engine_test"
# The password goes through psql's standard input, not its command line.
echo "CREATE ROLE engine_secret LOGIN PASSWORD '$PGSECRET';" |
  su postgres -c "$PGBIN/psql -q -h $PGDATA -p $PGPORT -U postgres -d postgres" >/dev/null
su postgres -c "$PGBIN/createdb -h 127.0.0.1 -p $PGPORT -U postgres -O engine_secret engine_secret_test"
export ENGINE_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$PGPORT/engine_test"
export ENGINE_TEST_POSTGRES_SECRET_URL="postgresql://engine_secret:$PGSECRET@127.0.0.1:$PGPORT/engine_secret_test"
