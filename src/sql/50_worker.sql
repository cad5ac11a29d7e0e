-- The background worker's side: how it claims due requests, how it records what agents
-- answer, its status, and the NOTIFY announcing every status change.
--
-- The worker (src/worker.c) runs each of these in its own short transaction and never
-- holds a transaction across a call to an agent. The policy lives here so that it reads
-- in one place: which answers are retried, the backoff, the deadline, the lease.
--
-- The states of a request, and what the worker does with each:
--
--   pending      The request never reached its agent: not yet tried, or every call so
--                far failed before anything was sent (could not connect, TLS handshake,
--                the agent's own 429 too_many_jobs or 500 internal_error, which say that
--                nothing ran); or else a crash lost the claim that made it dispatching
--                (see dispatching). It can be cancelled; it does not start the service's
--                cooldown. Due at next_attempt_at.
--   dispatching  A call may have reached the agent: a call is in flight, or one ended
--                without a certain answer (timed out or connection lost after the request
--                was sent, 5xx from something in between) and the same request id is sent
--                again at next_attempt_at. It cannot be cancelled. The claim that makes a
--                row dispatching commits before any byte is sent, asynchronously: a crash
--                may bring a request that may have been sent back to pending. Such a
--                request was due before the worker's first start after the crash; before
--                the worker claims anything it makes every such request dispatching again
--                (worker_settle()), and until then cancel() refuses them.
--   running      The agent accepted the job (dispatched_at); the worker follows it with
--                long-polls. next_attempt_at is the lease, or the next retry of a call that
--                failed.
--   completed, failed, cancelled   Terminal.
--
-- Every call is made with the request id as webhook-id, so the agent recognises a repeated
-- call and never runs the steps twice. Only calls that may succeed later are retried
-- (could not connect, timeout, a dropped connection, 5xx, 429), up to the service's
-- maximum attempts while the agent has not accepted the job, and until the deadline in
-- every case; any other answer fails the request at once. Failed requests that may have
-- reached the agent say so in error ("...; the agent may have received the request").
--
-- error holds only fixed texts of the worker, plus the error code and message of a
-- well-formed error object of the agent (shortened) and the job's own error text: never
-- a host, a port, a URL or raw text from the network. The worker logs those details.
--
-- A request the worker already knows is looked up by its id alone, and its status tested
-- once the row is in hand, never in the same query. With the status in the query the
-- planner may read the row through one of the partial indexes of the active requests
-- (their predicate matches), and after a quiet spell the statistics say that those hold
-- almost nothing: in a burst of thousands of active requests, every look-up of one of
-- them would scan them all (5 ms per look-up with 10,000 active, instead of 0.02 ms).

-- Active requests by deadline: the worker fails those past it, and wakes when one is due.
CREATE INDEX service_restart_requests_deadline
	ON public.service_restart_requests (deadline_at)
	WHERE status IN ('pending', 'dispatching', 'running');

-- The body of the call to the agent for a request. Deterministic, so that every attempt
-- sends the same fields and the agent recognises a repeated request id.
CREATE FUNCTION restart_worker.call_body(p_row public.service_restart_requests)
RETURNS text
LANGUAGE sql STABLE
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
SET search_path = pg_catalog, pg_temp
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

