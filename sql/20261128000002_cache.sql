-- The result cache: exact entries, semantic (prompt embedding) entries, the audit trail of
-- hits, and the CAS blobs the cache stored (for its garbage collector). See docs/cache.md.
--
-- Permission levels are smallints: 1 read < 2 write < 3 admin. A lookup is served an entry
-- only when workspace_id is equal and required_permission <= the requester's level; both
-- conditions are in every lookup statement's WHERE clause.

-- Exact entries. entry_key = sha256 of (workspace_id, required permission level, node type,
-- config hash, inputs hash) over canonical JSON. expires_at is fixed at store time.
CREATE TABLE cache_entries (
    entry_key           bytea       PRIMARY KEY CHECK (octet_length(entry_key) = 32),
    workspace_id        text        NOT NULL,
    node_type           text        NOT NULL,
    required_permission smallint    NOT NULL CHECK (required_permission BETWEEN 1 AND 3),
    owner               text        NOT NULL,
    result_ref          text        NOT NULL CHECK (result_ref ~ '^sha256:[0-9a-f]{64}$'),
    cost_ms             bigint      NOT NULL CHECK (cost_ms >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    hit_count           bigint      NOT NULL DEFAULT 0,
    last_hit_at         timestamptz
) WITH (fillfactor = 80);
-- fillfactor < 100 leaves room on each page so that a hit's UPDATE of hit_count/last_hit_at
-- (columns no index covers) is a HOT update: no new index entries per hit.
CREATE INDEX cache_entries_expires ON cache_entries (expires_at);
CREATE INDEX cache_entries_workspace ON cache_entries (workspace_id, node_type);
CREATE INDEX cache_entries_ref ON cache_entries (result_ref);

-- Semantic entries: one per (workspace, node type, required level, prompt). The embedding
-- column has no fixed dimension; `dims` records it, and the HNSW index is an expression
-- index ((embedding::vector(D)) vector_cosine_ops) WHERE dims = D, created for the
-- deployment's dimension D by the cache at start (weir_cache::Cache::prepare), because a
-- migration cannot know D. cache_embedding_space pins D: a process configured with another
-- dimension is refused.
CREATE TABLE cache_semantic (
    entry_key           bytea       PRIMARY KEY CHECK (octet_length(entry_key) = 32),
    workspace_id        text        NOT NULL,
    node_type           text        NOT NULL,
    required_permission smallint    NOT NULL CHECK (required_permission BETWEEN 1 AND 3),
    owner               text        NOT NULL,
    result_ref          text        NOT NULL CHECK (result_ref ~ '^sha256:[0-9a-f]{64}$'),
    cost_ms             bigint      NOT NULL CHECK (cost_ms >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    hit_count           bigint      NOT NULL DEFAULT 0,
    last_hit_at         timestamptz,
    dims                integer     NOT NULL CHECK (dims > 0),
    embedding           vector      NOT NULL CHECK (vector_dims(embedding) = dims)
) WITH (fillfactor = 70);
-- As above, and more so here: a non-HOT update would insert the row into the HNSW graph again.
CREATE INDEX cache_semantic_expires ON cache_semantic (expires_at);
CREATE INDEX cache_semantic_workspace ON cache_semantic (workspace_id, node_type);
CREATE INDEX cache_semantic_ref ON cache_semantic (result_ref);

-- The embedding space of this deployment (one row): its dimension and embedder.
CREATE TABLE cache_embedding_space (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    dims       integer     NOT NULL CHECK (dims > 0),
    embedder   text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per hit served: who used whose entry. The id is made by the caller (a UUIDv7), so
-- that a hit whose blob then fails verification can take its audit row back.
CREATE TABLE cache_audit (
    id                   uuid        PRIMARY KEY,
    at                   timestamptz NOT NULL DEFAULT now(),
    workspace_id         text        NOT NULL,
    node_type            text        NOT NULL,
    kind                 text        NOT NULL CHECK (kind IN ('exact', 'semantic')),
    entry_key            bytea       NOT NULL,
    owner                text        NOT NULL,
    requester            text        NOT NULL,
    requester_permission smallint    NOT NULL,
    request_id           text        NOT NULL,
    similarity           double precision,
    saved_ms             bigint      NOT NULL
);
CREATE INDEX cache_audit_workspace_at ON cache_audit (workspace_id, at);

-- CAS blobs the cache itself put (results that arrived inline). The garbage collector deletes
-- a blob only when no cache entry and no other known table references it and it has not been
-- (re)referenced for cache.gc_grace_secs. A store touches last_referenced_at BEFORE its CAS
-- put, in its own transaction, so a collection never deletes a blob a store is about to use.
CREATE TABLE cache_blobs (
    result_ref         text        PRIMARY KEY CHECK (result_ref ~ '^sha256:[0-9a-f]{64}$'),
    first_stored_at    timestamptz NOT NULL DEFAULT now(),
    last_referenced_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cache_blobs_last ON cache_blobs (last_referenced_at);
