-- restart_worker 1.0 -> 1.1.
--
-- 1.1 records the common answer of an agent, a job object read by the worker in C, with
-- worker_record_job(), which replaces record_job(); worker_record() takes the time a held
-- 202 came (p_dispatched_at); worker_next_due() and worker_announce() are PL/pgSQL (their
-- plans are kept); worker_claim() looks for a request past its deadline before it runs the
-- update that fails it; try_jsonb() replaces only an escaped zero character. The tables
-- and their rows are unchanged. The definitions below are those of src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.1'" to load this file. \quit

DROP FUNCTION restart_worker.worker_record(uuid, text, integer, text, boolean, boolean,
	integer, integer, integer, integer);
DROP FUNCTION restart_worker.record_job(public.service_restart_requests, text,
	timestamptz, timestamptz, integer, text, text, integer);
DROP FUNCTION restart_worker.worker_next_due(uuid[]);
DROP FUNCTION restart_worker.worker_announce(uuid[]);

-- Text to jsonb, or NULL if it is not JSON (an answer from something else than an agent).
CREATE OR REPLACE FUNCTION restart_worker.try_jsonb(p_text text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
	-- jsonb has no NUL character; the agent's output tail may contain one. Only an escape
	-- \u0000 is replaced, not the text "\u0000" (escaped as \\u0000): escaped backslashes
	-- are set aside first (as a character JSON text cannot hold raw), in linear time.
	IF pg_catalog.strpos(p_text, '\u0000') = 0 THEN
		RETURN p_text::jsonb;
	ELSIF pg_catalog.strpos(p_text, pg_catalog.chr(1)) > 0 THEN
		RETURN NULL;
	END IF;
	RETURN pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(p_text, '\\', pg_catalog.chr(1)),
												 '\u0000', '\ufffd'),
							  pg_catalog.chr(1), '\\')::jsonb;
EXCEPTION
	WHEN others THEN
		RETURN NULL;
END;
$$;

-- Claim up to p_limit due requests for the worker, except those it has in flight
-- (p_exclude): pending ones become dispatching (one attempt more), dispatching ones due
-- for another attempt and running ones whose lease expired are taken again. After a
-- restart (p_recover) every dispatching or running request is taken over at once: it is
-- driven on with the same id, and the agent answers with the existing job. Requests past
-- their deadline fail. Rows locked by someone else are skipped, never waited for.
-- maybe_sent says whether an earlier call may have reached the agent (the row was not
-- pending). The worker keeps what it has in flight in memory; the lease only matters if
-- it forgets a request.
CREATE OR REPLACE FUNCTION restart_worker.worker_claim(
	p_limit integer, p_exclude uuid[], p_lease_ms integer, p_recover boolean)
RETURNS TABLE (id uuid, url text, key bytea, body text, deadline_at timestamptz,
			   maybe_sent boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
	-- Requests past their deadline are rare: look for one before running the update.
	IF EXISTS (SELECT FROM public.service_restart_requests q
			   WHERE q.status IN ('pending', 'dispatching', 'running')
				 AND q.deadline_at <= pg_catalog.now()) THEN
		WITH late AS (
			SELECT q.id FROM public.service_restart_requests q
			WHERE q.status IN ('pending', 'dispatching', 'running')
			  AND q.deadline_at <= pg_catalog.now()
			  AND NOT (q.id = ANY (p_exclude))
			FOR UPDATE SKIP LOCKED)
		UPDATE public.service_restart_requests r
			SET status = 'failed', completed_at = pg_catalog.now(), updated_at = pg_catalog.now(),
				error = restart_worker.timeout_error(r.status, r.error),
				-- A dispatching row may have reached its agent: it holds the cooldown.
				uncertain_at = CASE WHEN r.status = 'dispatching'
									THEN coalesce(r.uncertain_at, pg_catalog.now())
									ELSE r.uncertain_at END
			FROM late
			WHERE r.id = late.id;
	END IF;

	RETURN QUERY
	WITH due AS (
		SELECT q.id, q.status AS old_status FROM public.service_restart_requests q
		WHERE q.status IN ('pending', 'dispatching', 'running')
		  AND (q.next_attempt_at <= pg_catalog.now() OR (p_recover AND q.status <> 'pending'))
		  -- what the worker has in flight is never pending
		  AND (q.status = 'pending' OR NOT (q.id = ANY (p_exclude)))
		ORDER BY q.next_attempt_at
		LIMIT p_limit
		FOR UPDATE SKIP LOCKED),
	claimed AS (
		UPDATE public.service_restart_requests q
			SET status = CASE WHEN q.status = 'pending' THEN 'dispatching' ELSE q.status END,
				attempts = q.attempts + CASE WHEN q.dispatched_at IS NULL THEN 1 ELSE 0 END,
				next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_ms / 1000.0),
				updated_at = pg_catalog.now()
			FROM due
			WHERE q.id = due.id
			RETURNING q.*)
	SELECT c.id, a.url, pg_catalog.decode(pg_catalog.substr(a.secret, 7), 'base64'),
		   restart_worker.call_body(c::public.service_restart_requests), c.deadline_at,
		   d.old_status <> 'pending'
	FROM claimed c
	JOIN due d ON d.id = c.id
	LEFT JOIN restart_worker.services s ON s.name = c.service_name
	LEFT JOIN restart_worker.agents a ON a.name = s.agent;
