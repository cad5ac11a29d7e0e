-- restart_worker 1.6 -> 1.7.
--
-- 1.7 closes three ways a request could go wrong. worker_claim() also returns accepted
-- (the agent accepted the request: dispatched_at), and the worker asks for such a job
-- (GET) instead of sending the request again, so that an agent that no longer knows the
-- id answers 404 instead of running the steps again. register_service() refuses to move a
-- service with a request in dispatching or running to another agent, which would not
-- know the id either. worker_record() caps the exponent of its backoff, which overflowed
-- after about a thousand attempts of a running request. The tables and their rows are
-- unchanged. The definitions below are those of src/sql/30_admin.sql and
-- src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.7'" to load this file. \quit

DROP FUNCTION restart_worker.worker_claim(integer, uuid[], integer, boolean);

-- Claim up to p_limit due requests for the worker, except those it has in flight
-- (p_exclude): pending ones become dispatching, dispatching ones due for another attempt
-- and running ones due again (a call following the job failed, or their lease expired)
-- are taken again; each counts one attempt more. After a
-- restart (p_recover) every dispatching or running request is taken over at once: it is
-- driven on with the same id, and the agent answers with the existing job. Requests past
-- their deadline fail. Rows locked by someone else are skipped, never waited for.
-- maybe_sent says whether an earlier call may have reached the agent (the row was not
-- pending); accepted (since 1.7) whether the agent accepted it (dispatched_at): the worker
-- then asks for its job (GET) instead of sending the request again, so that an agent that
-- no longer knows the id (its journal lost, the job pruned) answers 404 instead of running
-- the steps again. The worker keeps what it has in flight in memory; the lease only
-- matters if it forgets a request.
--
-- Its plans are made once (plan_cache_mode), as a plan for any arguments: planning at
-- every call costs more than a claim of a few requests, and a plan kept by default after
-- a few calls must not depend on them either. So the due requests are read through their
-- partial index up to a time (now, or after a restart the end of time; with the restart's
-- case OR-ed into the condition, as before 1.4, the kept plan had no range on that index and
-- read every active request), and the rows claimed or failed are updated through the
-- primary key, by their ids as an array (joined to the rows found, the planner may scan the
-- whole table for a few rows in a session that allows it; the worker's does not, see
-- src/worker.c).
CREATE FUNCTION restart_worker.worker_claim(
	p_limit integer, p_exclude uuid[], p_lease_ms integer, p_recover boolean)
RETURNS TABLE (id uuid, url text, key bytea, body text, deadline_at timestamptz,
			   maybe_sent boolean, accepted boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
	v_until		timestamptz := CASE WHEN p_recover THEN 'infinity' ELSE pg_catalog.now() END;
	v_ids		uuid[];
	v_sent		boolean[];
BEGIN
	-- Requests past their deadline are rare: look for one before running the update.
	IF EXISTS (SELECT FROM public.service_restart_requests q
			   WHERE q.status IN ('pending', 'dispatching', 'running')
				 AND q.deadline_at <= pg_catalog.now()) THEN
		-- Claims commit asynchronously (src/settle.c); an end the agent's journal does not
		-- hold must not be lost in a crash, or the request could come back and run after
		-- it was announced failed: a claim that failed a request commits synchronously.
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
			WHERE r.id = ANY (ARRAY(SELECT late.id FROM late));
		IF FOUND THEN
			PERFORM pg_catalog.set_config('synchronous_commit', 'on', true);
		END IF;
	END IF;

	WITH due AS (
		SELECT q.id, q.status AS old_status FROM public.service_restart_requests q
		WHERE q.status IN ('pending', 'dispatching', 'running')
		  AND q.next_attempt_at <= v_until
		  -- pending ones once due, also after a restart
		  AND (q.status <> 'pending' OR q.next_attempt_at <= pg_catalog.now())
		  -- what the worker has in flight is never pending
		  AND (q.status = 'pending' OR NOT (q.id = ANY (p_exclude)))
		ORDER BY q.next_attempt_at
		LIMIT p_limit
		FOR UPDATE SKIP LOCKED),
	claimed AS (
		UPDATE public.service_restart_requests q
			SET status = CASE WHEN q.status = 'pending' THEN 'dispatching' ELSE q.status END,
				-- every call made again counts, also one following a running job after
				-- a failure, so that the delay before the next grows (worker_record())
				attempts = q.attempts + 1,
				next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_ms / 1000.0),
				updated_at = pg_catalog.now()
			WHERE q.id = ANY (ARRAY(SELECT due.id FROM due))
			RETURNING q.id)
	SELECT pg_catalog.array_agg(c.id), pg_catalog.array_agg(d.old_status <> 'pending')
		INTO v_ids, v_sent
	FROM claimed c
	JOIN due d ON d.id = c.id;

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


