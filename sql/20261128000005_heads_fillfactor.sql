-- Every batch rewrites the heads it touches. Free space on each page lets Postgres update a
-- head in place (a HOT update: no new index entries, pruned without VACUUM); at the default
-- fillfactor of 100 each update moves the row to another page and adds entries to both
-- indexes. Applies to pages written from now on.
ALTER TABLE weir_workflow_heads SET (fillfactor = 70);
