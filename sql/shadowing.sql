-- SECURITY DEFINER functions run with search_path = '', but PostgreSQL still looks in the
-- caller's temporary schema first for table and type names.  A caller who creates
-- temporary tables named like the types the functions use must not change what they do.
\set VERBOSITY terse
SELECT restart_worker.register_service('shadow-svc', 'host1', '0');
BEGIN;
SELECT set_config('role', 'authenticated', true),
	   set_config('request.jwt.claims', '{"sub":"6f2b4a1e-1d3c-4b5a-9e8f-0a1b2c3d4e5f","role":"authenticated"}', true);
CREATE FUNCTION pg_temp.trap(text) RETURNS boolean LANGUAGE plpgsql
	AS $$ BEGIN RAISE EXCEPTION 'a shadowing type was used'; END $$;
CREATE DOMAIN pg_temp.trapped AS text CHECK (pg_temp.trap(VALUE));
CREATE TEMP TABLE record (db_role pg_temp.trapped, jwt_role pg_temp.trapped, sub pg_temp.trapped);
CREATE TEMP TABLE text (t pg_temp.trapped);
CREATE TEMP TABLE uuid (u pg_temp.trapped);
CREATE TEMP TABLE jsonb (j pg_temp.trapped);
CREATE TEMP TABLE timestamptz (t pg_temp.trapped);
CREATE TEMP TABLE bytea (b pg_temp.trapped);
SELECT service_name, status, requested_by, requested_by_role
	FROM public.request_service_restart(p_service_name := 'shadow-svc');
SAVEPOINT again;
SELECT public.request_service_restart(p_service_name := 'shadow-svc');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO again;
SELECT service_name, latest_status FROM public.list_restartable_services() WHERE service_name = 'shadow-svc';
SELECT status, error FROM public.cancel_service_restart(
	(SELECT id FROM public.service_restart_requests WHERE service_name = 'shadow-svc' AND status = 'pending'));
SELECT service_name, status FROM public.request_service_restart(p_service_name := 'shadow-svc');
SELECT set_config('role', 'service_role', true);
SELECT restart_worker.register_service('shadow-svc', 'host1', '0', 'admin under shadowing');
SAVEPOINT again;
SELECT restart_worker.remove_agent('host1');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO again;
SELECT status, error FROM restart_worker.cancel_request(
	(SELECT id FROM public.service_restart_requests WHERE service_name = 'shadow-svc' AND status = 'pending'));
ROLLBACK;
