-- The database roles of a deployment, run by infra/aws/setup as the master user after
-- `weir migrate` (which the master user runs, so it owns weir's tables). Idempotent: every
-- release runs it again, which also applies a rotated password.
--   psql variables: app_role, app_password, master_role, and optionally registry_role,
--   registry_password (the schema registry's own role and database).
\set ON_ERROR_STOP on

-- weir_app: what the processes connect as. Rows only (no TRUNCATE, no roles, no ALTER or DROP
-- of weir's tables), with one exception, below: the semantic cache's index.
SELECT format('CREATE ROLE %I LOGIN', :'app_role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'app_role') \gexec
ALTER ROLE :"app_role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'app_password';
-- The master user can act as the role (PostgreSQL 16 grants a role's creator only ADMIN):
-- needed to hand it cache_semantic below and for later migrations to alter that table.
GRANT :"app_role" TO :"master_role";

-- Only the roles named here connect to weir's database.
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database()) \gexec
SELECT format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', current_database(), :'app_role') \gexec
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"app_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"app_role";
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO :"app_role";
-- Tables and sequences that later migrations create get the same rights.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app_role";
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO :"app_role";
-- The migration history is read (weir doctor), never written, by the application.
REVOKE INSERT, UPDATE, DELETE ON _sqlx_migrations FROM :"app_role";
-- The one exception: the cache creates the HNSW index of cache_semantic for the configured
-- embedding dimension when it starts (a migration cannot know the dimension). PostgreSQL lets
-- only the table's owner create an index, and only with CREATE on the schema: weir_app owns
-- cache_semantic (no other table) and may create in the schema (objects it would create are its
-- own; it still cannot alter, drop or truncate any other weir table).
ALTER TABLE cache_semantic OWNER TO :"app_role";
GRANT CREATE ON SCHEMA public TO :"app_role";

\if :{?registry_role}
-- weir_registry: Apicurio, owner of its own database `registry` and nothing in weir's.
SELECT format('CREATE ROLE %I LOGIN', :'registry_role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'registry_role') \gexec
ALTER ROLE :"registry_role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'registry_password';
GRANT :"registry_role" TO :"master_role";
SELECT format('CREATE DATABASE registry OWNER %I', :'registry_role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'registry') \gexec
REVOKE ALL ON DATABASE registry FROM PUBLIC;
SELECT format('GRANT CONNECT ON DATABASE registry TO %I', :'registry_role') \gexec
\endif
