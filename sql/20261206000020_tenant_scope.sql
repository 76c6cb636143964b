-- Tenant scoping (issue 12): workflow ids are names a tenant chooses, unique per workspace,
-- not globally; and CAS blobs are owned per workspace, so a caller can hand weir a ref only to
-- a blob its own workspace stored. See docs/cas.md ("Ownership") and docs/materializer.md.

-- 1. Workflows keyed by (workspace_id, workflow_id). Before, the first workspace to create an
--    id owned it everywhere: another tenant could squat a name, and the answer to a PUT (404
--    for a taken id, 202 for a free one) revealed other tenants' names. workspace_id leads
--    every key, compared bytewise like workflow_id (see 20261128000006): it is an opaque key
--    too, and the hot probes (materializer heads and patch log) go through these indexes.
ALTER TABLE weir_workflow_heads ALTER COLUMN workspace_id TYPE text COLLATE "C";
ALTER TABLE weir_workflow_heads DROP CONSTRAINT weir_workflow_heads_pkey;
ALTER TABLE weir_workflow_heads ADD PRIMARY KEY (workspace_id, workflow_id);
-- The primary key's prefix serves the lookups by workspace.
DROP INDEX weir_workflow_heads_workspace;

ALTER TABLE weir_workflow_patches ALTER COLUMN workspace_id TYPE text COLLATE "C";
ALTER TABLE weir_workflow_patches DROP CONSTRAINT weir_workflow_patches_pkey;
ALTER TABLE weir_workflow_patches ADD PRIMARY KEY (workspace_id, workflow_id, patch_id);
DROP INDEX weir_workflow_patches_version;
CREATE UNIQUE INDEX weir_workflow_patches_version
    ON weir_workflow_patches (workspace_id, workflow_id, version) WHERE status = 'applied';

-- Pinned snapshots: one per (workspace, workflow, version).
ALTER TABLE weir_coordinator_definitions ALTER COLUMN workspace_id TYPE text COLLATE "C";
ALTER TABLE weir_coordinator_definitions ALTER COLUMN workflow_id TYPE text COLLATE "C";
ALTER TABLE weir_coordinator_definitions DROP CONSTRAINT weir_coordinator_definitions_pkey;
ALTER TABLE weir_coordinator_definitions ADD PRIMARY KEY (workspace_id, workflow_id, version);

-- 2. Blob ownership. A row says "this workspace stored (or was handed by weir) this blob".
--    Every CAS put made for a workspace records one BEFORE the put (gateway bodies moved to
--    the CAS, large definitions of the materializer, inline results the cache stores); a ref a
--    caller gives (output_ref, result_ref, inputs_ref, operations_ref) is accepted only if its
--    workspace has a row, whether or not the blob exists for another tenant.
--
--    pinned: stored by something other than the cache. The cache's garbage collector deletes
--    only blobs the cache itself put (cache_blobs) and never a pinned one: pinned blobs may be
--    referenced from places the collector cannot see (output topics read by analytics).
--    last_used_at: the last put or the last time the gateway accepted the ref from a caller;
--    an unpinned blob is collected only when every owner's last_used_at is older than
--    cache.gc_grace_secs, which therefore covers events still in flight on Kafka.
CREATE TABLE weir_cas_owners (
    workspace_id    text COLLATE "C" NOT NULL,
    blob_ref        text COLLATE "C" NOT NULL CHECK (blob_ref ~ '^sha256:[0-9a-f]{64}$'),
    pinned          boolean          NOT NULL,
    first_stored_at timestamptz      NOT NULL DEFAULT now(),
    last_used_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, blob_ref)
);
-- The collector asks "who owns this blob" across workspaces.
CREATE INDEX weir_cas_owners_ref ON weir_cas_owners (blob_ref);

-- The collector's reference checks probe these by ref; without an index each check would
-- scan the table.
CREATE INDEX weir_workflow_heads_definition_ref ON weir_workflow_heads (definition_ref)
    WHERE definition_ref IS NOT NULL;
CREATE INDEX weir_workflow_patches_operations_ref ON weir_workflow_patches (operations_ref)
    WHERE operations_ref IS NOT NULL;
CREATE INDEX weir_coordinator_definitions_ref ON weir_coordinator_definitions (definition_ref)
    WHERE definition_ref IS NOT NULL;
CREATE INDEX weir_runs_inputs_ref ON weir_runs (inputs_ref) WHERE inputs_ref IS NOT NULL;
CREATE INDEX weir_run_nodes_output_ref ON weir_run_nodes (output_ref) WHERE output_ref IS NOT NULL;

-- Owners of the blobs already referenced, so that existing workflows, runs and cache entries
-- keep working. Conservative: a ref held by a workflow or a run is pinned; a cache entry's
-- ref is unpinned only when the cache put the blob itself.
INSERT INTO weir_cas_owners (workspace_id, blob_ref, pinned)
SELECT workspace_id, blob_ref, bool_or(pinned)
FROM (
    SELECT workspace_id, definition_ref AS blob_ref, true AS pinned
      FROM weir_workflow_heads WHERE definition_ref IS NOT NULL
    UNION ALL
    SELECT workspace_id, operations_ref, true
      FROM weir_workflow_patches WHERE operations_ref IS NOT NULL
    UNION ALL
    SELECT workspace_id, definition_ref, true
      FROM weir_coordinator_definitions WHERE definition_ref IS NOT NULL
    UNION ALL
    SELECT workspace_id, inputs_ref, true FROM weir_runs WHERE inputs_ref IS NOT NULL
    UNION ALL
    SELECT r.workspace_id, n.output_ref, true
      FROM weir_run_nodes n JOIN weir_runs r USING (run_id) WHERE n.output_ref IS NOT NULL
    UNION ALL
    SELECT e.workspace_id, e.result_ref,
           NOT EXISTS (SELECT 1 FROM cache_blobs b WHERE b.result_ref = e.result_ref)
      FROM cache_entries e
    UNION ALL
    SELECT s.workspace_id, s.result_ref,
           NOT EXISTS (SELECT 1 FROM cache_blobs b WHERE b.result_ref = s.result_ref)
      FROM cache_semantic s
) AS refs
WHERE blob_ref ~ '^sha256:[0-9a-f]{64}$'
GROUP BY workspace_id, blob_ref;
