-- restart_worker 1.10 -> 1.11.
--
-- 1.11 mends two things. register_agent() took an http or https URL that libcurl refuses,
-- a bracketed host that is not an IPv6 address ('http://[10.0.0.5]:8787',
-- 'http://[::1.2]:80'), and every call to that agent then failed at once (the agent's URL
-- is not usable). Its check (check_url()) now asks libcurl too, through the new C function
-- curl_url_usable(), the judgement the worker makes before each call (src/http.c). The
-- table's CHECK (valid_agent_url()) is unchanged, so that a dump with such rows made
-- before restores. register_service() and prune_requests() failed with 22008 "timestamp
-- out of range" for an interval of thousands of years (now() plus or minus it out of the
-- range of timestamptz), and register_service() took a cooldown of more than about 6,700
-- years, which every request of the service then failed on: they now refuse such an
-- interval with 22023 naming the argument, through the new reach_from_now(). The tables
-- and their rows are unchanged. The definitions below are those of src/sql/30_admin.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.11'" to load this file. \quit

-- Whether libcurl takes an http or https agent URL: its URL parser takes it and the port
-- is not 0, the test the worker makes before each call (src/http.c). False for a unix: URL,
-- which is not libcurl's. STABLE, not IMMUTABLE: the answer is the libcurl build's, which
-- an update of the server's packages can change.
CREATE FUNCTION restart_worker.curl_url_usable(p_url text)
RETURNS boolean
LANGUAGE c STABLE STRICT
AS 'MODULE_PATHNAME', 'restart_worker_curl_url_usable';

