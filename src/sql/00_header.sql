-- restart_worker: request restarts of services on other hosts.
--
-- This script is assembled by the Makefile from src/sql/*.sql, one file per concern:
-- schema and tables, the public request API, the registry administration, the wake-up
-- trigger, privileges.
--
-- Every plpgsql function and every SECURITY DEFINER function pins search_path =
-- pg_catalog, pg_temp, and qualifies every name, types included. The caller's temporary
-- schema comes last: left out of the path (an empty search_path, up to 1.7), PostgreSQL
-- looks there first for table and type names, and a temporary domain named like a type a
-- function declares a variable of runs its CHECK, the caller's code, as the owner of a
-- SECURITY DEFINER function. A function with an SQL-standard body (RETURN ..., BEGIN
-- ATOMIC) is bound to the objects it names when it is created, so the search path at call
-- time does not matter to it; it pins nothing, which lets the planner inline the small
-- ones (a name's CHECK runs at every request).

\echo Use "CREATE EXTENSION restart_worker" to load this file. \quit

CREATE SCHEMA restart_worker;
COMMENT ON SCHEMA restart_worker IS
	'Private to restart_worker: agent and service registry, admin functions. Never expose it through PostgREST.';
REVOKE ALL ON SCHEMA restart_worker FROM PUBLIC;
