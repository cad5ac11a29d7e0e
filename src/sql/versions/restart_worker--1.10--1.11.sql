-- restart_worker 1.10 -> 1.11.
--
-- 1.11 mends register_agent(): it took an http or https URL that libcurl refuses, a
-- bracketed host that is not an IPv6 address ('http://[10.0.0.5]:8787', 'http://[::1.2]:80'),
-- and every call to that agent then failed at once (the agent's URL is not usable). Its
-- check (check_url()) now asks libcurl too, through the new C function curl_url_usable(),
-- the judgement the worker makes before each call (src/http.c). The table's CHECK
-- (valid_agent_url()) is unchanged, so that a dump with such rows made before restores.
-- The tables and their rows are unchanged. The definitions below are those of
-- src/sql/30_admin.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.11'" to load this file. \quit

-- Whether libcurl takes an http or https agent URL: its URL parser takes it and the port
-- is not 0, the test the worker makes before each call (src/http.c). False for a unix: URL,
-- which is not libcurl's. STABLE, not IMMUTABLE: the answer is the libcurl build's, which
-- an update of the server's packages can change.
CREATE FUNCTION restart_worker.curl_url_usable(p_url text)
RETURNS boolean
LANGUAGE c STABLE STRICT
AS 'MODULE_PATHNAME', 'restart_worker_curl_url_usable';

-- Check an agent URL; raise 22023 if it is not usable. Since 1.11 an http or https URL
-- must be one libcurl takes too, as the worker judges it: the pattern of valid_agent_url()
-- let through a bracketed host that is not an IPv6 address ('http://[10.0.0.5]:8787',
-- 'http://[::1.2]:8787'), and every call to such an agent failed at once. The table's
-- CHECK keeps the pattern alone, so that rows made before restore from a dump.
CREATE OR REPLACE FUNCTION restart_worker.check_url(p_url text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM restart_worker.require(p_url, 'agent URL');
	IF NOT restart_worker.valid_agent_url(p_url)
		OR (p_url ~ '^https?:' AND NOT restart_worker.curl_url_usable(p_url)) THEN
		RAISE EXCEPTION 'agent URL "%" is not usable', p_url
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Use http://host:port, https://host:port (optionally with a path) or unix:/absolute/socket/path.';
	END IF;
END;
$$;

-- The privileges of the new function, as 90_privileges.sql gives every function of the
-- schema: none for PUBLIC or anyone else a default privilege may have granted them,
-- EXECUTE for whoever may execute register_agent() (the roles given
-- restart_worker.grant_admin()). register_agent() does not need the grant: it runs
-- check_url() as its owner.
DO $$
DECLARE
	v_function	pg_catalog.regprocedure := 'restart_worker.curl_url_usable(text)';
	v_grantee	pg_catalog.text;
BEGIN
	EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_function);
	FOR v_grantee IN
		SELECT a.grantee::pg_catalog.regrole::pg_catalog.text
		FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
		WHERE p.oid = v_function AND a.grantee <> p.proowner AND a.grantee <> 0
	LOOP
		EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %s', v_function, v_grantee);
	END LOOP;
	FOR v_grantee IN
		SELECT a.grantee::pg_catalog.regrole::pg_catalog.text
		FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
		WHERE p.oid = 'restart_worker.register_agent(text, text, text)'::pg_catalog.regprocedure
		  AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
	LOOP
		EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s', v_function, v_grantee);
	END LOOP;
END;
$$;
