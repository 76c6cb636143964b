//! Every SQL statement the relay runs, in one place (runtime-checked `sqlx::query` for now).
//!
//! All of them run on the relay's ONE dedicated session, the session that holds its lane
//! locks. None is per row: a batch is one SELECT and one DELETE whatever its size.
//!
//! Lane locks are session-level advisory locks `(LOCK_NAMESPACE, lane)`; in `pg_locks` they
//! appear as `locktype = 'advisory'`, `classid = namespace`, `objid = lane`, `objsubid = 2`
//! (the two-int4-key form).

/// Prepares the dedicated session: `$1` application name, `$2` idle_session_timeout (ms),
/// `$3` statement_timeout (ms).
///
/// - `synchronous_commit = off`: the DELETE of published rows does not wait for the WAL
///   flush. A Postgres crash may bring back the last few hundred ms of deleted rows, which are
///   published again: the relay is at-least-once anyway, and order holds (they are the lowest
///   ids of their lanes).
/// - `idle_session_timeout`: a relay that hangs (or waits on the broker far longer than any
///   healthy relay idles) loses its session, so its lanes go to live relays.
pub const SESSION_SETUP: &str = "\
SELECT set_config('application_name', $1, false),
       set_config('synchronous_commit', 'off', false),
       set_config('idle_session_timeout', $2, false),
       set_config('statement_timeout', $3, false)";

/// Heartbeat and liveness in one statement: upserts this relay's row (`$1` relay id, `$3` lanes
/// held), deletes rows of relays that are gone (older than `$2` ms or whose backend no longer
/// exists) and returns the number of live relays, this one included.
///
/// The final SELECT sees the table as it was before the CTEs ran, so it excludes this relay
/// and adds one.
pub const HEARTBEAT: &str = "\
WITH beat AS (
    INSERT INTO weir_relays AS r (relay_id, pid, lanes, started_at, seen_at)
    VALUES ($1, pg_backend_pid(), $3, now(), now())
    ON CONFLICT (relay_id) DO UPDATE
        SET pid = EXCLUDED.pid, lanes = EXCLUDED.lanes, seen_at = EXCLUDED.seen_at,
            started_at = CASE WHEN r.pid = EXCLUDED.pid THEN r.started_at
                              ELSE EXCLUDED.started_at END
    RETURNING 1
), gone AS (
    DELETE FROM weir_relays
    WHERE relay_id <> $1
      AND (seen_at < now() - $2 * interval '1 millisecond'
           OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = weir_relays.pid))
    RETURNING 1
)
SELECT (1 + count(*))::bigint AS live
FROM weir_relays r
WHERE r.relay_id <> $1
  AND r.seen_at >= now() - $2 * interval '1 millisecond'
  AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.pid)";

/// The lanes this session holds right now (`$1` namespace): the source of truth, read after
/// every change of ownership.
pub const HELD_LANES: &str = "\
SELECT COALESCE(array_agg(l.objid::bigint::int ORDER BY l.objid), '{}')::int[] AS lanes
FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted
  AND l.classid = $1::oid AND l.objsubid = 2";

/// Tries to take up to `$4` free lanes among `0 .. $2`, skipping `$3` (held already), in
/// random order so that relays starting together do not collide. Never waits.
///
/// The `OFFSET 0` subquery is a fence: the planner cannot push `pg_try_advisory_lock` below the
/// ORDER BY, so the lock is tried only for rows the LIMIT still pulls; every lane it returns is
/// locked, and the caller re-reads `HELD_LANES` anyway.
pub const TAKE_LANES: &str = "\
SELECT c.lane
FROM (SELECT g.lane
      FROM generate_series(0, $2 - 1) AS g(lane)
      WHERE g.lane <> ALL ($3::int[])
      ORDER BY random()
      OFFSET 0) AS c
WHERE pg_try_advisory_lock($1, c.lane)
LIMIT $4";

/// Releases lanes `$2` (all held by this session): only between batches.
pub const RELEASE_LANES: &str = "\
SELECT count(*) FILTER (WHERE pg_advisory_unlock($1, u.lane))
FROM unnest($2::int[]) AS u(lane)";

/// Releases every lane on shutdown (the session is dedicated: it holds no other advisory lock).
pub const RELEASE_ALL: &str = "SELECT pg_advisory_unlock_all()";

/// Removes this relay's heartbeat on shutdown, so peers rebalance at once.
pub const DELETE_HEARTBEAT: &str = "DELETE FROM weir_relays WHERE relay_id = $1";

