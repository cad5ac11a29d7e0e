-- restart_worker 1.2 -> 1.3.
--
-- 1.3 changes how the worker's functions find a request they already know: by its id
-- alone, its status tested once the row is in hand. With the status in the same query the
-- planner could read the row through a partial index of the active requests, which the
-- statistics of a quiet table make look nearly empty: in a burst of thousands of active
-- requests every look-up scanned them all. The tables, their rows and the functions'
-- signatures, results and privileges are unchanged. The definitions below are those of
-- src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.3'" to load this file. \quit

-- Copy a job object the agent answered with to request p_id, and say what the worker does
-- next: 'follow' a running job, or the terminal status it reached ('failed' for a running
-- job past its deadline). The worker calls it directly for the common answer, a job object
-- it has read and checked itself (src/job.c); worker_record() calls it for a job object it
-- has parsed (parse_job()). Returns NULL, changing nothing (but for a lock on a row that
-- ended, held until the transaction ends), if the request is not dispatching or running,
-- or someone else holds its row: worker_record() sorts that out.
-- p_dispatched_at is when the agent accepted the job, if the worker learnt it from an
-- earlier answer than this one (NULL: now). p_running_first says that the worker records
-- two answers at once, the 202 of a job (running) and its end: the row goes from
-- dispatching to the end in one update, and running is announced first, as an update to
-- running would have announced it (in the same transaction, nobody could see that row
-- version anyway).
CREATE OR REPLACE FUNCTION restart_worker.worker_record_job(p_id uuid,
	p_status text, p_started_at timestamptz, p_finished_at timestamptz,
	p_exit_code integer, p_output text, p_error text, p_lease_ms integer,
	p_dispatched_at timestamptz, p_running_first boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
	v_status	text;
	v_service	text;
	v_deadline	timestamptz;
BEGIN
	-- By id alone, then the status (see the head of this file).
	SELECT q.status, q.service_name INTO v_status, v_service
		FROM public.service_restart_requests q
		WHERE q.id = p_id
		FOR UPDATE SKIP LOCKED;
	IF NOT FOUND OR v_status NOT IN ('dispatching', 'running') THEN
		RETURN NULL;
	END IF;
	IF p_running_first AND v_status = 'dispatching' THEN
		PERFORM pg_catalog.pg_notify('restart_worker',
			pg_catalog.json_build_object('id', p_id, 'service_name', v_service,
										 'status', 'running')::pg_catalog.text);
	END IF;
	-- One update, also for a job that already ended: each row version costs.
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
		WHERE q.id = p_id
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

-- Record many job objects at once, each as worker_record_job() records one: element i of
-- the arrays is one job (a request id, the job's fields, when the agent accepted it if an
-- earlier answer said so, and whether running is announced first). For each job recorded,
-- returns its place in the arrays (n) and what the worker does next ('follow', 'completed'
-- or 'failed'); a request that is not dispatching or running, or whose row someone else
-- holds, is left alone and left out (worker_record() sorts it out). In a burst the worker
-- records the answers of one turn with one call: one update of all their rows.
CREATE OR REPLACE FUNCTION restart_worker.worker_record_jobs(p_ids uuid[],
	p_status text[], p_started_at timestamptz[], p_finished_at timestamptz[],
	p_exit_code integer[], p_output text[], p_error text[],
	p_dispatched_at timestamptz[], p_running_first boolean[], p_lease_ms integer)
RETURNS TABLE (n integer, action text)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
	v_mine		uuid[];
	v_service	text[];
	v_status	text[];
	v_n			integer[];
	v_ids		uuid[];
	v_action	text[];
BEGIN
	-- Lock the rows that are still the worker's, once: only those are announced and
	-- updated, so that a row announced running is the row updated. Each row is looked
	-- up by its id alone (the subquery runs once per id: OFFSET 0 keeps the status test
	-- out of it), then its status is tested (see the head of this file).
	SELECT pg_catalog.array_agg(r.id), pg_catalog.array_agg(r.service_name),
		   pg_catalog.array_agg(r.status)
		INTO v_mine, v_service, v_status
		FROM pg_catalog.unnest(p_ids) AS i(id),
			 LATERAL (SELECT q.id, q.service_name, q.status
					  FROM public.service_restart_requests q
					  WHERE q.id = i.id
					  FOR UPDATE SKIP LOCKED
					  OFFSET 0) r
		WHERE r.status IN ('dispatching', 'running');
	IF v_mine IS NULL THEN
		RETURN;
	END IF;
	IF true = ANY (p_running_first) THEN
		PERFORM pg_catalog.pg_notify('restart_worker',
			pg_catalog.json_build_object('id', m.id, 'service_name', m.service_name,
										 'status', 'running')::pg_catalog.text)
		FROM ROWS FROM (pg_catalog.unnest(v_mine), pg_catalog.unnest(v_service),
						pg_catalog.unnest(v_status)) AS m(id, service_name, status)
		JOIN ROWS FROM (pg_catalog.unnest(p_ids), pg_catalog.unnest(p_running_first))
			AS i(id, running_first) ON i.id = m.id
		WHERE i.running_first AND m.status = 'dispatching';
	END IF;
	WITH i AS (
		SELECT * FROM ROWS FROM (pg_catalog.unnest(p_ids), pg_catalog.unnest(p_status),
								 pg_catalog.unnest(p_started_at), pg_catalog.unnest(p_finished_at),
								 pg_catalog.unnest(p_exit_code), pg_catalog.unnest(p_output),
								 pg_catalog.unnest(p_error), pg_catalog.unnest(p_dispatched_at))
			WITH ORDINALITY AS i(id, status, started_at, finished_at, exit_code, output,
								 error, dispatched_at, n)),
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
			FROM i JOIN pg_catalog.unnest(v_mine) AS m(id) ON m.id = i.id
			WHERE q.id = i.id
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
CREATE OR REPLACE FUNCTION restart_worker.worker_record(
	p_id uuid, p_kind text, p_http integer, p_body text, p_sent boolean,
	p_maybe_sent boolean, p_max_attempts integer, p_retry_base_ms integer,
	p_retry_max_ms integer, p_lease_ms integer, p_dispatched_at timestamptz,
	OUT action text, OUT next_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
	v_row		public.service_restart_requests;
	v_status	text;
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
	-- which every later scan of the queue has to look up. By id alone, then the status
	-- (see the head of this file).
	SELECT * INTO v_row FROM public.service_restart_requests r
		WHERE r.id = p_id
		FOR UPDATE SKIP LOCKED;
	IF NOT FOUND OR v_row.status NOT IN ('dispatching', 'running') THEN
		IF NOT FOUND THEN
			SELECT r.status INTO v_status FROM public.service_restart_requests r
				WHERE r.id = p_id;
		END IF;
		action := CASE WHEN v_status IN ('dispatching', 'running') THEN 'locked'
					   ELSE 'gone' END;
		RETURN;
	END IF;

	IF p_kind = 'answer' AND p_http IN (200, 202) THEN
		SELECT * INTO v_job FROM restart_worker.parse_job(p_id, v_answer);
		IF v_job.status IS NOT NULL THEN
			-- A 202 that tells the job's end: the agent held the POST's answer while
			-- the job ran; running is announced first.
			action := restart_worker.worker_record_job(p_id, v_job.status, v_job.started_at,
				v_job.finished_at, v_job.exit_code, v_job.output, v_job.error, p_lease_ms,
				p_dispatched_at, p_http = 202 AND v_job.status <> 'running');
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
