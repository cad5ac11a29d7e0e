-- SECURITY DEFINER functions run with search_path = pg_catalog, pg_temp: the caller's
-- temporary schema last, which an empty search_path would search first for table and type
-- names.  A caller who creates temporary tables or domains named like the types the
-- functions use must not change what they do, nor run code as their owner.
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

-- Temporary domains named like types, with a CHECK that would run the caller's code as the
-- owner: a variable of such a type runs the CHECK when the function sets it up (with an
-- empty search_path, 1.7's register_service() and worker_settle() did). A new session, so
-- that every function is compiled (its variables' types looked up) with the domains there.
\c
\set VERBOSITY terse
BEGIN;
CREATE FUNCTION pg_temp.trap(anyelement) RETURNS boolean LANGUAGE plpgsql
	AS $$ BEGIN RAISE EXCEPTION 'a shadowing domain ran as %', current_user; END $$;
CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (pg_temp.trap(VALUE));
CREATE DOMAIN pg_temp.uuid AS pg_catalog.uuid CHECK (pg_temp.trap(VALUE));
CREATE DOMAIN pg_temp.timestamptz AS pg_catalog.timestamptz CHECK (pg_temp.trap(VALUE));
CREATE DOMAIN pg_temp.jsonb AS pg_catalog.jsonb CHECK (pg_temp.trap(VALUE));
CREATE DOMAIN pg_temp.bytea AS pg_catalog.bytea CHECK (pg_temp.trap(VALUE));
CREATE DOMAIN pg_temp.int4 AS pg_catalog.int4 CHECK (pg_temp.trap(VALUE));
CREATE DOMAIN pg_temp.int8 AS pg_catalog.int8 CHECK (pg_temp.trap(VALUE));
CREATE DOMAIN pg_temp.bool AS pg_catalog.bool CHECK (pg_temp.trap(VALUE));
CREATE DOMAIN pg_temp.regrole AS pg_catalog.regrole CHECK (pg_temp.trap(VALUE));
SELECT set_config('role', 'authenticated', true),
	   set_config('request.jwt.claims', '{"sub":"6f2b4a1e-1d3c-4b5a-9e8f-0a1b2c3d4e5f","role":"authenticated"}', true);
SELECT service_name, status FROM public.request_service_restart(p_service_name := 'shadow-svc');
SELECT service_name, latest_status FROM public.list_restartable_services() WHERE service_name = 'shadow-svc';
SELECT status FROM public.cancel_service_restart(
	(SELECT id FROM public.service_restart_requests WHERE service_name = 'shadow-svc' AND status = 'pending'));
SELECT set_config('role', 'service_role', true);
SELECT restart_worker.register_agent('shadow-host', 'http://127.0.0.1:8788', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT restart_worker.rotate_agent_secret('shadow-host', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT restart_worker.register_service('shadow-svc2', 'shadow-host', '0');
SELECT restart_worker.register_service('shadow-svc', 'shadow-host', '0');
SELECT restart_worker.set_service_enabled('shadow-svc2', false);
SELECT restart_worker.remove_service('shadow-svc2');
SELECT restart_worker.register_service('shadow-svc', 'host1', '0');
SELECT restart_worker.remove_agent('shadow-host');
SELECT status FROM public.request_service_restart(p_service_name := 'shadow-svc');
SELECT status FROM restart_worker.cancel_request(
	(SELECT id FROM public.service_restart_requests WHERE service_name = 'shadow-svc' AND status = 'pending'));
SELECT restart_worker.prune_requests();
SELECT restart_worker.worker_settle(now() - interval '1 year');
ROLLBACK;

-- Every function of the extension that pins a search path pins this one.
SELECT p.oid::regprocedure AS other_search_path, p.proconfig
FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'restart_worker')
  AND p.proconfig IS NOT NULL AND NOT p.proconfig @> '{"search_path=pg_catalog, pg_temp"}'
ORDER BY 1;
-- and every PL/pgSQL or SECURITY DEFINER function pins one
SELECT p.oid::regprocedure AS pins_no_search_path
FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'restart_worker')
  AND (p.prosecdef OR p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'plpgsql'))
  AND p.proconfig IS NULL
ORDER BY 1;
