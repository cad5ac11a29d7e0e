-- restart_worker 1.1 -> 1.2.
--
-- 1.2 adds worker_record_jobs(), with which the worker records the job objects of many
-- answers in one call (one update of all their rows) when they come in together. Nothing
-- else changes. The definition below is that of src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.2'" to load this file. \quit

-- Record many job objects at once, each as worker_record_job() records one: element i of
-- the arrays is one job (a request id, the job's fields, when the agent accepted it if an
-- earlier answer said so, and whether running is announced first). For each job recorded,
-- returns its place in the arrays (n) and what the worker does next ('follow', 'completed'
-- or 'failed'); a request that is not dispatching or running, or whose row someone else
-- holds, is left alone and left out (worker_record() sorts it out). In a burst the worker
-- records the answers of one turn with one call: one update of all their rows.
CREATE FUNCTION restart_worker.worker_record_jobs(p_ids uuid[],
	p_status text[], p_started_at timestamptz[], p_finished_at timestamptz[],
	p_exit_code integer[], p_output text[], p_error text[],
	p_dispatched_at timestamptz[], p_running_first boolean[], p_lease_ms integer)
RETURNS TABLE (n integer, action text)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
	v_n			integer[];
	v_ids		uuid[];
	v_action	text[];
BEGIN
	IF true = ANY (p_running_first) THEN
		-- Lock the rows before announcing, so that a locked row announces nothing.
		PERFORM pg_catalog.pg_notify('restart_worker',
			pg_catalog.json_build_object('id', r.id, 'service_name', r.service_name,
										 'status', 'running')::pg_catalog.text)
		FROM (SELECT q.id, q.service_name
			  FROM ROWS FROM (pg_catalog.unnest(p_ids), pg_catalog.unnest(p_running_first))
				AS i(id, running_first)
			  JOIN public.service_restart_requests q ON q.id = i.id
			  WHERE i.running_first AND q.status = 'dispatching'
			  FOR UPDATE OF q SKIP LOCKED) r;
	END IF;
	WITH i AS (
		SELECT * FROM ROWS FROM (pg_catalog.unnest(p_ids), pg_catalog.unnest(p_status),
								 pg_catalog.unnest(p_started_at), pg_catalog.unnest(p_finished_at),
								 pg_catalog.unnest(p_exit_code), pg_catalog.unnest(p_output),
								 pg_catalog.unnest(p_error), pg_catalog.unnest(p_dispatched_at))
			WITH ORDINALITY AS i(id, status, started_at, finished_at, exit_code, output,
								 error, dispatched_at, n)),
	mine AS (
		SELECT q.id FROM i JOIN public.service_restart_requests q ON q.id = i.id
		WHERE q.status IN ('dispatching', 'running')
		FOR UPDATE OF q SKIP LOCKED),
	done AS (
		UPDATE public.service_restart_requests q
			SET dispatched_at = coalesce(q.dispatched_at, i.dispatched_at, pg_catalog.now()),
				started_at = coalesce(i.started_at, q.started_at),
				output = pg_catalog.left(i.output, 1048576),
				exit_code = i.exit_code,
				status = i.status,
				error = CASE WHEN i.status = 'running' THEN NULL
							 ELSE pg_catalog.left(i.error, 1000) END,
				completed_at = CASE WHEN i.status = 'running' THEN NULL
									ELSE coalesce(i.finished_at, pg_catalog.now()) END,
				next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_ms / 1000.0),
				updated_at = pg_catalog.now()
			FROM mine JOIN i ON i.id = mine.id
			WHERE q.id = mine.id
			RETURNING i.n, q.id, q.status, q.deadline_at)
	SELECT pg_catalog.array_agg(d.n::integer), pg_catalog.array_agg(d.id),
		   pg_catalog.array_agg(CASE WHEN d.status <> 'running' THEN d.status
									 WHEN d.deadline_at <= pg_catalog.now() THEN 'late'
									 ELSE 'follow' END)
		INTO v_n, v_ids, v_action
		FROM done d;
	FOR k IN 1 .. coalesce(pg_catalog.array_length(v_n, 1), 0) LOOP
		IF v_action[k] = 'late' THEN
			PERFORM restart_worker.finish(v_ids[k], 'failed',
										  restart_worker.timeout_error('running', NULL));
			v_action[k] := 'failed';
		END IF;
	END LOOP;
	RETURN QUERY SELECT * FROM ROWS FROM (pg_catalog.unnest(v_n), pg_catalog.unnest(v_action));
END;
$$;

-- Its privileges, as 90_privileges.sql gives every function of the schema: none for
-- PUBLIC or anyone else a default privilege may have granted it, EXECUTE for whoever may
-- execute worker_claim() (the roles given restart_worker.grant_admin()).
DO $$
DECLARE
	v_function	pg_catalog.regprocedure := 'restart_worker.worker_record_jobs(uuid[], text[], timestamptz[], timestamptz[], integer[], text[], text[], timestamptz[], boolean[], integer)';
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