-- worker_claim() was made again (its result has a column more): its privileges are those
-- 90_privileges.sql gives every function of the schema, none for PUBLIC or anyone else a
-- default privilege may have granted it, EXECUTE for whoever may execute
-- worker_next_due() (the roles given restart_worker.grant_admin()). pg_dump leaves such a
-- grant out (it takes it for part of the extension): after restoring a dump of a database
-- updated to 1.7, run grant_admin() again (README).
DO $$
DECLARE
	v_grantee	pg_catalog.text;
BEGIN
	REVOKE ALL ON FUNCTION restart_worker.worker_claim(integer, uuid[], integer, boolean) FROM PUBLIC;
	FOR v_grantee IN
		SELECT a.grantee::pg_catalog.regrole::pg_catalog.text
		FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
		WHERE p.oid = 'restart_worker.worker_claim(integer, uuid[], integer, boolean)'::pg_catalog.regprocedure
		  AND a.grantee <> p.proowner AND a.grantee <> 0
	LOOP
		EXECUTE pg_catalog.format(
			'REVOKE ALL ON FUNCTION restart_worker.worker_claim(integer, uuid[], integer, boolean) FROM %s',
			v_grantee);
	END LOOP;
	FOR v_grantee IN
		SELECT a.grantee::pg_catalog.regrole::pg_catalog.text
		FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
		WHERE p.oid = 'restart_worker.worker_next_due(uuid[])'::pg_catalog.regprocedure
		  AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
	LOOP
		EXECUTE pg_catalog.format(
			'GRANT EXECUTE ON FUNCTION restart_worker.worker_claim(integer, uuid[], integer, boolean) TO %s',
			v_grantee);
	END LOOP;
END;
$$;

-- Add a service, or change an existing one. Optional arguments left NULL keep the current
-- value (or take the default for a new service).
CREATE OR REPLACE FUNCTION restart_worker.register_service(
	p_name text,
	p_agent text,
	p_cooldown interval DEFAULT '5 minutes',
	p_description text DEFAULT NULL,
	p_deadline interval DEFAULT NULL,
	p_max_attempts integer DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
	v_status	text;
	v_due		timestamptz;
BEGIN
	PERFORM restart_worker.check_name(p_name, 'service name');
	PERFORM restart_worker.check_name(p_agent, 'agent name');
	PERFORM restart_worker.require(p_cooldown, 'cooldown');
	IF p_cooldown < interval '0' THEN
		RAISE EXCEPTION 'cooldown must not be negative' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF p_deadline <= interval '0' THEN
		RAISE EXCEPTION 'deadline must be positive' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF p_max_attempts NOT BETWEEN 1 AND 100 THEN
		RAISE EXCEPTION 'max_attempts must be between 1 and 100' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	PERFORM 1 FROM restart_worker.agents WHERE name = p_agent;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown agent "%"', p_agent
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Register it first with restart_worker.register_agent().';
	END IF;
	-- A request that may have reached the service's agent goes on with the same id at
	-- whatever agent the service has then, which would not know it: sent again, it would run
	-- again; asked for, it would fail. So the agent does not change while a request is
	-- dispatching or running, or pending but due before the worker settled what a crash
	-- may have lost of its claims (see cancel()). The service's row lock orders this
	-- against new requests, the locks on the active requests against claims: a claim
	-- skips a row locked here, and one that holds a row makes this wait and see it
	-- dispatching.
	PERFORM 1 FROM restart_worker.services s
		WHERE s.name = p_name AND s.agent <> p_agent
		FOR UPDATE;
	IF FOUND THEN
		FOR v_status, v_due IN
			SELECT q.status, q.next_attempt_at FROM public.service_restart_requests q
			WHERE q.service_name = p_name AND q.status IN ('pending', 'dispatching', 'running')
			FOR UPDATE
		LOOP
			IF v_status <> 'pending' OR v_due <= restart_worker.worker_unsettled_before() THEN
				RAISE EXCEPTION 'service "%" has a request its agent may be running', p_name
					USING ERRCODE = 'object_not_in_prerequisite_state',
						  HINT = 'Change its agent once the request has ended.';
			END IF;
		END LOOP;
	END IF;
	INSERT INTO restart_worker.services AS s
		(name, agent, cooldown, description, deadline, max_attempts)
	VALUES (p_name, p_agent, p_cooldown, coalesce(p_description, ''),
			coalesce(p_deadline, interval '15 minutes'), p_max_attempts)
	ON CONFLICT (name) DO UPDATE
		SET agent = excluded.agent,
			cooldown = excluded.cooldown,
			description = coalesce(p_description, s.description),
			deadline = coalesce(p_deadline, s.deadline),
			max_attempts = coalesce(p_max_attempts, s.max_attempts),
			updated_at = now();
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
