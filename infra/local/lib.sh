# shellcheck shell=bash disable=SC2034 # variables are used by the scripts that source this
# Shared by infra/local/{up,down,env}: the ONE place where the local stack's endpoints,
# credentials, versions and paths are defined, so the three scripts cannot drift apart.
# Sourced, never executed. Pure definitions + small helpers: sourcing it has no side effects.

# --- where things live --------------------------------------------------------------------
# The repo may be cloned anywhere (CI uses some other folder), so derive everything from
# this file's own location.
WEIR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
WEIR_INFRA="$WEIR_ROOT/infra/local"
# Runtime data, pid files and logs: inside the repo, git-ignored (/.stack/).
STACK="$WEIR_ROOT/.stack"
# A second, independent stack on the same machine (e.g. one that fault-injection runs may
# kill without disturbing the dev stack everyone's tests use): WEIR_STACK_NAME=NAME puts its
# data in .stack-NAME/ and shifts every port by WEIR_STACK_PORT_OFFSET (default 10000:
# Kafka 19092/19093, Postgres 15432, S3 19000, registry 18081/18082). Unset: the dev stack.
WEIR_STACK_NAME="${WEIR_STACK_NAME:-}"
STACK_PORT_OFFSET=0
if [[ -n "$WEIR_STACK_NAME" ]]; then
  if [[ ! "$WEIR_STACK_NAME" =~ ^[a-z0-9][a-z0-9-]{0,30}$ ]]; then
    printf '[weir-stack] ERROR: WEIR_STACK_NAME must be lowercase letters, digits and dashes (got %q)\n' "$WEIR_STACK_NAME" >&2
    return 1 2>/dev/null || exit 1
  fi
  STACK="$WEIR_ROOT/.stack-$WEIR_STACK_NAME"
  STACK_PORT_OFFSET="${WEIR_STACK_PORT_OFFSET:-10000}"
fi
LOGS="$STACK/logs"
# Downloads and builds: outside the repo, so `git clean` / a fresh clone / `down --purge`
# do not throw away a multi-minute install.
CACHE="${WEIR_CACHE_DIR:-${HOME:-/root}/.cache/weir}"

# --- versions -----------------------------------------------------------------------------
KAFKA_VERSION="4.1.2"          # org.apache.kafka:kafka_2.13 on Maven Central
# io.apicurio:apicurio-registry-app:<v>:tar.gz:all. 3.3.x is compiled for Java 21+, so it
# runs on a JDK >= 21 found on the machine (polyglot machines ship Temurin 25 in
# /usr/lib/jvm); without one, `up` falls back to 3.0.9, the newest 3.x that runs on Java 17.
APICURIO_VERSION="3.3.3"
APICURIO_JAVA17_VERSION="3.0.9"
# S3: infra/local/s3-server, s3s-fs 0.14.1 (crates.io, Apache-2.0) with TCP_NODELAY; pinned
# in its own Cargo.toml/Cargo.lock.
PG_MAJOR="15"                  # Debian bookworm's postgresql-15
PGVECTOR_SRC_SUITE="trixie"    # Debian suite whose *source* package gives pgvector 0.8

# --- endpoints & credentials (what the app and tests see; `env` prints these) --------------
KAFKA_HOST="127.0.0.1"
KAFKA_PORT="$((9092 + STACK_PORT_OFFSET))"
KAFKA_CONTROLLER_PORT="$((9093 + STACK_PORT_OFFSET))"
PG_HOST="127.0.0.1"
PG_PORT="${WEIR_PG_PORT:-$((5432 + STACK_PORT_OFFSET))}"   # override when a foreign Postgres owns 5432
PG_USER="weir"
PG_PASSWORD="weir"
PG_DB="weir"
PG_REGISTRY_DB="weir_registry"    # Apicurio's storage; kept apart from the app's schema
S3_HOST="127.0.0.1"
S3_PORT="$((9000 + STACK_PORT_OFFSET))"
S3_BUCKET="weir-cas"
S3_ACCESS_KEY="weir"
S3_SECRET_KEY="weir-secret-key"
S3_REGION="us-east-1"
REGISTRY_HOST="127.0.0.1"
REGISTRY_PORT="$((8081 + STACK_PORT_OFFSET))"
# Quarkus turns on a separate management interface (health/metrics) whose default port is
# 9000 -- the S3 port. Move it out of the way.
REGISTRY_MGMT_PORT="$((8082 + STACK_PORT_OFFSET))"