END;
$$;

-- When the worker next has something to do for requests it does not have in flight:
-- the earliest due attempt or deadline, or NULL if there is none. PL/pgSQL rather than a
-- SQL-standard body: its subqueries keep such a function from being inlined, and a
-- function that is not inlined is planned again at every call; PL/pgSQL keeps the plan.
CREATE FUNCTION restart_worker.worker_next_due(p_exclude uuid[])
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
	RETURN least(
		(SELECT q.next_attempt_at FROM public.service_restart_requests q
		 WHERE q.status IN ('pending', 'dispatching', 'running')
		   AND NOT (q.id = ANY (p_exclude))
		 ORDER BY q.next_attempt_at LIMIT 1),
		(SELECT q.deadline_at FROM public.service_restart_requests q
		 WHERE q.status IN ('pending', 'dispatching', 'running')
		   AND NOT (q.id = ANY (p_exclude))
		 ORDER BY q.deadline_at LIMIT 1));
END;
$$;

-- Copy a job object the agent answered with to request p_id, and say what the worker does
-- next: 'follow' a running job, or the terminal status it reached ('failed' for a running
-- job past its deadline). The worker calls it directly for the common answer, a job object
-- it has read and checked itself (src/job.c); worker_record() calls it for a job object it
-- has parsed (parse_job()). Returns NULL, changing nothing, if the request is not
-- dispatching or running, or someone else holds its row: worker_record() sorts that out.
-- p_dispatched_at is when the agent accepted the job, if the worker learnt it from an
-- earlier answer than this one (NULL: now). p_running_first says that the worker records
-- two answers at once, the 202 of a job (running) and its end: the row goes from
-- dispatching to the end in one update, and running is announced first, as an update to
-- running would have announced it (in the same transaction, nobody could see that row
-- version anyway).
CREATE FUNCTION restart_worker.worker_record_job(p_id uuid,
	p_status text, p_started_at timestamptz, p_finished_at timestamptz,
	p_exit_code integer, p_output text, p_error text, p_lease_ms integer,
	p_dispatched_at timestamptz, p_running_first boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
	v_deadline	timestamptz;
BEGIN
	IF p_running_first THEN
		-- Lock the row before announcing, so that a locked row announces nothing.
		PERFORM pg_catalog.pg_notify('restart_worker',
			pg_catalog.json_build_object('id', r.id, 'service_name', r.service_name,
										 'status', 'running')::pg_catalog.text)
		FROM (SELECT q.id, q.service_name FROM public.service_restart_requests q
			  WHERE q.id = p_id AND q.status = 'dispatching'
			  FOR UPDATE SKIP LOCKED) r;
	END IF;
	-- One update, also for a job that already ended: each row version costs.
	WITH mine AS (
		SELECT r.id FROM public.service_restart_requests r
		WHERE r.id = p_id AND r.status IN ('dispatching', 'running')
		FOR UPDATE SKIP LOCKED)
	UPDATE public.service_restart_requests q
		SET dispatched_at = coalesce(q.dispatched_at, p_dispatched_at, pg_catalog.now()),
			started_at = coalesce(p_started_at, q.started_at),
			output = pg_catalog.left(p_output, 1048576),
			exit_code = p_exit_code,
			status = p_status,
			error = CASE WHEN p_status = 'running' THEN NULL
						 ELSE pg_catalog.left(p_error, 1000) END,
			completed_at = CASE WHEN p_status = 'running' THEN NULL
								ELSE coalesce(p_finished_at, pg_catalog.now()) END,
			next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_ms / 1000.0),
			updated_at = pg_catalog.now()
		FROM mine
		WHERE q.id = mine.id
		RETURNING q.deadline_at INTO v_deadline;
	IF NOT FOUND THEN
		RETURN NULL;
	ELSIF p_status <> 'running' THEN
		RETURN p_status;
	ELSIF v_deadline <= pg_catalog.now() THEN
		PERFORM restart_worker.finish(p_id, 'failed', restart_worker.timeout_error('running', NULL));
		RETURN 'failed';
	END IF;
	RETURN 'follow';
