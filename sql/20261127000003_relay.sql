-- The outbox relay (processors/relay, docs/relay.md): relay heartbeats for lane balancing,
-- the NOTIFY wake-up, and the table of rows that can never be published.
--
-- Ownership of lanes is NOT stored here: a lane belongs to the relay whose Postgres session
-- holds the advisory lock (0x57454952 'WEIR', lane). Locks vanish with their session, so a
-- crashed relay cannot keep a lane; this table only tells relays how many peers are alive.

-- One row per running relay, refreshed every relay.rebalance_interval_ms. A relay counts as
-- alive while its row is fresher than relay.heartbeat_timeout_ms AND its backend (pid) still
-- exists; each relay takes ceil(lanes / alive) lanes.
CREATE TABLE weir_relays (
    relay_id   text        PRIMARY KEY,
    pid        integer     NOT NULL,
    lanes      integer     NOT NULL DEFAULT 0 CHECK (lanes >= 0),
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);

-- Wake the relays when rows are committed (NOTIFY is delivered at commit; identical
-- notifications of one transaction are folded into one). Statement-level: one notification
-- per INSERT statement, however many rows it writes. Relays also poll, so a lost
-- notification only delays publishing by relay.poll_interval_ms.
CREATE FUNCTION weir_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('weir_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER weir_outbox_notify
    AFTER INSERT ON weir_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION weir_outbox_notify();

-- Rows the broker can never accept (larger than message.max.bytes, invalid topic name): moved
-- here with the reason, in outbox order, so their lane keeps flowing. Nothing is dropped
-- silently; an operator re-inserts a fixed row into weir_outbox to publish it.
CREATE TABLE weir_outbox_dead (
    id         bigint      PRIMARY KEY,
    lane       integer     NOT NULL,
    topic      text        NOT NULL,
    key        bytea,
    payload    bytea       NOT NULL,
    headers    jsonb       NOT NULL,
    created_at timestamptz NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT now(),
    reason     text        NOT NULL
);

-- The outbox is a queue: every row is inserted once and deleted once, so dead tuples pile up
-- at the head of the primary key that every batch scans. Vacuum it by row count, not by the
-- default 20% of a table that is usually near empty but may hold a large backlog.
ALTER TABLE weir_outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 20000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 20000
);
