-- restart_worker 1.11 -> 1.12.
--
-- 1.12 mends the claim of a worker whose role is no superuser (restart_worker.role, made
-- an admin with grant_admin()). worker_claim() updated the rows it claimed through the
-- condition id = ANY (ARRAY(SELECT ...) of the rows it had locked || the ids it looks at
-- again). Row level security applies to such a role, and under it that condition could
-- not use the primary key: every claim scanned the whole requests table, and in the
-- worker's session (enable_seqscan off) the plan's cost made PostgreSQL compile it with
-- JIT at each run, about a second of CPU a claim on a 2-core machine. The ids are now
-- gathered into variables first (for the update of the requests past their deadline too,
-- whose bare ARRAY(SELECT ...) used the index already). The tables, their rows and the
-- function's privileges are unchanged. The definition below is that of
-- src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.12'" to load this file. \quit

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
