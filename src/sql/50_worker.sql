-- The background worker's side: how it claims due requests, how it records what agents
-- answer, its status, and the NOTIFY announcing every status change.
--
-- The worker (src/worker.c) runs each of these in its own short transaction and never
-- holds a transaction across a call to an agent. The policy lives here so that it reads
-- in one place: which answers are retried, the backoff, the deadline, the lease.

-- Active requests by deadline: the worker fails those past it, and wakes when one is due.
CREATE INDEX service_restart_requests_deadline
	ON public.service_restart_requests (deadline_at)
	WHERE status IN ('pending', 'dispatching', 'running');

-- The body of the call to the agent for a request. Deterministic, so that every attempt
-- sends the same fields and the agent recognises a repeated request id.
CREATE FUNCTION restart_worker.call_body(p_row public.service_restart_requests)
RETURNS text
LANGUAGE sql STABLE
SET search_path = ''
RETURN pg_catalog.json_build_object(
	'request_id', p_row.id,
	'service', p_row.service_name,
	'requested_by', p_row.requested_by,
	'requested_at', pg_catalog.to_char(p_row.requested_at AT TIME ZONE 'UTC',
									   'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::pg_catalog.text;

-- Text to jsonb, or NULL if it is not JSON (an answer from something else than an agent).
CREATE FUNCTION restart_worker.try_jsonb(p_text text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
	-- jsonb has no NUL character; the agent's output tail may contain one.
	RETURN pg_catalog.replace(p_text, '\u0000', '\ufffd')::jsonb;
EXCEPTION
	WHEN others THEN
		RETURN NULL;
END;
$$;

-- End a request: set its terminal status and the fields that come with it.
CREATE FUNCTION restart_worker.finish(p_id uuid, p_status text, p_error text)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = ''
BEGIN ATOMIC
	UPDATE public.service_restart_requests
		SET status = p_status, error = p_error,
			completed_at = pg_catalog.now(), updated_at = pg_catalog.now()
		WHERE id = p_id;
END;

-- Claim up to p_limit due requests for the worker, except those it has in flight
-- (p_exclude): pending ones become dispatching (one attempt more), and dispatching or
-- running ones whose lease expired are taken over. After a restart (p_recover) every
-- dispatching or running request is taken over at once: it is driven on with the same
-- id, and the agent answers with the existing job. Requests past their deadline fail.
-- The lease (next_attempt_at) only says when a request is due again if the worker
-- forgets it; the worker keeps what it has in flight in memory.
CREATE FUNCTION restart_worker.worker_claim(
	p_limit integer, p_exclude uuid[], p_lease_ms integer, p_recover boolean)
RETURNS TABLE (id uuid, url text, key bytea, body text, deadline_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
	UPDATE public.service_restart_requests r
		SET status = 'failed', completed_at = pg_catalog.now(), updated_at = pg_catalog.now(),
			error = 'timed out' || coalesce(' (last error: ' || r.error || ')', '')
		WHERE r.status IN ('pending', 'dispatching', 'running')
		  AND r.deadline_at <= pg_catalog.now()
		  AND NOT (r.id = ANY (p_exclude));

	RETURN QUERY
	WITH due AS (
		SELECT q.id FROM public.service_restart_requests q
		WHERE q.status IN ('pending', 'dispatching', 'running')
		  AND (q.next_attempt_at <= pg_catalog.now() OR (p_recover AND q.status <> 'pending'))
		  AND NOT (q.id = ANY (p_exclude))
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
		   restart_worker.call_body(c::public.service_restart_requests), c.deadline_at
	FROM claimed c
	LEFT JOIN restart_worker.services s ON s.name = c.service_name
	LEFT JOIN restart_worker.agents a ON a.name = s.agent;
END;
$$;

-- When the worker next has something to do for requests it does not have in flight:
-- the earliest due attempt or deadline, or NULL if there is none.
CREATE FUNCTION restart_worker.worker_next_due(p_exclude uuid[])
RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = ''
RETURN least(
	(SELECT q.next_attempt_at FROM public.service_restart_requests q
	 WHERE q.status IN ('pending', 'dispatching', 'running') AND NOT (q.id = ANY (p_exclude))
	 ORDER BY q.next_attempt_at LIMIT 1),
	(SELECT q.deadline_at FROM public.service_restart_requests q
	 WHERE q.status IN ('pending', 'dispatching', 'running') AND NOT (q.id = ANY (p_exclude))
	 ORDER BY q.deadline_at LIMIT 1));

-- Record the outcome of one call to an agent and say what the worker does next:
--   'follow'    the job is running: ask again with a long-poll;
--   'retry'     put back until next_at (could not connect, timeout, 5xx, 429);
--   'completed' or 'failed': the request ended;
--   'gone'      the request is no longer the worker's (deleted, or ended elsewhere).
-- p_http is the HTTP status (NULL without an answer, then p_error says why), p_body the
-- answer. A job object in a 200/202 answer is copied to the row; other 4xx answers fail
-- the request at once with the agent's reason. A request that never reached its agent
-- fails after its maximum attempts; any request fails past its deadline.
CREATE FUNCTION restart_worker.worker_record(
	p_id uuid, p_http integer, p_body text, p_error text,
	p_max_attempts integer, p_retry_base_ms integer, p_retry_max_ms integer,
	p_lease_ms integer,
	OUT action text, OUT next_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
	v_row		public.service_restart_requests;
	v_max		integer;
	v_answer	jsonb := restart_worker.try_jsonb(p_body);
	v_job		text;
	v_reason	text;
	v_delay		double precision;
BEGIN
	SELECT * INTO v_row FROM public.service_restart_requests r
		WHERE r.id = p_id AND r.status IN ('dispatching', 'running')
		FOR UPDATE;
	IF NOT FOUND THEN
		action := 'gone';
		RETURN;
	END IF;

	IF p_http IN (200, 202) AND pg_catalog.jsonb_typeof(v_answer) = 'object'
		AND v_answer ->> 'status' IN ('running', 'completed', 'failed') THEN
		v_job := v_answer ->> 'status';
		UPDATE public.service_restart_requests
			SET dispatched_at = coalesce(dispatched_at, pg_catalog.now()),
				started_at = coalesce((v_answer ->> 'started_at')::timestamptz, started_at),
				output = v_answer ->> 'output',
				exit_code = (v_answer ->> 'exit_code')::integer,
				status = CASE WHEN v_job = 'running' THEN 'running' ELSE status END,
				error = NULL,
				next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_ms / 1000.0),
				updated_at = pg_catalog.now()
			WHERE id = p_id;
		IF v_job <> 'running' THEN
			UPDATE public.service_restart_requests
				SET status = v_job, error = v_answer ->> 'error',
					completed_at = coalesce((v_answer ->> 'finished_at')::timestamptz, pg_catalog.now()),
					updated_at = pg_catalog.now()
				WHERE id = p_id;
			action := v_job;
		ELSIF v_row.deadline_at <= pg_catalog.now() THEN
			PERFORM restart_worker.finish(p_id, 'failed', 'timed out (the job was still running on the agent)');
			action := 'failed';
		ELSE
			action := 'follow';
		END IF;
		RETURN;
	END IF;

	IF p_http IS NULL THEN
		v_reason := coalesce(p_error, 'no answer from the agent');
	ELSE
		v_reason := pg_catalog.format('HTTP %s from the agent: %s', p_http,
			coalesce(v_answer ->> 'message', v_answer ->> 'error',
					 pg_catalog.left(p_body, 200), 'no message'));
	END IF;

	IF p_http IS NOT NULL AND p_http BETWEEN 400 AND 499 AND p_http <> 429 THEN
		PERFORM restart_worker.finish(p_id, 'failed', 'agent refused the request: ' || v_reason);
		action := 'failed';
		RETURN;
	END IF;

	IF v_row.deadline_at <= pg_catalog.now() THEN
		PERFORM restart_worker.finish(p_id, 'failed', 'timed out (last error: ' || v_reason || ')');
		action := 'failed';
		RETURN;
	END IF;

	SELECT s.max_attempts INTO v_max FROM restart_worker.services s
		WHERE s.name = v_row.service_name;
	v_max := coalesce(v_max, p_max_attempts);
	IF v_row.dispatched_at IS NULL AND v_row.attempts >= v_max THEN
		PERFORM restart_worker.finish(p_id, 'failed',
			pg_catalog.format('gave up after %s attempts: %s', v_row.attempts, v_reason));
		action := 'failed';
		RETURN;
	END IF;

	-- Exponential backoff with jitter: half the delay fixed, half random.
	v_delay := least(p_retry_max_ms, p_retry_base_ms * power(2, greatest(v_row.attempts, 1) - 1));
	v_delay := v_delay / 2 + pg_catalog.random() * v_delay / 2;
	next_at := least(pg_catalog.now() + pg_catalog.make_interval(secs => v_delay / 1000.0),
					 v_row.deadline_at);
	UPDATE public.service_restart_requests
		SET status = CASE WHEN dispatched_at IS NULL THEN 'pending' ELSE 'running' END,
			error = v_reason, next_attempt_at = next_at, updated_at = pg_catalog.now()
		WHERE id = p_id;
	action := 'retry';
END;
$$;

-- Announce every status change on the channel restart_worker, payload
-- {"id": "<uuid>", "service_name": "<name>", "status": "<status>"}, so that a UI can follow
-- a request without polling (LISTEN restart_worker).
CREATE FUNCTION restart_worker.notify_status()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
	PERFORM pg_catalog.pg_notify('restart_worker',
		pg_catalog.json_build_object('id', NEW.id, 'service_name', NEW.service_name,
									 'status', NEW.status)::pg_catalog.text);
	RETURN NULL;
END;
$$;

CREATE TRIGGER notify_status_insert
	AFTER INSERT ON public.service_restart_requests
	FOR EACH ROW
	EXECUTE FUNCTION restart_worker.notify_status();

CREATE TRIGGER notify_status_update
	AFTER UPDATE OF status ON public.service_restart_requests
	FOR EACH ROW
	WHEN (OLD.status IS DISTINCT FROM NEW.status)
	EXECUTE FUNCTION restart_worker.notify_status();

-- The worker's own view of itself, from shared memory.
CREATE FUNCTION restart_worker.worker_state(
	OUT pid integer, OUT state text, OUT started_at timestamptz,
	OUT last_wake timestamptz, OUT last_poll timestamptz, OUT in_flight integer,
	OUT commit_wakeups bigint, OUT wakeups bigint, OUT polls bigint, OUT claimed bigint,
	OUT calls bigint, OUT call_errors bigint, OUT retries bigint,
	OUT completed bigint, OUT failed bigint)
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'restart_worker_worker_state';

-- The worker at a glance: its pid (NULL if it is not running), what it is doing
-- (stopped, starting, waiting for extension, idle, busy), when it was last woken and
-- last looked at the queue, the queue depth (pending requests) and the active requests,
-- the calls in flight and counters since it started.
CREATE FUNCTION restart_worker.status(
	OUT pid integer, OUT state text, OUT started_at timestamptz,
	OUT last_wake timestamptz, OUT last_poll timestamptz,
	OUT queue_depth bigint, OUT active bigint, OUT in_flight integer,
	OUT commit_wakeups bigint, OUT wakeups bigint, OUT polls bigint, OUT claimed bigint,
	OUT calls bigint, OUT call_errors bigint, OUT retries bigint,
	OUT completed bigint, OUT failed bigint)
LANGUAGE sql STABLE
SET search_path = ''
AS $$
	SELECT w.pid, w.state, w.started_at, w.last_wake, w.last_poll,
		   (SELECT count(*) FROM public.service_restart_requests q WHERE q.status = 'pending'),
		   (SELECT count(*) FROM public.service_restart_requests q
			WHERE q.status IN ('pending', 'dispatching', 'running')),
		   w.in_flight, w.commit_wakeups, w.wakeups, w.polls, w.claimed,
		   w.calls, w.call_errors, w.retries, w.completed, w.failed
	FROM restart_worker.worker_state() w;
$$;
