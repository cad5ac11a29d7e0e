-- Administration of the registry and of requests. These functions live in the private
-- schema and may be executed only by superusers and the roles given grant_admin().

-- Raise 22004 for a NULL argument of an admin function.
CREATE FUNCTION restart_worker.require(p_value anyelement, p_what text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF p_value IS NULL THEN
		RAISE EXCEPTION '% must not be null', p_what
			USING ERRCODE = 'null_value_not_allowed';
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

-- Check a name for an agent or service; raise 22023 if it is malformed.
CREATE FUNCTION restart_worker.check_name(p_name text, p_what text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM restart_worker.require(p_name, p_what);
	IF NOT restart_worker.valid_name(p_name) THEN
		RAISE EXCEPTION '% "%" is malformed', p_what, p_name
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'A name is 1 to 63 characters: a letter or digit, then letters, digits, "_", "." or "-".';
	END IF;
END;
$$;

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
CREATE FUNCTION restart_worker.check_url(p_url text)
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

-- Check a signing secret; raise 22023 if it is not in the Standard Webhooks form.
CREATE FUNCTION restart_worker.check_secret(p_secret text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM restart_worker.require(p_secret, 'agent secret');
	IF NOT restart_worker.valid_secret(p_secret) THEN
		RAISE EXCEPTION 'agent secret is not in the form whsec_<base64>'
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'The part after "whsec_" must be base64 of 24 to 64 random bytes, e.g. whsec_$(openssl rand -base64 32).';
	END IF;
END;
$$;

-- Add an agent, or change the URL and secret of an existing one.
CREATE FUNCTION restart_worker.register_agent(p_name text, p_url text, p_secret text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM restart_worker.check_name(p_name, 'agent name');
	PERFORM restart_worker.check_url(p_url);
	PERFORM restart_worker.check_secret(p_secret);
	INSERT INTO restart_worker.agents AS a (name, url, secret)
	VALUES (p_name, p_url, p_secret)
	ON CONFLICT (name) DO UPDATE
		SET url = excluded.url, secret = excluded.secret, updated_at = now();
END;
$$;

-- Replace the signing secret of an agent. Configure the new secret on the agent first
-- (it accepts several), rotate here, then remove the old one from the agent.
CREATE FUNCTION restart_worker.rotate_agent_secret(p_name text, p_secret text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM restart_worker.check_name(p_name, 'agent name');
	PERFORM restart_worker.check_secret(p_secret);
	UPDATE restart_worker.agents SET secret = p_secret, updated_at = now()
		WHERE name = p_name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown agent "%"', p_name USING ERRCODE = 'invalid_parameter_value';
	END IF;
END;
$$;

-- Remove an agent that no service uses any more. The agent's row is locked before the
-- services are looked at (since 1.10), against register_service(), which locks it too:
-- one that gave the agent a service and has not committed yet is waited for, and its
-- service seen (2BP01), where the delete found it only in the foreign key's check (23503);
-- with a transaction-wide snapshot, which cannot see that service, it fails to serialise
-- (40001).
CREATE FUNCTION restart_worker.remove_agent(p_name text)
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
CREATE FUNCTION restart_worker.register_service(
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

-- Enable or disable a service; a disabled service refuses new requests.
CREATE FUNCTION restart_worker.set_service_enabled(p_name text, p_enabled boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM restart_worker.check_name(p_name, 'service name');
	PERFORM restart_worker.require(p_enabled, 'enabled');
	UPDATE restart_worker.services SET enabled = p_enabled, updated_at = now()
		WHERE name = p_name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown service "%"', p_name USING ERRCODE = 'invalid_parameter_value';
	END IF;
END;
$$;

-- Remove a service from the registry. Its request history stays; an active request
-- must end (or be cancelled) first.
CREATE FUNCTION restart_worker.remove_service(p_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM restart_worker.check_name(p_name, 'service name');
	PERFORM 1 FROM restart_worker.services WHERE name = p_name FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown service "%"', p_name USING ERRCODE = 'invalid_parameter_value';
	END IF;
	PERFORM 1 FROM public.service_restart_requests
		WHERE service_name = p_name AND status IN ('pending', 'dispatching', 'running');
	IF FOUND THEN
		RAISE EXCEPTION 'service "%" has an active restart request', p_name
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  HINT = 'Wait for it to end, or cancel it if it is still pending.';
	END IF;
	DELETE FROM restart_worker.services WHERE name = p_name;
END;
$$;

-- Cancel a request that has not reached its agent yet. Shared by the admin and the user
-- variant; p_only_by restricts it to the requests of one user.
CREATE FUNCTION restart_worker.cancel(p_id uuid, p_only_by uuid, p_who text)
RETURNS public.service_restart_requests
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_row		public.service_restart_requests;
BEGIN
	PERFORM restart_worker.require(p_id, 'request id');
	SELECT * INTO v_row FROM public.service_restart_requests
		WHERE id = p_id AND (p_only_by IS NULL OR requested_by = p_only_by)
		FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown request %', p_id USING ERRCODE = 'invalid_parameter_value';
	ELSIF v_row.status <> 'pending' THEN
		RAISE EXCEPTION 'request % is %; only a pending request can be cancelled', p_id, v_row.status
			USING ERRCODE = 'object_not_in_prerequisite_state';
	ELSIF v_row.next_attempt_at <= restart_worker.worker_unsettled_before() THEN
		-- A claim lost in a crash leaves its request pending (worker_settle()).
		RAISE EXCEPTION 'request % cannot be cancelled yet: it may have reached its agent before the server restarted', p_id
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  DETAIL = 'The background worker has not yet checked the requests left pending from before the server started.',
				  HINT = 'The worker does so as soon as it runs; a request that may have reached its agent cannot be cancelled.';
	END IF;
	UPDATE public.service_restart_requests
		SET status = 'cancelled', completed_at = now(), updated_at = now(),
			error = 'cancelled by ' || p_who
		WHERE id = p_id
		RETURNING * INTO v_row;
	RETURN v_row;
END;
$$;

-- Cancel any pending request (admin).
CREATE FUNCTION restart_worker.cancel_request(p_id uuid)
RETURNS public.service_restart_requests
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
RETURN restart_worker.cancel(p_id, NULL,
	(SELECT c.db_role FROM restart_worker.caller() c));

-- Cancel one of the caller's own pending requests (users, through PostgREST).
CREATE FUNCTION public.cancel_service_restart(p_request_id uuid)
RETURNS public.service_restart_requests
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_caller	pg_catalog.record;
BEGIN
	v_caller := restart_worker.caller();
	IF v_caller.db_role = 'anon' OR v_caller.jwt_role = 'anon' THEN
		RAISE EXCEPTION 'anonymous users may not cancel restarts'
			USING ERRCODE = 'insufficient_privilege';
	END IF;
	IF v_caller.sub IS NULL
		OR v_caller.sub !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
		RAISE EXCEPTION 'cancelling needs a user id (JWT claim "sub")'
			USING ERRCODE = 'insufficient_privilege';
	END IF;
	RETURN restart_worker.cancel(p_request_id, v_caller.sub::pg_catalog.uuid, 'user ' || v_caller.sub);
END;
$$;
COMMENT ON FUNCTION public.cancel_service_restart(uuid) IS
	'Cancel one of your own requests while it is still pending. Errors: 22004, 22023, 42501, 55000.';

-- Delete finished requests older than the given age, keeping any that still holds a
-- service's cooldown; returns how many were deleted. The limit of a day is checked on the
-- time the age reaches back to, not on the interval itself: an interval compares a year
-- as 360 days, while now() - '-1 year 362 days' is in the future (1.7 and before deleted
-- every finished request so). An age that reaches out of the range of timestamptz is
-- refused with 22023 (since 1.11; before, 22008 "timestamp out of range"): one that goes
-- back past 4713 BC as too long, one that goes forward past 294276 AD as younger than a day
-- (judged by its length in seconds, as in register_service()).
CREATE FUNCTION restart_worker.prune_requests(p_older_than interval DEFAULT '90 days')
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
