-- Idempotency-Key records of the HTTP gateway: the sha256 of the body a key was first used
-- with, per (workspace, scope, key), so that the same key with another body is refused (422)
-- instead of silently answering for the first body. Scope is the operation and its target
-- (`run`, `patch:<workflow_id>`, ...), the same scope the derived ids use. Rows older than
-- `gateway.idempotency_ttl_secs` are expired (ignored, then deleted by the gateway).
CREATE TABLE weir_gateway_idempotency (
    workspace_id text        NOT NULL,
    scope        text        NOT NULL,
    idem_key     text        NOT NULL,
    body_sha256  bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, scope, idem_key)
);
CREATE INDEX weir_gateway_idempotency_created ON weir_gateway_idempotency (created_at);