END;
$$;

-- Record the outcome of one call to an agent and say what the worker does next:
--   'follow'    the job is running: ask again with a long-poll;
--   'retry'     put back until next_at (could not connect, timeout, lost connection,
--               5xx, 429);
--   'completed' or 'failed': the request ended;
--   'locked'    someone holds the row: the worker records the outcome again later;
--   'gone'      the request is no longer the worker's (deleted, or ended elsewhere).
-- p_kind is 'answer' when the agent answered (p_http, p_body), else the kind of failure
-- (see classify()); p_sent whether any of this call's request was sent; p_maybe_sent
-- whether an earlier call may have reached the agent; p_dispatched_at when the agent
-- accepted the job, if an earlier answer (a 202 not recorded on its own) said so. A job
-- object in a 200/202 answer is copied to the row; any other answer that cannot succeed later fails the request at
-- once. A request the agent never accepted fails after its maximum attempts; any request
-- fails past its deadline.
CREATE FUNCTION restart_worker.worker_record(
	p_id uuid, p_kind text, p_http integer, p_body text, p_sent boolean,
	p_maybe_sent boolean, p_max_attempts integer, p_retry_base_ms integer,
	p_retry_max_ms integer, p_lease_ms integer, p_dispatched_at timestamptz,
	OUT action text, OUT next_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
	v_row		public.service_restart_requests;
	v_max		integer;
	v_answer	jsonb := restart_worker.try_jsonb(p_body);
	v_job		record;
	v_how		record;
	v_uncertain	boolean;
	v_note		text := '';
	v_delay		double precision;
BEGIN
	-- SKIP LOCKED rather than NOWAIT in an exception block: a lock taken in a
	-- subtransaction and an update in its parent would make the row's xmax a multixact,
	-- which every later scan of the queue has to look up.
	SELECT * INTO v_row FROM public.service_restart_requests r
		WHERE r.id = p_id AND r.status IN ('dispatching', 'running')
		FOR UPDATE SKIP LOCKED;
	IF NOT FOUND THEN
		IF EXISTS (SELECT FROM public.service_restart_requests r
				   WHERE r.id = p_id AND r.status IN ('dispatching', 'running')) THEN
			action := 'locked';
		ELSE
			action := 'gone';
		END IF;
		RETURN;
	END IF;

	IF p_kind = 'answer' AND p_http IN (200, 202) THEN
		SELECT * INTO v_job FROM restart_worker.parse_job(p_id, v_answer);
		IF v_job.status IS NOT NULL THEN
			action := restart_worker.worker_record_job(p_id, v_job.status, v_job.started_at,
				v_job.finished_at, v_job.exit_code, v_job.output, v_job.error, p_lease_ms,
				p_dispatched_at);
			RETURN;
		END IF;
		RAISE LOG 'restart_worker: request %: the agent answered HTTP % with no valid job object: %',
			p_id, p_http, pg_catalog.left(coalesce(p_body, '(no text)'), 200);
	END IF;

	SELECT * INTO v_how FROM restart_worker.classify(p_kind, p_http, v_answer, p_sent);
	v_uncertain := v_row.dispatched_at IS NULL AND (p_maybe_sent OR v_how.maybe_sent);
	IF v_uncertain THEN
		v_note := '; the agent may have received the request';
		IF v_row.uncertain_at IS NULL THEN
			-- The steps may have run: from now on the request holds the cooldown.
			UPDATE public.service_restart_requests SET uncertain_at = pg_catalog.now()
				WHERE id = p_id;
		END IF;
	END IF;

	IF NOT v_how.retry THEN
		PERFORM restart_worker.finish(p_id, 'failed', v_how.reason || v_note);
		action := 'failed';
		RETURN;
	END IF;

	IF v_row.deadline_at <= pg_catalog.now() THEN
		PERFORM restart_worker.finish(p_id, 'failed', restart_worker.timeout_error(
			CASE WHEN v_row.dispatched_at IS NOT NULL THEN 'running'
				 WHEN v_uncertain THEN 'dispatching' ELSE 'pending' END, v_how.reason));
		action := 'failed';
		RETURN;
	END IF;

	SELECT s.max_attempts INTO v_max FROM restart_worker.services s
		WHERE s.name = v_row.service_name;
	v_max := coalesce(v_max, p_max_attempts);
	IF v_row.dispatched_at IS NULL AND v_row.attempts >= v_max THEN
		PERFORM restart_worker.finish(p_id, 'failed',
			pg_catalog.format('gave up after %s attempts: %s%s', v_row.attempts, v_how.reason, v_note));
		action := 'failed';
		RETURN;
	END IF;

	-- Exponential backoff with jitter: half the delay fixed, half random.
	v_delay := least(p_retry_max_ms, p_retry_base_ms * power(2, greatest(v_row.attempts, 1) - 1));
	v_delay := v_delay / 2 + pg_catalog.random() * v_delay / 2;
	next_at := least(pg_catalog.now() + pg_catalog.make_interval(secs => v_delay / 1000.0),
					 v_row.deadline_at);
	UPDATE public.service_restart_requests
		SET status = CASE WHEN dispatched_at IS NOT NULL THEN 'running'
						  WHEN v_uncertain THEN 'dispatching' ELSE 'pending' END,
			error = v_how.reason, next_attempt_at = next_at, updated_at = pg_catalog.now()
		WHERE id = p_id;
	action := 'retry';
END;
$$;

-- Announce the requests the worker has just claimed (p_ids, pending before the claim)
-- with their status now (dispatching), the payload notify_status() gives; run by the
-- worker once their calls are sent, in the next transaction it commits (see
-- src/claim.c). PL/pgSQL for its kept plan (see worker_next_due()).
CREATE FUNCTION restart_worker.worker_announce(p_ids uuid[])
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
	PERFORM pg_catalog.pg_notify('restart_worker',
		pg_catalog.json_build_object('id', q.id, 'service_name', q.service_name,
									 'status', q.status)::pg_catalog.text)
	FROM public.service_restart_requests q
	WHERE q.id = ANY (p_ids);
END;
$$;

-- Privileges of the functions created anew, as 90_privileges.sql gives every function of
-- the schema: none for PUBLIC or anyone else a default privilege may have granted them,
-- EXECUTE for whoever may execute worker_claim() (the roles given
-- restart_worker.grant_admin()).
DO $$
DECLARE
	v_function	pg_catalog.regprocedure;
	v_grantee	pg_catalog.text;
BEGIN
	FOREACH v_function IN ARRAY ARRAY[
		'restart_worker.worker_record(uuid, text, integer, text, boolean, boolean, integer, integer, integer, integer, timestamptz)',
		'restart_worker.worker_record_job(uuid, text, timestamptz, timestamptz, integer, text, text, integer, timestamptz, boolean)',
		'restart_worker.worker_next_due(uuid[])',
		'restart_worker.worker_announce(uuid[])']::pg_catalog.regprocedure[]
	LOOP
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
	END LOOP;
END;
$$;
