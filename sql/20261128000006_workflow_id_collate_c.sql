-- Workflow ids are opaque keys: compare them byte by byte. Under the database's locale
-- collation every B-tree comparison of the patch log's and the heads' keys goes through the
-- locale's string comparison (copying both strings to terminate them first); with "C" it is a
-- memcmp. The patch log takes two such index entries per patch and the heads one probe per
-- workflow per batch: inserting 200,000 patch-log-shaped rows took ~15 % less time with "C".
-- Only the order of ids changes (bytewise); equality is the same. Indexes are rebuilt.
ALTER TABLE weir_workflow_patches ALTER COLUMN workflow_id TYPE text COLLATE "C";
ALTER TABLE weir_workflow_heads ALTER COLUMN workflow_id TYPE text COLLATE "C";