KAFKA_BOOTSTRAP_SERVERS="$KAFKA_HOST:$KAFKA_PORT"

# Kafka nodes: 1 (one JVM, broker and controller), or, with WEIR_KAFKA_BROKERS=3 on a named
# stack, three combined broker+controller KRaft nodes (ids 1..3, a three-voter quorum;
# replication factor 3, min.insync.replicas 2), so that one broker can die without losing an
# acknowledged write. Node I listens on KAFKA_PORT + 2(I-1), its controller on
# KAFKA_CONTROLLER_PORT + 2(I-1). `up` records the count in the stack's directory, so the
# other scripts (down, env, service) find the same cluster without the variable.
KAFKA_BROKERS="${WEIR_KAFKA_BROKERS:-}"
if [[ -z "$KAFKA_BROKERS" && -n "$WEIR_STACK_NAME" && -s "$STACK/kafka-brokers" ]]; then
  KAFKA_BROKERS="$(cat "$STACK/kafka-brokers")"
fi
KAFKA_BROKERS="${KAFKA_BROKERS:-1}"
if [[ "$KAFKA_BROKERS" != 1 && "$KAFKA_BROKERS" != 3 ]]; then
  printf '[weir-stack] ERROR: WEIR_KAFKA_BROKERS must be 1 or 3 (got %q)\n' "$KAFKA_BROKERS" >&2
  return 1 2>/dev/null || exit 1
fi
if [[ "$KAFKA_BROKERS" == 3 && -z "$WEIR_STACK_NAME" ]]; then
  printf '[weir-stack] ERROR: WEIR_KAFKA_BROKERS=3 is for a named stack (e.g. WEIR_STACK_NAME=chaos3), never the dev stack\n' >&2
  return 1 2>/dev/null || exit 1
fi
if [[ "$KAFKA_BROKERS" == 3 ]]; then
  KAFKA_BOOTSTRAP_SERVERS="$KAFKA_HOST:$KAFKA_PORT,$KAFKA_HOST:$((KAFKA_PORT + 2)),$KAFKA_HOST:$((KAFKA_PORT + 4))"
fi

# kafka_node I: the paths and ports of Kafka node I (1..KAFKA_BROKERS), in KN_DIR, KN_PID,
# KN_LOG, KN_MARKER (what its command line holds), KN_PORT and KN_CONTROLLER_PORT. The single
# node keeps the historical names (.stack/kafka, kafka.pid, logs/kafka.log).
kafka_node() {
  local i="$1"
  if [[ "$KAFKA_BROKERS" == 1 ]]; then
    KN_DIR="$STACK/kafka" KN_PID="$STACK/kafka.pid" KN_LOG="$LOGS/kafka.log"
  else
    KN_DIR="$STACK/kafka-$i" KN_PID="$STACK/kafka-$i.pid" KN_LOG="$LOGS/kafka-$i.log"
  fi
  KN_MARKER="kafka.Kafka $KN_DIR/server.properties"
  KN_PORT="$((KAFKA_PORT + 2 * (i - 1)))"
  KN_CONTROLLER_PORT="$((KAFKA_CONTROLLER_PORT + 2 * (i - 1)))"
}
DATABASE_URL="postgres://$PG_USER:$PG_PASSWORD@$PG_HOST:$PG_PORT/$PG_DB"
S3_ENDPOINT_URL="http://$S3_HOST:$S3_PORT"
SCHEMA_REGISTRY_URL="http://$REGISTRY_HOST:$REGISTRY_PORT/apis/ccompat/v7"

