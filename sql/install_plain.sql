-- Installing on a plain PostgreSQL without Supabase's roles: nothing is granted to
-- PUBLIC, and the README's recipe lets other roles (also ones created later) request.
\set VERBOSITY terse
SELECT count(*) AS supabase_roles FROM pg_roles
	WHERE rolname IN ('anon', 'authenticated', 'service_role');
CREATE EXTENSION restart_worker;

-- Nothing for PUBLIC.
SELECT has_table_privilege('public', 'public.service_restart_requests', 'SELECT') AS public_reads,
	   has_function_privilege('public', 'public.request_service_restart(text)', 'EXECUTE') AS public_requests,
	   has_function_privilege('public', 'public.list_restartable_services()', 'EXECUTE') AS public_lists,
	   has_schema_privilege('public', 'restart_worker', 'USAGE') AS public_registry;
SELECT p.oid::regprocedure AS function_executable_by_public
	FROM pg_proc p
	WHERE (p.pronamespace = 'restart_worker'::regnamespace
		   OR p.proname IN ('request_service_restart', 'cancel_service_restart', 'list_restartable_services'))
	  AND has_function_privilege('public', p.oid, 'EXECUTE');

-- Row level security on every table.
SELECT c.oid::regclass AS table_name, c.relrowsecurity AS rls
	FROM pg_class c
	WHERE c.oid IN ('public.service_restart_requests'::regclass,
					'restart_worker.agents'::regclass, 'restart_worker.services'::regclass)
	ORDER BY c.oid::regclass::text;

-- pg_dump keeps the registry and the history.
SELECT unnest(extconfig)::regclass::text AS dumped_with_data FROM pg_extension
	WHERE extname = 'restart_worker' ORDER BY 1;

SELECT restart_worker.register_agent('host1', 'http://127.0.0.1:8787', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT restart_worker.register_service('svc', 'host1', '0');

-- A plain role without a grant may not request.
CREATE ROLE plain_user;
SET ROLE plain_user;
SELECT service_name FROM request_service_restart('svc');
\echo :LAST_ERROR_SQLSTATE
RESET ROLE;

-- The recipe: a group role holds the grants; members request, also those created later.
CREATE ROLE restart_requesters NOLOGIN;
SELECT restart_worker.grant_requester('restart_requesters');
GRANT restart_requesters TO plain_user;
SET ROLE plain_user;
-- A plain role's own JWT settings are ignored: it cannot pass for a user or another role.
BEGIN;
SELECT set_config('request.jwt.claims', '{"sub":"6f2b4a1e-1d3c-4b5a-9e8f-0a1b2c3d4e5f","role":"service_role"}', true);
SELECT set_config('request.jwt.claim.sub', '6f2b4a1e-1d3c-4b5a-9e8f-0a1b2c3d4e5f', true);
SELECT service_name, status, requested_by, requested_by_role FROM request_service_restart('svc');
COMMIT;
SELECT count(*) AS visible_requests FROM service_restart_requests;
RESET ROLE;
UPDATE service_restart_requests SET status = 'completed';
CREATE ROLE later_user IN ROLE restart_requesters;
SET ROLE later_user;
SELECT service_name, status, requested_by, requested_by_role FROM request_service_restart('svc');
-- Such a role has no user id, so it cannot cancel, not even its own request.
SELECT status FROM cancel_service_restart((SELECT id FROM service_restart_requests WHERE status = 'pending'));
\echo :LAST_ERROR_SQLSTATE :LAST_ERROR_MESSAGE
RESET ROLE;

-- An admin role sees and changes every row through the grants grant_admin() gives,
-- and gets no TRIGGER privilege.
CREATE ROLE ops;
SELECT restart_worker.grant_admin('ops');
SET ROLE ops;
SELECT count(*) AS agents_seen FROM restart_worker.agents;
UPDATE service_restart_requests SET status = 'cancelled' WHERE status = 'pending';
SELECT status, count(*) FROM service_restart_requests GROUP BY 1 ORDER BY 1;
CREATE TRIGGER t AFTER INSERT ON restart_worker.agents EXECUTE FUNCTION restart_worker.wake_worker_at_commit();
RESET ROLE;

-- Dropping the extension leaves nothing behind.
DROP EXTENSION restart_worker;
SELECT count(*) AS leftovers FROM pg_namespace WHERE nspname = 'restart_worker';
SELECT to_regclass('public.service_restart_requests') AS leftover_table;
DROP ROLE later_user, plain_user, restart_requesters, ops;
