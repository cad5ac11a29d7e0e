-- Installing on a database set up as Supabase sets it up: the API roles exist and get
-- default grants on every new object in public.  The extension undoes those grants and
-- gives each role exactly what it needs.  The later test files use this installation.
\set VERBOSITY terse
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN NOINHERIT;
CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
CREATE ROLE authenticator LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO authenticator;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES GRANT ALL ON FUNCTIONS TO anon;
-- Supabase also gives its dashboard roles everything; a trigger of theirs on our tables
-- would run as the extension's owner.
CREATE ROLE dashboard_user NOLOGIN;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO dashboard_user;
ALTER DEFAULT PRIVILEGES GRANT ALL ON FUNCTIONS TO dashboard_user;
ALTER DEFAULT PRIVILEGES GRANT ALL ON SCHEMAS TO dashboard_user;
ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO dashboard_user;

CREATE EXTENSION restart_worker;

-- What each role may do with each object.
SELECT r.rolname AS role,
	   has_function_privilege(r.rolname, 'public.request_service_restart(text)', 'EXECUTE') AS request,
	   has_function_privilege(r.rolname, 'public.cancel_service_restart(uuid)', 'EXECUTE') AS cancel,
	   has_function_privilege(r.rolname, 'public.list_restartable_services()', 'EXECUTE') AS list,
	   has_table_privilege(r.rolname, 'public.service_restart_requests', 'SELECT') AS read,
	   has_table_privilege(r.rolname, 'public.service_restart_requests', 'INSERT, UPDATE, DELETE, TRUNCATE') AS write,
	   has_schema_privilege(r.rolname, 'restart_worker', 'USAGE') AS registry,
	   has_function_privilege(r.rolname, 'restart_worker.register_agent(text,text,text)', 'EXECUTE') AS admin
	FROM pg_roles r
	WHERE r.rolname IN ('anon', 'authenticated', 'service_role', 'authenticator', 'dashboard_user')
	ORDER BY r.rolname;

-- Nobody but the owner holds TRIGGER or REFERENCES on the tables, nor anything at all
-- except the privileges granted above.
SELECT c.oid::regclass::text AS object, a.grantee::regrole::text AS grantee,
	   string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type) AS privileges
	FROM pg_class c, aclexplode(c.relacl) a
	WHERE (c.relnamespace = 'restart_worker'::regnamespace OR c.oid = 'service_restart_requests'::regclass)
	  AND c.relkind = 'r' AND a.grantee <> c.relowner
	GROUP BY 1, 2 ORDER BY 1, 2;

-- No function of the extension is executable by anon, whatever the defaults said.
SELECT p.oid::regprocedure AS executable_by_anon
	FROM pg_proc p
	JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
	JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'restart_worker'
	WHERE has_function_privilege('anon', p.oid, 'EXECUTE');

-- SECURITY DEFINER functions pin search_path to pg_catalog, pg_temp (the caller's
-- temporary schema last).
SELECT p.oid::regprocedure AS definer_without_pinned_search_path
	FROM pg_proc p
	JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
	JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'restart_worker'
	WHERE p.prosecdef AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false);

-- The function is not STRICT: a NULL argument gets an error, not an empty 200.
SELECT proisstrict AS request_is_strict, prorettype::regtype AS returns
	FROM pg_proc WHERE oid = 'public.request_service_restart(text)'::regprocedure;

-- The registry used by the following tests.
SELECT restart_worker.register_agent('host1', 'http://127.0.0.1:8787', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT restart_worker.register_agent('host2', 'unix:/run/restart-agent/agent.sock', 'whsec_' || encode(sha256('k'), 'base64'));
SELECT restart_worker.register_service('mqtt-subscriber', 'host1', p_description := 'MQTT ingestion');
SELECT restart_worker.register_service('api', 'host2', '10 minutes');
SELECT restart_worker.register_service('nocool', 'host1', '0');
SELECT name, agent, cooldown, enabled, deadline, max_attempts, description
	FROM restart_worker.services ORDER BY name;

-- A helper for the following tests: run a statement and show its outcome on one line,
-- with the SQLSTATE and with ids and times replaced so that the output is stable.
CREATE FUNCTION public.outcome(p_sql text)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
	v_state		text;
	v_msg		text;
	v_detail	text;
	v_hint		text;
BEGIN
	EXECUTE p_sql;
	RETURN 'ok';
EXCEPTION
	WHEN OTHERS THEN
		GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT,
			v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
		RETURN regexp_replace(regexp_replace(
			v_state || ': ' || v_msg
			|| coalesce(' DETAIL: ' || nullif(v_detail, ''), '')
			|| coalesce(' HINT: ' || nullif(v_hint, ''), ''),
			'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<uuid>', 'g'),
			'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ', '<time>', 'g');
END;
$$;
GRANT EXECUTE ON FUNCTION public.outcome(text) TO PUBLIC;
