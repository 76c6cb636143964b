-- The cache answers only the question asked (docs/cache.md):
--
-- 1. The exact key now covers the prompt when there is one (key domain weir.cache.exact.v2)
--    and a semantic entry is matched only under the same config (config_hash below, key
--    domain weir.cache.semantic.v2). Entries written under the old keys could answer another
--    question (an agent entry stored with one prompt served to a lookup with another), so
--    they are dropped: a cache refills by use, a wrong answer cannot be taken back.
-- 2. Stores are audited too: cache_audit.kind gains 'store' (an entry written) and
--    'refused' (a result the cache would not keep: PII, size, node type, bad blob), with the
--    reason in `detail`.
-- 3. A semantic entry's embedding must have a length: a zero vector makes cosine NaN, and
--    NaN sorts above every threshold in Postgres. pgvector already refuses NaN and infinity.

DELETE FROM cache_entries;
DELETE FROM cache_semantic;

ALTER TABLE cache_semantic
    ADD COLUMN config_hash bytea NOT NULL CHECK (octet_length(config_hash) = 32),
    ADD CONSTRAINT cache_semantic_embedding_nonzero CHECK (vector_norm(embedding) > 0);
DROP INDEX cache_semantic_workspace;
CREATE INDEX cache_semantic_workspace ON cache_semantic (workspace_id, node_type, config_hash);

ALTER TABLE cache_audit DROP CONSTRAINT cache_audit_kind_check;
ALTER TABLE cache_audit
    ADD CONSTRAINT cache_audit_kind_check CHECK (kind IN ('exact', 'semantic', 'store', 'refused')),
    ADD COLUMN detail text;
