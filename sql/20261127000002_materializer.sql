-- Workflow definitions, folded from patch events by the materializer.

-- The current version of every workflow. The definition is inline (jsonb) or, when larger
-- than materializer.inline_definition_max_bytes, in the CAS (definition_ref): never both.
CREATE TABLE weir_workflow_heads (
    workflow_id       text        PRIMARY KEY,
    workspace_id      text        NOT NULL,
    version           bigint      NOT NULL CHECK (version >= 1),
    definition        jsonb,
    definition_ref    text,
    definition_sha256 text        NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((definition IS NULL) <> (definition_ref IS NULL))
);
CREATE INDEX weir_workflow_heads_workspace ON weir_workflow_heads (workspace_id);

-- Every patch the materializer decided on, applied or rejected: the log that
-- `weir workflows replay` folds again. Applied patches have contiguous versions per workflow
-- (1, 2, 3, ...) and the sha256 of the definition they produced.
CREATE TABLE weir_workflow_patches (
    workflow_id       text        NOT NULL,
    patch_id          uuid        NOT NULL,
    workspace_id      text        NOT NULL,
    author            text        NOT NULL,
    base_version      bigint,
    head_version      bigint      NOT NULL,
    status            text        NOT NULL CHECK (status IN ('applied', 'rejected')),
    version           bigint,
    definition_sha256 text,
    operations        jsonb,
    operations_ref    text,
    reason_code       text,
    reason            text,
    source_topic      text        NOT NULL,
    source_partition  integer     NOT NULL,
    source_offset     bigint      NOT NULL,
    submitted_at      timestamptz NOT NULL,
    decided_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (workflow_id, patch_id),
    CHECK ((status = 'applied') = (version IS NOT NULL AND definition_sha256 IS NOT NULL)),
    CHECK ((status = 'rejected') = (reason_code IS NOT NULL))
);
CREATE UNIQUE INDEX weir_workflow_patches_version
    ON weir_workflow_patches (workflow_id, version) WHERE status = 'applied';