-- A time stamp of a job object: NULL for JSON null or a missing key, the time for an
-- RFC 3339 string; anything else raises an error (caught by parse_job()).
CREATE FUNCTION restart_worker.job_time(p_value jsonb)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF p_value IS NULL OR pg_catalog.jsonb_typeof(p_value) = 'null' THEN
		RETURN NULL;
	END IF;
	IF pg_catalog.jsonb_typeof(p_value) <> 'string'
		OR (p_value #>> '{}') !~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$' THEN
		RAISE EXCEPTION 'not an RFC 3339 time stamp';
	END IF;
	RETURN (p_value #>> '{}')::pg_catalog.timestamptz;
END;
$$;

-- A text field of a job object: NULL for JSON null or a missing key, the string, shortened
-- to p_max characters; anything else raises an error (caught by parse_job()).
CREATE FUNCTION restart_worker.job_text(p_value jsonb, p_max integer)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF p_value IS NULL OR pg_catalog.jsonb_typeof(p_value) = 'null' THEN
		RETURN NULL;
	END IF;
	IF pg_catalog.jsonb_typeof(p_value) <> 'string' THEN
		RAISE EXCEPTION 'not a string';
	END IF;
	RETURN pg_catalog.left(p_value #>> '{}', p_max);
END;
$$;

-- The fields of a job object the worker records, checked: the answer must be an object
-- for request p_id with a known status, time stamps, an integer exit code and text output
-- and error. status is NULL when the answer is not such a job; nothing raises an error,
-- so that an odd answer fails its request instead of the worker.
CREATE FUNCTION restart_worker.parse_job(p_id uuid, p_answer jsonb,
	OUT status text, OUT started_at timestamptz, OUT finished_at timestamptz,
	OUT exit_code integer, OUT output text, OUT error text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF pg_catalog.jsonb_typeof(p_answer) IS DISTINCT FROM 'object'
		OR pg_catalog.jsonb_typeof(p_answer -> 'request_id') IS DISTINCT FROM 'string'
		OR (p_answer ->> 'request_id') IS DISTINCT FROM p_id::pg_catalog.text
		OR pg_catalog.jsonb_typeof(p_answer -> 'status') IS DISTINCT FROM 'string'
		OR (p_answer ->> 'status') NOT IN ('running', 'completed', 'failed') THEN
		RETURN;
	END IF;
	started_at := restart_worker.job_time(p_answer -> 'started_at');
	finished_at := restart_worker.job_time(p_answer -> 'finished_at');
	IF p_answer -> 'exit_code' IS NOT NULL AND pg_catalog.jsonb_typeof(p_answer -> 'exit_code') <> 'null' THEN
		IF (p_answer -> 'exit_code')::pg_catalog.numeric
			<> pg_catalog.trunc((p_answer -> 'exit_code')::pg_catalog.numeric) THEN
			RAISE EXCEPTION 'exit_code is not an integer';
		END IF;
		exit_code := (p_answer -> 'exit_code')::pg_catalog.int4;
	END IF;
	output := restart_worker.job_text(p_answer -> 'output', 1048576);
	error := restart_worker.job_text(p_answer -> 'error', 1000);
	status := p_answer ->> 'status';
EXCEPTION
	WHEN others THEN
		status := NULL;
		started_at := NULL;
		finished_at := NULL;
		exit_code := NULL;
		output := NULL;
		error := NULL;
END;
$$;

-- What a well-formed error object of the agent says, for error: " <code>: <message>"
-- with the message shortened, or '' when the answer is no such object (then nothing of it
-- is quoted).
CREATE FUNCTION restart_worker.agent_reason(p_answer jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE
	WHEN pg_catalog.jsonb_typeof(p_answer) = 'object'
		AND pg_catalog.jsonb_typeof(p_answer -> 'error') = 'string'
		AND (p_answer ->> 'error') ~ '^[a-z][a-z_]{0,39}$'
		AND pg_catalog.jsonb_typeof(p_answer -> 'message') = 'string'
	THEN ' ' || (p_answer ->> 'error') || ': '
		|| pg_catalog.left(pg_catalog.regexp_replace(p_answer ->> 'message', '[[:cntrl:]]', ' ', 'g'), 200)
	ELSE ''
END;

-- The error of a request that timed out, after its last error, saying whether the agent
-- may have received it (p_status dispatching) or was running it.
CREATE FUNCTION restart_worker.timeout_error(p_status text, p_last_error text)
RETURNS text
LANGUAGE sql IMMUTABLE
RETURN 'timed out'
	|| CASE p_status
		WHEN 'dispatching' THEN '; the agent may have received the request'
		WHEN 'running' THEN ' (the job was still running on the agent)'
		ELSE '' END
	|| coalesce(' (last error: ' || p_last_error || ')', '');

-- End a request: set its terminal status and the fields that come with it.
CREATE FUNCTION restart_worker.finish(p_id uuid, p_status text, p_error text)
RETURNS void
LANGUAGE sql VOLATILE
BEGIN ATOMIC
	UPDATE public.service_restart_requests
		SET status = p_status, error = p_error,
			completed_at = pg_catalog.now(), updated_at = pg_catalog.now()
		WHERE id = p_id;
END;

-- Claim up to p_limit due requests for the worker, except those it has in flight
-- (p_exclude): pending ones become dispatching, dispatching ones due for another attempt
-- and running ones due again (a call following the job failed, or their lease expired)
-- are taken again; each counts one attempt more. After a
-- restart (p_recover) every dispatching or running request is taken over at once: it is
-- driven on with the same id, and the agent answers with the existing job. Requests past
-- their deadline fail, but for those their agent accepted (since 1.9): such a job may have
-- ended in time while nobody followed it (the server was down, or the calls following it
-- failed until the deadline), so the claim takes it for a last look, a GET that asks the
-- agent not to wait, whose record says how it ended, or "timed out" if it still runs
-- (worker_record_jobs(), worker_record()). A claim takes as many as it may call, the
-- earliest deadlines first, once their lease has run out (so that one whose record keeps
-- failing is not asked for again and again); the others wait for a later claim. Only a
-- look for the deadlines alone (p_limit 0, every slot busy, see worker_fail_late()) fails
-- them unasked, as before. Rows locked by someone else are skipped, never waited for; a
-- claim never takes one past its deadline other than for that last look (since 1.10: one
-- that was locked while the claim failed the late ones, by a cancel or register_service()
-- say, could be free by the time it took the due ones, and was sent with no time left).
-- The next claim after its lock is gone fails it (the worker looks again a second after a
-- claim that found a due row it could not take, see src/worker.c). maybe_sent says
-- whether an earlier call may have reached the agent (the row was not pending); accepted
-- (since 1.7) whether the agent accepted it (dispatched_at): the worker then asks for its
-- job (GET) instead of sending the request again, so that an agent that no longer knows
-- the id (its journal lost, the job pruned) answers 404 instead of running the steps
-- again. The worker keeps what it has in flight in memory; the lease only matters if it
-- forgets a request.
--
-- Its plans are made once (plan_cache_mode), as a plan for any arguments: planning at
-- every call costs more than a claim of a few requests, and a plan kept by default after
-- a few calls must not depend on them either. So the due requests are read through their
-- partial index up to a time (now, or after a restart the end of time; with the restart's
-- case OR-ed into the condition, as before 1.4, the kept plan had no range on that index and
-- read every active request), and the rows claimed or failed are updated through the
-- primary key, by their ids as an array (joined to the rows found, the planner may scan the
-- whole table for a few rows in a session that allows it; the worker's does not, see
-- src/worker.c). The arrays are variables (until 1.12 the claim's update had
-- ARRAY(SELECT ...) of the rows locked || the look's ids: under the row level security of
-- a role that is no superuser that condition could not use the index, and the update
-- scanned the whole table).
CREATE FUNCTION restart_worker.worker_claim(
	p_limit integer, p_exclude uuid[], p_lease_ms integer, p_recover boolean)
RETURNS TABLE (id uuid, url text, key bytea, body text, deadline_at timestamptz,
			   maybe_sent boolean, accepted boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
	v_until		pg_catalog.timestamptz := CASE WHEN p_recover THEN 'infinity' ELSE pg_catalog.now() END;
	v_ids		pg_catalog.uuid[];
	v_sent		pg_catalog.bool[];
	v_look		pg_catalog.uuid[] := '{}';
	v_exclude	pg_catalog.uuid[] := p_exclude;
	v_late		pg_catalog.uuid[];
	v_due		pg_catalog.uuid[];
	v_due_sent	pg_catalog.bool[];
BEGIN
	-- Requests past their deadline are rare: look for one before running the update.
	IF EXISTS (SELECT FROM public.service_restart_requests q
			   WHERE q.status IN ('pending', 'dispatching', 'running')
				 AND q.deadline_at <= pg_catalog.now()) THEN
		-- Accepted ones, for a last look (see above).
		IF p_limit > 0 THEN
			SELECT coalesce(pg_catalog.array_agg(l.id), '{}') INTO v_look
			FROM (SELECT q.id FROM public.service_restart_requests q
				  WHERE q.status IN ('dispatching', 'running')
					AND q.dispatched_at IS NOT NULL
					AND q.deadline_at <= pg_catalog.now()
					AND q.next_attempt_at <= v_until
					AND NOT (q.id = ANY (p_exclude))
				  ORDER BY q.deadline_at
				  LIMIT p_limit
				  FOR UPDATE SKIP LOCKED) l;
			v_exclude := p_exclude || v_look;
		END IF;
		-- Claims commit asynchronously (src/settle.c); an end the agent's journal does not
		-- hold must not be lost in a crash, or the request could come back and run after
		-- it was announced failed: a claim that failed a request commits synchronously.
		SELECT pg_catalog.array_agg(l.id) INTO v_late
		FROM (SELECT q.id FROM public.service_restart_requests q
			  WHERE q.status IN ('pending', 'dispatching', 'running')
				AND q.deadline_at <= pg_catalog.now()
				AND NOT (q.id = ANY (v_exclude))
				-- with a slot to call from, accepted ones wait for their look
				AND (p_limit = 0 OR q.dispatched_at IS NULL)
			  FOR UPDATE SKIP LOCKED) l;
		UPDATE public.service_restart_requests r
			SET status = 'failed', completed_at = pg_catalog.now(), updated_at = pg_catalog.now(),
				error = restart_worker.timeout_error(r.status, r.error),
				-- A dispatching row may have reached its agent: it holds the cooldown.
				uncertain_at = CASE WHEN r.status = 'dispatching'
									THEN coalesce(r.uncertain_at, pg_catalog.now())
									ELSE r.uncertain_at END
			WHERE r.id = ANY (v_late);
		IF FOUND THEN
			PERFORM pg_catalog.set_config('synchronous_commit', 'on', true);
		END IF;
	END IF;

	SELECT pg_catalog.array_agg(d.id), pg_catalog.array_agg(d.status <> 'pending')
		INTO v_due, v_due_sent
	FROM (SELECT q.id, q.status FROM public.service_restart_requests q
		  WHERE q.status IN ('pending', 'dispatching', 'running')
			AND q.next_attempt_at <= v_until
			-- pending ones once due, also after a restart
			AND (q.status <> 'pending' OR q.next_attempt_at <= pg_catalog.now())
			-- what the worker has in flight (or looks at, above) is never pending
			AND (q.status = 'pending' OR NOT (q.id = ANY (v_exclude)))
			-- none past its deadline: one that late skipped (see above) waits for the
			-- next claim to fail it
			AND q.deadline_at > pg_catalog.now()
		  ORDER BY q.next_attempt_at
		  LIMIT p_limit - pg_catalog.cardinality(v_look)
		  FOR UPDATE SKIP LOCKED) d;

	WITH claimed AS (
		UPDATE public.service_restart_requests q
			SET status = CASE WHEN q.status = 'pending' THEN 'dispatching' ELSE q.status END,
				-- every call made again counts, also one following a running job after
				-- a failure, so that the delay before the next grows (worker_record())
				attempts = q.attempts + 1,
				next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_ms / 1000.0),
				updated_at = pg_catalog.now()
			WHERE q.id = ANY (v_due || v_look)
			RETURNING q.id)
	SELECT pg_catalog.array_agg(c.id), pg_catalog.array_agg(coalesce(d.sent, true))
		INTO v_ids, v_sent
	FROM claimed c
	LEFT JOIN ROWS FROM (pg_catalog.unnest(v_due), pg_catalog.unnest(v_due_sent)) AS d(id, sent)
		ON d.id = c.id;

	-- Where to send them, read by a statement of its own: under READ COMMITTED it sees a
	-- change of a service's agent that committed before the claim locked the request
	-- (register_service() refuses one after that), which the claim's own snapshot, taken
	-- when it began, may not.
	RETURN QUERY
	SELECT c.id, a.url, pg_catalog.decode(pg_catalog.substr(a.secret, 7), 'base64'),
		   restart_worker.call_body(c::public.service_restart_requests), c.deadline_at,
		   m.maybe_sent, c.dispatched_at IS NOT NULL
	FROM ROWS FROM (pg_catalog.unnest(v_ids), pg_catalog.unnest(v_sent)) AS m(id, maybe_sent)
	JOIN public.service_restart_requests c ON c.id = m.id
	LEFT JOIN restart_worker.services s ON s.name = c.service_name
	LEFT JOIN restart_worker.agents a ON a.name = s.agent;
END;
$$;

-- Before its first claim in the life of the server (unless the server before it stopped
-- cleanly, having settled) the worker (src/settle.c) takes every request still pending
-- that was due before its first start (p_before) for one that may
-- have reached its agent: a claim commits asynchronously, and one lost in a crash (or not
-- yet received by a standby that was then promoted) left its request pending. Such a
-- request becomes dispatching: it is sent again with the same id (the agent answers with
-- the job it has, if any), holds its service's cooldown and can no longer be cancelled.
-- Each is announced (the claim's pending -> dispatching is not, see worker_announce()).
-- Returns how many. The worker commits this synchronously. SECURITY DEFINER: with a role
-- that row level security kept from seeing some requests, it would settle those as none.
CREATE FUNCTION restart_worker.worker_settle(p_before timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_ids		pg_catalog.uuid[];
BEGIN
	WITH settled AS (
		UPDATE public.service_restart_requests q
			SET status = 'dispatching', uncertain_at = coalesce(q.uncertain_at, pg_catalog.now()),
				updated_at = pg_catalog.now()
			WHERE q.status = 'pending' AND q.next_attempt_at <= p_before
			RETURNING q.id)
	SELECT pg_catalog.array_agg(settled.id) INTO v_ids FROM settled;
	IF v_ids IS NULL THEN
		RETURN 0;
	END IF;
	PERFORM restart_worker.worker_announce(v_ids);
	RETURN pg_catalog.cardinality(v_ids);
END;
$$;

-- The time before which a pending request of this database may have reached its agent
-- through a claim lost in a crash, while the worker has not yet settled those requests
-- (worker_settle()) in the life of the server: when the first worker started plus
-- restart_worker.settle_margin, or infinity if none has yet. NULL once it has settled, in
-- a database other than the worker's, and without the library in shared_preload_libraries
-- (there is no worker).
CREATE FUNCTION restart_worker.worker_unsettled_before()
RETURNS timestamptz
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'restart_worker_worker_unsettled_before';

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
SET search_path = pg_catalog, pg_temp
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

-- When the worker next has something to do for requests it does not have in flight:
-- the earliest due attempt or deadline, or NULL if there is none. The deadline of a
-- request its agent accepted does not count (since 1.10): a claim takes such a request
-- only once its lease has run out, also past its deadline (for a last look), so waking at
-- the deadline found nothing to do, and the worker claimed again once a second until the
-- lease ended. PL/pgSQL rather than a SQL-standard body: its subqueries keep such a
-- function from being inlined, and a function that is not inlined is planned again at
-- every call; PL/pgSQL keeps the plan.
CREATE FUNCTION restart_worker.worker_next_due(p_exclude uuid[])
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	RETURN least(
		(SELECT q.next_attempt_at FROM public.service_restart_requests q
		 WHERE q.status IN ('pending', 'dispatching', 'running')
		   AND NOT (q.id = ANY (p_exclude))
		 ORDER BY q.next_attempt_at LIMIT 1),
		(SELECT q.deadline_at FROM public.service_restart_requests q
		 WHERE q.status IN ('pending', 'dispatching', 'running')
		   AND q.dispatched_at IS NULL
		   AND NOT (q.id = ANY (p_exclude))
		 ORDER BY q.deadline_at LIMIT 1));
END;
$$;

-- How a call without a usable answer went, from the worker's kind of failure (src/http.c)
-- or the HTTP status and body of the answer: the text for error, whether it may succeed
-- later (retry), and whether this call may have made the agent run something
-- (maybe_sent; p_sent says whether any byte of the request was sent). An agent's URL that
-- cannot be called (kind url: a port outside 1-65535, which register_agent() took before
-- 1.9) fails the request at once, saying to register the agent again.
CREATE FUNCTION restart_worker.classify(p_kind text, p_http integer, p_answer jsonb,
	p_sent boolean, OUT reason text, OUT retry boolean, OUT maybe_sent boolean)
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_agent		text := restart_worker.agent_reason(p_answer);
BEGIN
	retry := false;
	maybe_sent := p_sent;
	IF p_kind = 'answer' THEN
		IF p_http = 429 OR p_http BETWEEN 500 AND 599 THEN
			reason := pg_catalog.format('the agent could not take the request: HTTP %s%s', p_http, v_agent);
			retry := true;
			-- The agent's own answers that say nothing ran.
			maybe_sent := NOT ((p_http = 429 AND p_answer ->> 'error' = 'too_many_jobs')
							   OR (p_http = 500 AND p_answer ->> 'error' = 'internal_error'))
						  OR v_agent = '';
		ELSIF p_http BETWEEN 400 AND 499 THEN
			reason := pg_catalog.format('agent refused the request: HTTP %s%s', p_http, v_agent);
			maybe_sent := false;
		ELSE
			reason := pg_catalog.format('invalid answer from the agent (HTTP %s)', p_http);
		END IF;
		RETURN;
	END IF;
	CASE p_kind
		WHEN 'connect' THEN
			reason := 'could not connect to the agent';
			retry := true;
			maybe_sent := false;
		WHEN 'timeout' THEN
			reason := 'timed out waiting for the agent';
			retry := true;
		WHEN 'network' THEN
			reason := 'the connection to the agent was lost';
			retry := true;
		WHEN 'prepare' THEN
			reason := 'could not prepare the call to the agent';
			retry := true;
			maybe_sent := false;
		WHEN 'tls' THEN
			reason := 'TLS verification of the agent failed';
			maybe_sent := false;
		WHEN 'too_large' THEN
			reason := 'invalid answer from the agent (larger than restart_worker.max_response_size)';
		WHEN 'unregistered' THEN
			reason := 'the service or its agent is no longer registered';
			maybe_sent := false;
		WHEN 'url' THEN
			-- Since 1.10: before, such a call failed as an invalid answer, or for port 0 as
			-- an agent that cannot be reached, tried again until the attempts ran out.
			reason := 'the agent''s URL is not usable: register the agent again (restart_worker.register_agent())';
			maybe_sent := false;
		ELSE
			reason := 'invalid answer from the agent';
	END CASE;
END;
$$;

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
CREATE FUNCTION restart_worker.worker_record_job(p_id uuid,
	p_status text, p_started_at timestamptz, p_finished_at timestamptz,
	p_exit_code integer, p_output text, p_error text, p_lease_ms integer,
	p_dispatched_at timestamptz, p_running_first boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
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
CREATE FUNCTION restart_worker.worker_record_jobs(p_ids uuid[],
	p_status text[], p_started_at timestamptz[], p_finished_at timestamptz[],
	p_exit_code integer[], p_output text[], p_error text[],
	p_dispatched_at timestamptz[], p_running_first boolean[], p_lease_ms integer)
RETURNS TABLE (n integer, action text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
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
CREATE FUNCTION restart_worker.worker_record(
	p_id uuid, p_kind text, p_http integer, p_body text, p_sent boolean,
	p_maybe_sent boolean, p_max_attempts integer, p_retry_base_ms integer,
	p_retry_max_ms integer, p_lease_ms integer, p_dispatched_at timestamptz,
	OUT action text, OUT next_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
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
	-- (The exponent is capped: a running request counts an attempt at every call that
	-- follows it, without limit, and 2 to the 1024th overflows.)
	v_delay := least(p_retry_max_ms,
					 p_retry_base_ms * power(2, least(greatest(v_row.attempts, 1) - 1, 30)));
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

-- Announce every status change on the channel restart_worker, payload
-- {"id": "<uuid>", "service_name": "<name>", "status": "<status>"}, so that a UI can follow
-- a request without polling (LISTEN restart_worker).
CREATE FUNCTION restart_worker.notify_status()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
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

-- Every status change but the claim's pending -> dispatching, which the worker announces
-- itself with worker_announce(), right after it sent the call: a transaction that
-- notifies holds a lock that serializes the commits of every notifying transaction of the
-- cluster until it has committed, and the calls wait for the claim's commit (which, before
-- the worker settled, or when the claim failed a request, includes a WAL flush).
CREATE TRIGGER notify_status_update
	AFTER UPDATE OF status ON public.service_restart_requests
	FOR EACH ROW
	WHEN (OLD.status IS DISTINCT FROM NEW.status
		  AND NOT (OLD.status = 'pending' AND NEW.status = 'dispatching'))
	EXECUTE FUNCTION restart_worker.notify_status();

-- Announce the requests the worker has just claimed (p_ids, pending before the claim)
-- with their status now (dispatching), the payload notify_status() gives; run by the
-- worker once their calls are sent, in the next transaction it commits (see
-- src/claim.c). PL/pgSQL for its kept plan (see worker_next_due()).
CREATE FUNCTION restart_worker.worker_announce(p_ids uuid[])
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM pg_catalog.pg_notify('restart_worker',
		pg_catalog.json_build_object('id', q.id, 'service_name', q.service_name,
									 'status', q.status)::pg_catalog.text)
	FROM public.service_restart_requests q
	WHERE q.id = ANY (p_ids);
END;
$$;

-- The worker's own view of itself, from shared memory.
CREATE FUNCTION restart_worker.worker_state(
	OUT pid integer, OUT state text, OUT started_at timestamptz,
	OUT last_wake timestamptz, OUT last_poll timestamptz, OUT in_flight integer,
	OUT commit_wakeups bigint, OUT wakeups bigint, OUT polls bigint, OUT claimed bigint,
	OUT calls bigint, OUT call_errors bigint, OUT retries bigint,
	OUT completed bigint, OUT failed bigint,
	OUT max_in_flight integer, OUT sockets integer, OUT max_sockets integer)
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'restart_worker_worker_state';

-- The worker at a glance: its pid (NULL if it is not running), what it is doing
-- (stopped, starting, waiting for extension, idle, busy), when it was last woken and
-- last looked at the queue, the queue depth (pending requests) and the active requests,
-- the calls in flight and counters since it started; the most calls in flight and the
-- sockets to agents (now and at most) since it started.
CREATE FUNCTION restart_worker.status(
	OUT pid integer, OUT state text, OUT started_at timestamptz,
	OUT last_wake timestamptz, OUT last_poll timestamptz,
	OUT queue_depth bigint, OUT active bigint, OUT in_flight integer,
	OUT commit_wakeups bigint, OUT wakeups bigint, OUT polls bigint, OUT claimed bigint,
	OUT calls bigint, OUT call_errors bigint, OUT retries bigint,
	OUT completed bigint, OUT failed bigint,
	OUT max_in_flight integer, OUT sockets integer, OUT max_sockets integer)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT w.pid, w.state, w.started_at, w.last_wake, w.last_poll,
		   (SELECT count(*) FROM public.service_restart_requests q WHERE q.status = 'pending'),
		   (SELECT count(*) FROM public.service_restart_requests q
			WHERE q.status IN ('pending', 'dispatching', 'running')),
		   w.in_flight, w.commit_wakeups, w.wakeups, w.polls, w.claimed,
		   w.calls, w.call_errors, w.retries, w.completed, w.failed,
		   w.max_in_flight, w.sockets, w.max_sockets
	FROM restart_worker.worker_state() w;
$$;
