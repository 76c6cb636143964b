-- `weir dlq redrive` records every dead letter it sends back to its source topic, so that a
-- repeated command is refused (a redriven record is a new record with a new offset: consumer
-- positions cannot recognise it as one already applied).
CREATE TABLE weir_dlq_redrives (
    dlq_topic        text        NOT NULL,
    dlq_partition    integer     NOT NULL CHECK (dlq_partition >= 0),
    dlq_offset       bigint      NOT NULL CHECK (dlq_offset >= 0),
    source_topic     text        NOT NULL,
    target_partition integer     NOT NULL,
    target_offset    bigint      NOT NULL,
    times            integer     NOT NULL DEFAULT 1,
    redriven_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
