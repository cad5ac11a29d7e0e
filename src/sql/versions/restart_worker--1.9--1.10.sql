-- restart_worker 1.9 -> 1.10.
--
-- 1.10 mends three things. worker_claim(): a request past its deadline that the claim
-- could not fail because someone held its row (a cancel, register_service()) could be
-- free again a moment later, when the same claim took the due requests, which had no
-- deadline condition: it was sent to its agent with no time left (a call of about a
-- millisecond). Now only the requests the agent accepted are taken past their deadline,
-- for their last look; the next claim fails the others. remove_agent() and
-- register_service() at the same time for the same agent could end in a foreign key
-- violation (23503) instead of the documented errors: each now locks the agent's row
-- before looking at it (remove_agent() then sees the new service, 2BP01;
-- register_service() the agent gone, 22023). classify() knows the worker's failure kind
-- url: a call to an agent whose URL cannot be called (a port outside 1-65535, registered
-- before 1.9) fails at once, saying to register the agent again, where it failed as an
-- invalid answer (or, for port 0, was tried again as an agent that cannot be reached).
-- worker_next_due() no longer counts the deadline of a request its agent accepted, which
-- a claim takes only once its lease has run out: past such a deadline the worker claimed
-- once a second, finding nothing, until the lease ended. The tables and their rows are
-- unchanged. The definitions below are those of
-- src/sql/30_admin.sql and src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.10'" to load this file. \quit

-- Remove an agent that no service uses any more. The agent's row is locked before the
-- services are looked at (since 1.10), against register_service(), which locks it too:
-- one that gave the agent a service and has not committed yet is waited for, and its
-- service seen (2BP01), where the delete found it only in the foreign key's check (23503);
-- with a transaction-wide snapshot, which cannot see that service, it fails to serialise
-- (40001).
CREATE OR REPLACE FUNCTION restart_worker.remove_agent(p_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_services	pg_catalog.text;
BEGIN
	PERFORM restart_worker.check_name(p_name, 'agent name');
	PERFORM 1 FROM restart_worker.agents WHERE name = p_name FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown agent "%"', p_name USING ERRCODE = 'invalid_parameter_value';
	END IF;
	SELECT string_agg(name, ', ' ORDER BY name) INTO v_services
		FROM restart_worker.services WHERE agent = p_name;
	IF v_services IS NOT NULL THEN
		RAISE EXCEPTION 'agent "%" still serves services: %', p_name, v_services
			USING ERRCODE = 'dependent_objects_still_exist',
				  HINT = 'Remove those services or register them with another agent first.';
	END IF;
	-- With a transaction-wide snapshot (REPEATABLE READ, SERIALIZABLE) the look above
	-- cannot see a service that a register_service() this removal waited for committed;
	-- the delete's foreign key check finds it: that is a failure to serialise.
	BEGIN
		DELETE FROM restart_worker.agents WHERE name = p_name;
	EXCEPTION
		WHEN foreign_key_violation THEN
			RAISE EXCEPTION 'could not serialize access: agent "%" was given a service after this transaction began', p_name
				USING ERRCODE = 'serialization_failure',
					  HINT = 'Retry the transaction.';
	END;
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_status	pg_catalog.text;
	v_due		pg_catalog.timestamptz;
BEGIN
	PERFORM restart_worker.check_name(p_name, 'service name');
	PERFORM restart_worker.check_name(p_agent, 'agent name');
	PERFORM restart_worker.require(p_cooldown, 'cooldown');
	-- On the times they reach from now, not as intervals: an interval comparison counts a
	-- month as 30 days and a year as 360, so '-1 year 360 days 1 second' compared as
	-- positive, and every request was born past its deadline (before 1.9).
	IF pg_catalog.now() + p_cooldown < pg_catalog.now() THEN
		RAISE EXCEPTION 'cooldown must not be negative' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF pg_catalog.now() + p_deadline <= pg_catalog.now() THEN
		RAISE EXCEPTION 'deadline must be positive' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF p_max_attempts NOT BETWEEN 1 AND 100 THEN
		RAISE EXCEPTION 'max_attempts must be between 1 and 100' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	-- Locked until the end (since 1.10), against remove_agent(): one that is removing the
	-- agent is waited for, and the agent then is unknown (22023), where the insert found it
	-- gone only in the foreign key's check (23503); see remove_agent() for the other order.
	PERFORM 1 FROM restart_worker.agents WHERE name = p_agent FOR KEY SHARE;
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
-- src/worker.c).
CREATE OR REPLACE FUNCTION restart_worker.worker_claim(
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
		WITH late AS (
			SELECT q.id FROM public.service_restart_requests q
			WHERE q.status IN ('pending', 'dispatching', 'running')
			  AND q.deadline_at <= pg_catalog.now()
			  AND NOT (q.id = ANY (v_exclude))
			  -- with a slot to call from, accepted ones wait for their look
			  AND (p_limit = 0 OR q.dispatched_at IS NULL)
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
		  -- what the worker has in flight (or looks at, above) is never pending
		  AND (q.status = 'pending' OR NOT (q.id = ANY (v_exclude)))
		  -- none past its deadline: one that late skipped (see above) waits for the next
		  -- claim to fail it
		  AND q.deadline_at > pg_catalog.now()
		ORDER BY q.next_attempt_at
		LIMIT p_limit - pg_catalog.cardinality(v_look)
		FOR UPDATE SKIP LOCKED),
	claimed AS (
		UPDATE public.service_restart_requests q
			SET status = CASE WHEN q.status = 'pending' THEN 'dispatching' ELSE q.status END,
				-- every call made again counts, also one following a running job after
				-- a failure, so that the delay before the next grows (worker_record())
				attempts = q.attempts + 1,
				next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_ms / 1000.0),
				updated_at = pg_catalog.now()
			WHERE q.id = ANY (ARRAY(SELECT due.id FROM due) || v_look)
			RETURNING q.id)
	SELECT pg_catalog.array_agg(c.id), pg_catalog.array_agg(coalesce(d.old_status <> 'pending', true))
		INTO v_ids, v_sent
	FROM claimed c
	LEFT JOIN due d ON d.id = c.id;

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

-- How a call without a usable answer went, from the worker's kind of failure (src/http.c)
-- or the HTTP status and body of the answer: the text for error, whether it may succeed
-- later (retry), and whether this call may have made the agent run something
-- (maybe_sent; p_sent says whether any byte of the request was sent). An agent's URL that
-- cannot be called (kind url: a port outside 1-65535, which register_agent() took before
-- 1.9) fails the request at once, saying to register the agent again.
CREATE OR REPLACE FUNCTION restart_worker.classify(p_kind text, p_http integer, p_answer jsonb,
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

-- When the worker next has something to do for requests it does not have in flight:
-- the earliest due attempt or deadline, or NULL if there is none. The deadline of a
-- request its agent accepted does not count (since 1.10): a claim takes such a request
-- only once its lease has run out, also past its deadline (for a last look), so waking at
-- the deadline found nothing to do, and the worker claimed again once a second until the
-- lease ended. PL/pgSQL rather than a SQL-standard body: its subqueries keep such a
-- function from being inlined, and a function that is not inlined is planned again at
-- every call; PL/pgSQL keeps the plan.
CREATE OR REPLACE FUNCTION restart_worker.worker_next_due(p_exclude uuid[])
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