/// The highest lane with rows, if any: rows in a lane `>= outbox.lanes` are never taken (a
/// writer configured with more lanes than the relay). Written as ORDER BY .. LIMIT 1 so that
/// it is always one backward probe of the (lane, id) index: `EXISTS (.. WHERE lane >= $1)` is
/// planned as a sequential scan of the whole outbox.
pub const TOP_LANE: &str = "SELECT lane FROM weir_outbox ORDER BY lane DESC LIMIT 1";

/// One batch (`$1` namespace, `$2` limit, `$3` topics to leave out): the lowest ids of the
/// lanes this session holds AT THIS STATEMENT, read from `pg_locks` in the same statement.
/// `$3` are the destinations blocked as missing or unauthorized and not due for a re-check:
/// every row of such a topic is left out, so per (topic, key) nothing is skipped over. A relay whose lock vanished
/// cannot read, hence cannot publish, rows of that lane. `age_s` is the age of each row by the
/// database clock (the lag metric).
///
/// The scan of the primary key starts at the lowest id of the held lanes (one probe of the
/// (lane, id) index per lane), so the rows of other relays' lanes below it (a slow or stuck
/// relay's backlog) are never walked; above it, other lanes' rows are skipped in proportion to
/// their share of the outbox.
///
/// No `FOR UPDATE`: the lane lock, not a row lock, is what makes this session the only reader
/// of these rows (see docs/relay.md for why `SKIP LOCKED` would be harmful here).
pub const SELECT_BATCH: &str = "\
WITH held AS MATERIALIZED (
    SELECT COALESCE(array_agg(l.objid::bigint::int), '{}') AS lanes
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted
      AND l.classid = $1::oid AND l.objsubid = 2
), start AS MATERIALIZED (
    SELECT min(f.id) AS id
    FROM held, unnest(held.lanes) AS h(lane),
         LATERAL (SELECT o.id FROM weir_outbox o WHERE o.lane = h.lane ORDER BY o.id LIMIT 1) AS f
)
SELECT o.id, o.topic, o.key, o.payload, o.headers,
       EXTRACT(EPOCH FROM statement_timestamp() - o.created_at)::float8 AS age_s
FROM weir_outbox o
WHERE o.id >= (SELECT id FROM start)
  AND o.lane = ANY (ARRAY(SELECT unnest(held.lanes) FROM held))
  AND o.topic <> ALL ($3::text[])
ORDER BY o.id
LIMIT $2";

/// Removes the rows the broker acknowledged (`$1` ids), in one statement.
pub const DELETE_PUBLISHED: &str = "DELETE FROM weir_outbox WHERE id = ANY ($1::bigint[])";

/// Moves rows the broker can never accept (`$1` ids) to `weir_outbox_dead`, each with its
/// reason (`$2`, the same length), so their (topic, key) flows again.
pub const MOVE_TO_DEAD: &str = "\
WITH dead AS (
    SELECT * FROM unnest($1::bigint[], $2::text[]) AS d(id, reason)
), moved AS (
    DELETE FROM weir_outbox o USING dead d WHERE o.id = d.id
    RETURNING o.id, o.lane, o.topic, o.key, o.payload, o.headers, o.created_at, d.reason
)
INSERT INTO weir_outbox_dead (id, lane, topic, key, payload, headers, created_at, reason)
SELECT id, lane, topic, key, payload, headers, created_at, reason FROM moved";

/// Moves up to `$3` rows of destination topic `$2` (missing or unauthorized past the bound),
/// lowest ids first, to `weir_outbox_dead` with reason `$4`: only rows of lanes this session
/// holds at this statement (`$1` namespace), like a batch. Repeated until it moves fewer than
/// `$3`, so each statement stays short.
pub const MOVE_TOPIC_TO_DEAD: &str = "\
WITH held AS MATERIALIZED (
    SELECT COALESCE(array_agg(l.objid::bigint::int), '{}') AS lanes
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted
      AND l.classid = $1::oid AND l.objsubid = 2
), victims AS (
    SELECT o.id
    FROM weir_outbox o, held
    WHERE o.topic = $2 AND o.lane = ANY (held.lanes)
    ORDER BY o.id
    LIMIT $3
), moved AS (
    DELETE FROM weir_outbox o USING victims v WHERE o.id = v.id
    RETURNING o.id, o.lane, o.topic, o.key, o.payload, o.headers, o.created_at
)
INSERT INTO weir_outbox_dead (id, lane, topic, key, payload, headers, created_at, reason)
SELECT id, lane, topic, key, payload, headers, created_at, $4 FROM moved";
