-- The runtime's own tables: consumer positions (the effectively-once guarantee) and the
-- transactional outbox. Every processor's effects commit in the same transaction as both.

-- pgvector backs the semantic cache; failing here means the server lacks the extension.
CREATE EXTENSION IF NOT EXISTS vector;

-- Next offset to apply per (group, topic, partition). Positions live here, not in Kafka:
-- a batch's effects and its new positions commit together, so a redelivered record is
-- recognised (offset < next_offset) and never applied twice. Kafka commits only report lag.
CREATE TABLE weir_consumer_positions (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL CHECK (partition >= 0),
    next_offset    bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Output events written in the producing transaction and published by the relay.
-- lane = hash(key) mod lanes: all events of one key share a lane, and a lane is published
-- by one relay at a time in id order, which keeps per-key order with several relays.
CREATE TABLE weir_outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    lane       integer     NOT NULL CHECK (lane >= 0),
    topic      text        NOT NULL,
    key        bytea,
    payload    bytea       NOT NULL,
    headers    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX weir_outbox_lane_id ON weir_outbox (lane, id);