# Names exported by `infra/local/env`, in print order (values are the variables above).
weir_env_lines() {
  local -a kv=(
    KAFKA_BOOTSTRAP_SERVERS "$KAFKA_BOOTSTRAP_SERVERS"
    DATABASE_URL "$DATABASE_URL"
    S3_ENDPOINT_URL "$S3_ENDPOINT_URL"
    S3_BUCKET "$S3_BUCKET"
    AWS_ACCESS_KEY_ID "$S3_ACCESS_KEY"
    AWS_SECRET_ACCESS_KEY "$S3_SECRET_KEY"
    AWS_REGION "$S3_REGION"
    SCHEMA_REGISTRY_URL "$SCHEMA_REGISTRY_URL"
  )
  local i
  for ((i = 0; i < ${#kv[@]}; i += 2)); do
    # Single quotes: safe for eval in bash/zsh/sh; none of the values contain a quote.
    printf "export %s='%s'\n" "${kv[i]}" "${kv[i + 1]}"
  done
  # A named stack says so: tools that act on the stack (infra/local/service, `weir chaos`)
  # then find the same one.
  if [[ -n "$WEIR_STACK_NAME" ]]; then printf "export WEIR_STACK_NAME='%s'\n" "$WEIR_STACK_NAME"; fi
  # A three-broker stack: its topics are created with three replicas (docs/configuration.md,
  # kafka.replication_factor), and infra/local/service knows the cluster's size.
  if [[ "$KAFKA_BROKERS" != 1 ]]; then
    printf "export WEIR_KAFKA_BROKERS='%s'\n" "$KAFKA_BROKERS"
    printf "export WEIR__KAFKA__REPLICATION_FACTOR='%s'\n" "$KAFKA_BROKERS"
  fi
}

# --- derived paths ------------------------------------------------------------------------
PG_BIN="/usr/lib/postgresql/$PG_MAJOR/bin"
# Debian's standard socket dir: short (socket paths are limited to ~107 bytes, a deep CI
# clone path is not) and already owned by the postgres user.
PG_SOCKET_DIR="/var/run/postgresql"
KAFKA_HOME="$CACHE/kafka-$KAFKA_VERSION"
TOOLS="$CACHE/tools"
S3_SERVER_SRC="$WEIR_ROOT/infra/local/s3-server"
S3_SERVER_BIN="$TOOLS/bin/weir-local-s3"

# Postgres refuses to run as root, so its data dir must belong to (and be reachable by) the
# `postgres` OS user. Normally that is .stack/pg. If some parent of the repo is not
# traversable by `postgres` (e.g. a clone under a 0700 home dir), use a per-clone directory
# under /var/lib/weir-stack instead, keyed by a hash of the repo path.
pg_data_dir() {
  if [[ -d "$STACK/pg" ]] || pg_user_can_reach "$WEIR_ROOT"; then
    echo "$STACK/pg"
  else
    echo "/var/lib/weir-stack/$(printf '%s' "$WEIR_ROOT${WEIR_STACK_NAME:+#$WEIR_STACK_NAME}" | sha256sum | cut -c1-16)/pg"
  fi
}

pg_user_can_reach() {
  id postgres >/dev/null 2>&1 && runuser -u postgres -- test -x "$1" 2>/dev/null
}

# --- small helpers ------------------------------------------------------------------------
log() { printf '[weir-stack] %s\n' "$*" >&2; }
warn() { printf '[weir-stack] WARNING: %s\n' "$*" >&2; }

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then echo "$JAVA_HOME/bin/java"; else echo java; fi
}

# Path of a `java` whose major version is >= $1, or nothing. Reads each JDK's `release`
# file instead of starting JVMs, so it costs milliseconds on the warm path.
# Looks at $WEIR_REGISTRY_JAVA_HOME, $JAVA_HOME, the default java, then /usr/lib/jvm/*.
find_java_min() {
  local min="$1" home v major best="" best_major=0 def
  def="$(readlink -f "$(command -v java 2>/dev/null)" 2>/dev/null || true)"
  for home in "${WEIR_REGISTRY_JAVA_HOME:-}" "${JAVA_HOME:-}" "${def%/bin/java}" /usr/lib/jvm/*; do
    [[ -n "$home" && -x "$home/bin/java" && -f "$home/release" ]] || continue
    v="$(sed -n 's/^JAVA_VERSION="\([^"]*\)".*/\1/p' "$home/release")"
    major="${v%%.*}"
    [[ "$major" == 1 ]] && major="$(echo "$v" | cut -d. -f2)" # 1.8.0 -> 8
    [[ "$major" =~ ^[0-9]+$ ]] || continue
    if ((major >= min && major > best_major)); then best="$home/bin/java"; best_major=$major; fi
    # An explicit override wins even if a newer JDK exists.
    [[ -n "$best" && "$home" == "${WEIR_REGISTRY_JAVA_HOME:-}" ]] && break
  done
  [[ -n "$best" ]] && echo "$best"
}

# Is something accepting TCP connections on 127.0.0.1:$1? (bash's /dev/tcp: no extra deps)
port_open() {
  timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# pid from a pid file, only if that process is alive AND its command line still contains
# $2 (guards against a stale pid file whose pid got reused by an unrelated process).
live_pid() {
  local pidfile="$1" marker="$2" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$marker" || return 1
  echo "$pid"
}
