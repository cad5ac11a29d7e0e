-- Upgrading from 1.0 (the install script as it shipped) through 1.1, 1.2, 1.3, 1.4, 1.5, 1.6
-- 1.7, 1.8, 1.9, 1.10 and 1.11 to 1.12 keeps the rows and gives the same functions,
-- privileges, policies and objects as installing 1.12 afresh, also for a role made an admin
-- (restart_worker.grant_admin()) before the upgrade.
\set VERBOSITY terse
DROP EXTENSION IF EXISTS restart_worker CASCADE;
CREATE EXTENSION restart_worker VERSION '1.0';
CREATE ROLE upgrade_ops NOLOGIN;
SELECT restart_worker.grant_admin('upgrade_ops');
SELECT restart_worker.register_agent('host1', 'http://127.0.0.1:8787', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT restart_worker.register_service('svc1', 'host1', '0');
ALTER EXTENSION restart_worker UPDATE TO '1.1';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.2';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.3';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.4';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.5';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.6';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.7';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.8';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.9';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.10';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.11';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
ALTER EXTENSION restart_worker UPDATE TO '1.12';
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
SELECT name, agent FROM restart_worker.services;

-- What makes up the extension: every member object, and every function's definition and
-- privileges, each as one digest.
CREATE FUNCTION pg_temp.members() RETURNS text LANGUAGE sql AS $$
	SELECT md5(string_agg(pg_describe_object(d.classid, d.objid, 0), E'\n'
						  ORDER BY pg_describe_object(d.classid, d.objid, 0)))
	FROM pg_depend d
	WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
	  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'restart_worker')
$$;
CREATE FUNCTION pg_temp.functions() RETURNS text LANGUAGE sql AS $$
	SELECT md5(string_agg(pg_get_functiondef(p.oid) || ' '
						  || coalesce((SELECT string_agg(a::text, ',' ORDER BY a::text)
									   FROM unnest(p.proacl) a), 'default'),
						  E'\n' ORDER BY p.oid::regprocedure::text))
	FROM pg_proc p
	WHERE p.oid IN (SELECT d.objid FROM pg_depend d
					WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
					  AND d.classid = 'pg_proc'::regclass
					  AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'restart_worker'))
$$;
-- The row level security policies of the tables (not members of the extension).
CREATE FUNCTION pg_temp.policies() RETURNS text LANGUAGE sql AS $$
	SELECT md5(string_agg(format('%s %s %s %s %s %s', p.schemaname, p.tablename, p.policyname,
								 p.cmd, p.qual, p.with_check), E'\n'
						  ORDER BY p.schemaname, p.tablename, p.policyname))
	FROM pg_policies p
	WHERE p.schemaname IN ('public', 'restart_worker')
$$;
SELECT pg_temp.members() AS members, pg_temp.functions() AS functions,
	   pg_temp.policies() AS policies \gset upgraded_

DROP EXTENSION restart_worker CASCADE;
CREATE EXTENSION restart_worker;
SELECT restart_worker.grant_admin('upgrade_ops');
SELECT extversion FROM pg_extension WHERE extname = 'restart_worker';
SELECT pg_temp.members() = :'upgraded_members' AS same_objects,
	   pg_temp.functions() = :'upgraded_functions' AS same_functions,
	   pg_temp.policies() = :'upgraded_policies' AS same_policies;
DROP OWNED BY upgrade_ops;
DROP ROLE upgrade_ops;
