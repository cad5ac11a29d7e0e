-- restart_worker 1.4 -> 1.5.
--
-- 1.5 adds worker_fail_late(), with which a pending request ends at its deadline also
-- while every call slot of the worker is busy. The worker claims nothing then, and only a
-- claim failed the requests past their deadline, so that a request waiting for a slot
-- stayed pending past its deadline until a slot was free; the worker now runs this
-- function then instead, when the next deadline comes (src/deadline.c). The tables, their
-- rows and the existing functions are unchanged. The definition below is that of
-- src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.5'" to load this file. \quit

-- While every call slot is busy the worker claims nothing, so that requests waiting for a
-- slot would not end at their deadline: it runs this instead (src/deadline.c), when the
-- earliest of them reaches its deadline. Fails the requests past their deadline that the
-- worker does not have in flight (p_exclude), as a claim does (worker_claim() of none),
-- and returns when the next active request it does not have in flight reaches its
-- deadline, or NULL if there is none: those are the pending requests and those waiting
-- to be called again.
CREATE FUNCTION restart_worker.worker_fail_late(p_exclude uuid[])
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
	PERFORM FROM restart_worker.worker_claim(0, p_exclude, 0, false);
	RETURN (SELECT q.deadline_at FROM public.service_restart_requests q
			WHERE q.status IN ('pending', 'dispatching', 'running')
			  AND NOT (q.id = ANY (p_exclude))
			ORDER BY q.deadline_at
			LIMIT 1);
END;
$$;

-- The privileges of worker_fail_late(), as 90_privileges.sql gives every function of the
-- schema: none for PUBLIC or anyone else a default privilege may have granted it, EXECUTE
-- for whoever may execute worker_claim() (the roles given restart_worker.grant_admin()).
-- pg_dump leaves such a grant out (it takes it for part of the extension): after
-- restoring a dump of a database updated to 1.5, run grant_admin() again (README).
DO $$
DECLARE
	v_function	pg_catalog.regprocedure := 'restart_worker.worker_fail_late(uuid[])';
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
		WHERE p.oid = 'restart_worker.worker_claim(integer, uuid[], integer, boolean)'::pg_catalog.regprocedure
		  AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
	LOOP
		EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s', v_function, v_grantee);
	END LOOP;
END;
$$;