-- Check an agent URL; raise 22023 if it is not usable. Since 1.11 an http or https URL
-- must be one libcurl takes too, as the worker judges it: the pattern of valid_agent_url()
-- let through a bracketed host that is not an IPv6 address ('http://[10.0.0.5]:8787',
-- 'http://[::1.2]:8787'), and every call to such an agent failed at once. The table's
-- CHECK keeps the pattern alone, so that rows made before restore from a dump.
CREATE OR REPLACE FUNCTION restart_worker.check_url(p_url text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM restart_worker.require(p_url, 'agent URL');
	IF NOT restart_worker.valid_agent_url(p_url)
		OR (p_url ~ '^https?:' AND NOT restart_worker.curl_url_usable(p_url)) THEN
		RAISE EXCEPTION 'agent URL "%" is not usable', p_url
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Use http://host:port, https://host:port (optionally with a path) or unix:/absolute/socket/path.';
	END IF;
END;
$$;

-- The time p_span reaches from now: now() + p_span, or now() - p_span with p_back; NULL if
-- that is outside the range of timestamptz (4713 BC to 294276 AD), where the arithmetic
-- fails with 22008 "timestamp out of range". For the checks of the admin functions'
-- intervals (since 1.11), so that an interval of thousands of years is refused with 22023
-- naming the argument, not 22008 from inside the function (or, for a cooldown that only
-- now() - cooldown took out of range, from every later request of the service).
CREATE FUNCTION restart_worker.reach_from_now(p_span interval, p_back boolean)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF p_back THEN
		RETURN pg_catalog.now() - p_span;
	END IF;
	RETURN pg_catalog.now() + p_span;
EXCEPTION
	WHEN datetime_field_overflow THEN
		RETURN NULL;
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
	v_reach		pg_catalog.timestamptz;
BEGIN
	PERFORM restart_worker.check_name(p_name, 'service name');
	PERFORM restart_worker.check_name(p_agent, 'agent name');
	PERFORM restart_worker.require(p_cooldown, 'cooldown');
	-- On the times they reach from now, not as intervals: an interval comparison counts a
	-- month as 30 days and a year as 360, so '-1 year 360 days 1 second' compared as
	-- positive, and every request was born past its deadline (before 1.9). A time out of
	-- the range of timestamptz (reach_from_now() NULL) is judged by its length in seconds
	-- (EXTRACT, syntax for pg_catalog.extract()), a year 365.25 days: an interval that goes
	-- that far is thousands of years long, and no approximation changes its sign. Since
	-- 1.11 such a cooldown or deadline is refused (22023), and so is a cooldown that
	-- requests cannot look back over (request_service_restart() and prune_requests() take
	-- now() - cooldown): before, 22008 "timestamp out of range" came from here, or for a
	-- cooldown of more than about 6,700 years (now() - cooldown before 4713 BC) from every
	-- request of the service.
	v_reach := restart_worker.reach_from_now(p_cooldown, false);
	IF v_reach < pg_catalog.now()
		OR (v_reach IS NULL AND EXTRACT(epoch FROM p_cooldown) < 0) THEN
		RAISE EXCEPTION 'cooldown must not be negative' USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF v_reach IS NULL OR restart_worker.reach_from_now(p_cooldown, true) IS NULL THEN
		RAISE EXCEPTION 'cooldown "%" is too long', p_cooldown
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'A request looks back over the cooldown: now minus the cooldown must be no earlier than 4713 BC.';
	END IF;
	IF p_deadline IS NOT NULL THEN
		v_reach := restart_worker.reach_from_now(p_deadline, false);
		IF v_reach <= pg_catalog.now()
			OR (v_reach IS NULL AND EXTRACT(epoch FROM p_deadline) <= 0) THEN
			RAISE EXCEPTION 'deadline must be positive' USING ERRCODE = 'invalid_parameter_value';
		END IF;
		IF v_reach IS NULL THEN
			RAISE EXCEPTION 'deadline "%" is too long', p_deadline
				USING ERRCODE = 'invalid_parameter_value',
					  HINT = 'A request''s deadline is its time plus this: now plus the deadline must be no later than 294276 AD.';
		END IF;
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

-- Delete finished requests older than the given age, keeping any that still holds a
-- service's cooldown; returns how many were deleted. The limit of a day is checked on the
-- time the age reaches back to, not on the interval itself: an interval compares a year
-- as 360 days, while now() - '-1 year 362 days' is in the future (1.7 and before deleted
-- every finished request so). An age that reaches out of the range of timestamptz is
-- refused with 22023 (since 1.11; before, 22008 "timestamp out of range"): one that goes
-- back past 4713 BC as too long, one that goes forward past 294276 AD as younger than a day
-- (judged by its length in seconds, as in register_service()).
CREATE OR REPLACE FUNCTION restart_worker.prune_requests(p_older_than interval DEFAULT '90 days')
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_count		bigint;
	v_before	pg_catalog.timestamptz;
BEGIN
	PERFORM restart_worker.require(p_older_than, 'age');
	v_before := restart_worker.reach_from_now(p_older_than, true);
	IF v_before > now() - interval '1 day'
		OR (v_before IS NULL AND EXTRACT(epoch FROM p_older_than) < 0) THEN
		RAISE EXCEPTION 'refusing to prune requests younger than a day'
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF v_before IS NULL THEN
		RAISE EXCEPTION 'age "%" is too long', p_older_than
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'Requests older than the age are deleted: now minus the age must be no earlier than 4713 BC.';
	END IF;
	DELETE FROM public.service_restart_requests
		WHERE status IN ('completed', 'failed', 'cancelled')
		  AND requested_at < v_before
		  AND NOT EXISTS (SELECT 1 FROM restart_worker.services s
						  WHERE s.name = service_name
							AND requested_at > now() - s.cooldown);
	GET DIAGNOSTICS v_count = ROW_COUNT;
	RETURN v_count;
END;
$$;

-- The privileges of the new functions, as 90_privileges.sql gives every function of the
-- schema: none for PUBLIC or anyone else a default privilege may have granted them,
-- EXECUTE for whoever may execute register_agent() (the roles given
-- restart_worker.grant_admin()). The admin functions do not need the grant: they run
-- these as their owner.
DO $$
DECLARE
	v_function	pg_catalog.regprocedure;
	v_grantee	pg_catalog.text;
BEGIN
	FOREACH v_function IN ARRAY ARRAY['restart_worker.curl_url_usable(text)',
									  'restart_worker.reach_from_now(interval, boolean)']::pg_catalog.regprocedure[]
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
			WHERE p.oid = 'restart_worker.register_agent(text, text, text)'::pg_catalog.regprocedure
			  AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
		LOOP
			EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s', v_function, v_grantee);
		END LOOP;
	END LOOP;
END;
$$;
