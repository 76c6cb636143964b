-- API keys of the HTTP gateway. Only the sha256 of a key is stored: the key itself is printed
-- once by `weir keys create` and cannot be recovered from the database.
CREATE TABLE weir_api_keys (
    key_sha256   text        PRIMARY KEY,
    key_id       text        NOT NULL UNIQUE,
    workspace_id text        NOT NULL CHECK (workspace_id <> ''),
    permission   text        NOT NULL CHECK (permission IN ('read', 'write', 'admin')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX weir_api_keys_workspace ON weir_api_keys (workspace_id);
