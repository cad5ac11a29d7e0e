-- Who may do what, replaying PostgREST's per-request set-up: within one transaction it
-- sets the role and the JWT claims with set_config(..., true), then calls the function.
\set VERBOSITY terse
SELECT restart_worker.register_service('roles-svc', 'host1', '0');
CREATE FUNCTION public.finish_active() RETURNS void LANGUAGE sql
	AS $$ UPDATE service_restart_requests SET status = 'completed'
		  WHERE status IN ('pending', 'dispatching', 'running') $$;

-- anon: no grant, so PostgreSQL refuses the call.
BEGIN;
SELECT set_config('role', 'anon', true), set_config('request.jwt.claims', '{"role":"anon"}', true);
SELECT outcome($$SELECT request_service_restart(p_service_name := 'roles-svc')$$);
ROLLBACK;

-- anon even with a grant (as Supabase's default privileges would give): still refused.
GRANT EXECUTE ON FUNCTION request_service_restart(text) TO anon;
BEGIN;
SELECT set_config('role', 'anon', true), set_config('request.jwt.claims', '{"role":"anon"}', true);
SELECT outcome($$SELECT request_service_restart(p_service_name := 'roles-svc')$$);
ROLLBACK;
REVOKE EXECUTE ON FUNCTION request_service_restart(text) FROM anon;

-- anon with stray grants to read the requests and list the services: sees nothing.
GRANT SELECT ON service_restart_requests TO anon;
GRANT EXECUTE ON FUNCTION list_restartable_services() TO anon;
BEGIN;
SELECT set_config('role', 'anon', true), set_config('request.jwt.claims', '{"role":"anon"}', true);
SELECT count(*) AS anon_reads FROM service_restart_requests;
SELECT outcome($$SELECT count(*) FROM list_restartable_services()$$);
-- and a role whose JWT says anon
SELECT set_config('role', 'authenticated', true);
SELECT outcome($$SELECT count(*) FROM list_restartable_services()$$);
ROLLBACK;
REVOKE SELECT ON service_restart_requests FROM anon;
REVOKE EXECUTE ON FUNCTION list_restartable_services() FROM anon;

-- authenticated without a user id: refused, whichever way the claims are missing.
BEGIN;
SELECT set_config('role', 'authenticated', true), set_config('request.jwt.claims', '{"role":"authenticated"}', true);
SELECT outcome($$SELECT request_service_restart(p_service_name := 'roles-svc')$$);
SELECT set_config('request.jwt.claims', '', true);
SELECT outcome($$SELECT request_service_restart(p_service_name := 'roles-svc')$$);
SELECT set_config('request.jwt.claims', '{"role":"authenticated","sub":""}', true);
SELECT outcome($$SELECT request_service_restart(p_service_name := 'roles-svc')$$);
SELECT set_config('request.jwt.claims', '{"role":"authenticated","sub":"not-a-uuid"}', true);
SELECT outcome($$SELECT request_service_restart(p_service_name := 'roles-svc')$$);
SELECT set_config('request.jwt.claims', '{not json', true);
SELECT outcome($$SELECT request_service_restart(p_service_name := 'roles-svc')$$);
-- JSON that jsonb cannot take (a NUL character): not JSON to us either.
SELECT set_config('request.jwt.claims',
	'{"role":"authenticated","sub":"6f2b4a1e-1d3c-4b5a-9e8f-0a1b2c3d4e5f","x":"\u0000"}', true);
SELECT outcome($$SELECT request_service_restart(p_service_name := 'roles-svc')$$);
ROLLBACK;
SELECT count(*) AS rows_written FROM service_restart_requests WHERE service_name = 'roles-svc';

-- authenticated with a user id: accepted, and requested_by is the JWT's sub.
BEGIN;
SELECT set_config('role', 'authenticated', true),
	   set_config('request.jwt.claims', '{"sub":"6f2b4a1e-1d3c-4b5a-9e8f-0a1b2c3d4e5f","role":"authenticated","email":"ops@example.com"}', true);
SELECT service_name, status, requested_by, requested_by_role
	FROM request_service_restart(p_service_name := 'roles-svc');
COMMIT;
SELECT finish_active();

-- A JWT role claim cannot make an authenticated caller look like another role.
BEGIN;
SELECT set_config('role', 'authenticated', true),
	   set_config('request.jwt.claims', '{"sub":"6f2b4a1e-1d3c-4b5a-9e8f-0a1b2c3d4e5f","role":"service_role"}', true);
SELECT service_name, status, requested_by, requested_by_role
	FROM request_service_restart(p_service_name := 'roles-svc');
ROLLBACK;

-- The legacy per-claim settings of older PostgREST versions are honoured too.
BEGIN;
SELECT set_config('role', 'authenticated', true), set_config('request.jwt.claims', '', true),
	   set_config('request.jwt.claim.sub', '0b7e7c1a-8f4e-4d1e-a2b3-c4d5e6f7a8b9', true),
	   set_config('request.jwt.claim.role', 'authenticated', true);
SELECT service_name, status, requested_by, requested_by_role
	FROM request_service_restart(p_service_name := 'roles-svc');
COMMIT;

-- authenticated may read every request and list the services, but never the registry,
-- and never write a request row directly: requested_by cannot be forged.
BEGIN;
SELECT set_config('role', 'authenticated', true),
	   set_config('request.jwt.claims', '{"sub":"6f2b4a1e-1d3c-4b5a-9e8f-0a1b2c3d4e5f","role":"authenticated"}', true);
SELECT service_name, status, requested_by FROM service_restart_requests
	WHERE service_name = 'roles-svc' ORDER BY requested_at;
SELECT service_name, description, cooldown, latest_status FROM list_restartable_services();
SELECT outcome($$SELECT * FROM restart_worker.agents$$);
SELECT outcome($$SELECT * FROM restart_worker.services$$);
SELECT outcome($$SELECT restart_worker.register_agent('evil', 'http://evil', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')$$);
SELECT outcome($$INSERT INTO service_restart_requests (service_name, requested_by, requested_by_role, deadline_at)
	VALUES ('api', '11111111-1111-1111-1111-111111111111', 'authenticated', now())$$);
SELECT outcome($$UPDATE service_restart_requests SET requested_by = '11111111-1111-1111-1111-111111111111'$$);
SELECT outcome($$UPDATE service_restart_requests SET status = 'completed'$$);
SELECT outcome($$DELETE FROM service_restart_requests$$);
SELECT outcome($$TRUNCATE service_restart_requests$$);
SELECT outcome($$SELECT request_service_restart('roles-svc', 'x')$$);
ROLLBACK;

-- Even if the table privileges were given away again, row level security stops writes:
-- the user's UPDATE and DELETE touch no row (authenticated reads every row, so it sees,
-- inside its transaction, that they are all there and unchanged).
GRANT INSERT, UPDATE, DELETE ON service_restart_requests TO authenticated;
SELECT count(*) AS rows_before FROM service_restart_requests \gset
BEGIN;
SELECT set_config('role', 'authenticated', true),
	   set_config('request.jwt.claims', '{"sub":"6f2b4a1e-1d3c-4b5a-9e8f-0a1b2c3d4e5f","role":"authenticated"}', true);
SELECT outcome($$INSERT INTO service_restart_requests (service_name, requested_by, requested_by_role, deadline_at)
	VALUES ('api', '11111111-1111-1111-1111-111111111111', 'authenticated', now())$$);
UPDATE service_restart_requests SET requested_by = '11111111-1111-1111-1111-111111111111';
DELETE FROM service_restart_requests;
SELECT count(*) = :rows_before AS every_row_survives, count(*) > 0 AS some_rows,
	   count(*) FILTER (WHERE requested_by = '11111111-1111-1111-1111-111111111111') AS forged
	FROM service_restart_requests;
ROLLBACK;
REVOKE INSERT, UPDATE, DELETE ON service_restart_requests FROM authenticated;

-- A user cancels their own pending request, not somebody else's, and not a running one.
BEGIN;
SELECT set_config('role', 'authenticated', true),
	   set_config('request.jwt.claims', '{"sub":"22222222-2222-2222-2222-222222222222","role":"authenticated"}', true);
SELECT outcome(format('SELECT cancel_service_restart(%L)',
	(SELECT id FROM service_restart_requests WHERE service_name = 'roles-svc' AND status = 'pending')));
SELECT outcome($$SELECT cancel_service_restart(NULL)$$);
SELECT set_config('request.jwt.claims', '{"sub":"0b7e7c1a-8f4e-4d1e-a2b3-c4d5e6f7a8b9","role":"authenticated"}', true);
SELECT status, error FROM cancel_service_restart(
	(SELECT id FROM service_restart_requests WHERE service_name = 'roles-svc' AND status = 'pending'));
COMMIT;
UPDATE service_restart_requests SET status = 'running' WHERE service_name = 'roles-svc'
	AND id = (SELECT id FROM service_restart_requests WHERE service_name = 'roles-svc' ORDER BY requested_at LIMIT 1);
BEGIN;
SELECT set_config('role', 'authenticated', true),
	   set_config('request.jwt.claims', '{"sub":"6f2b4a1e-1d3c-4b5a-9e8f-0a1b2c3d4e5f","role":"authenticated"}', true);
SELECT outcome(format('SELECT cancel_service_restart(%L)',
	(SELECT id FROM service_restart_requests WHERE service_name = 'roles-svc' AND status = 'running')));
ROLLBACK;
SELECT finish_active();

-- Cancelling needs a user id: refused for anon (even with a grant) and for an
-- authenticated caller without a usable sub, before the request is looked up.
SELECT id AS pending_id FROM request_service_restart('roles-svc') \gset
GRANT EXECUTE ON FUNCTION cancel_service_restart(uuid) TO anon;
BEGIN;
SELECT set_config('role', 'anon', true), set_config('request.jwt.claims', '{"role":"anon"}', true);
SELECT outcome(format('SELECT cancel_service_restart(%L)', :'pending_id'));
ROLLBACK;
REVOKE EXECUTE ON FUNCTION cancel_service_restart(uuid) FROM anon;
BEGIN;
SELECT set_config('role', 'authenticated', true), set_config('request.jwt.claims', '{"role":"authenticated"}', true);
SELECT outcome(format('SELECT cancel_service_restart(%L)', :'pending_id'));
SELECT set_config('request.jwt.claims', '{"role":"authenticated","sub":"not-a-uuid"}', true);
SELECT outcome(format('SELECT cancel_service_restart(%L)', :'pending_id'));
ROLLBACK;
SELECT status FROM service_restart_requests WHERE id = :'pending_id';
SELECT finish_active();

-- service_role (PostgREST with the service key): requests without a user, reads the
-- registry, administers.
BEGIN;
SELECT set_config('role', 'service_role', true), set_config('request.jwt.claims', '{"role":"service_role"}', true);
SELECT service_name, status, requested_by, requested_by_role
	FROM request_service_restart(p_service_name := 'roles-svc');
SELECT name, url FROM restart_worker.agents ORDER BY name;
SELECT restart_worker.register_service('roles-svc', 'host1', '0', 'set by service_role');
SELECT status, error FROM restart_worker.cancel_request(
	(SELECT id FROM service_restart_requests WHERE service_name = 'roles-svc' AND status = 'pending'));
COMMIT;
SELECT description FROM restart_worker.services WHERE name = 'roles-svc';

-- A role without any grant.
CREATE ROLE stranger;
SET ROLE stranger;
SELECT outcome($$SELECT request_service_restart('roles-svc')$$);
SELECT outcome($$SELECT count(*) FROM service_restart_requests$$);
RESET ROLE;
DROP ROLE stranger;

-- An admin that is not a superuser (Supabase's postgres) makes and takes back grants; a
-- requester may not (since 1.9; before, the admin's GRANTs only warned).
CREATE ROLE deputy_ops;
CREATE ROLE team_requesters;
CREATE ROLE team_admins;
SELECT restart_worker.grant_admin('deputy_ops');
SET ROLE deputy_ops;
SELECT restart_worker.grant_requester('team_requesters');
SELECT restart_worker.grant_admin('team_admins');
RESET ROLE;
SELECT has_function_privilege('team_requesters', 'public.request_service_restart(text)', 'EXECUTE') AS requester_may_request,
	   has_function_privilege('team_admins', 'restart_worker.register_agent(text,text,text)', 'EXECUTE') AS admin_may_register;
SET ROLE team_requesters;
SELECT outcome($$SELECT restart_worker.grant_requester('team_requesters')$$);
SELECT outcome($$SELECT restart_worker.grant_admin('team_requesters')$$);
RESET ROLE;
SET ROLE deputy_ops;
SELECT restart_worker.revoke_requester('team_requesters');
RESET ROLE;
SELECT has_function_privilege('team_requesters', 'public.request_service_restart(text)', 'EXECUTE') AS requester_may_request;
REVOKE ALL ON ALL TABLES IN SCHEMA restart_worker FROM team_admins, deputy_ops;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA restart_worker FROM team_admins, deputy_ops;
REVOKE ALL ON SCHEMA restart_worker FROM team_admins, deputy_ops;
SELECT restart_worker.revoke_requester('team_admins'), restart_worker.revoke_requester('deputy_ops');
REVOKE ALL ON TABLE public.service_restart_requests FROM team_admins, deputy_ops;
DROP ROLE deputy_ops, team_requesters, team_admins;
