-- restart_worker 1.0: request restarts of services on other hosts.
--
-- This script is assembled by the Makefile from src/sql/*.sql, one file per concern:
-- schema and tables, the public request API, the registry administration, the wake-up
-- trigger, privileges.
--
-- Every plpgsql function and every SECURITY DEFINER function pins search_path = ''. A
-- function with an SQL-standard body (RETURN ..., BEGIN ATOMIC) is bound to the objects it
-- names when it is created, so the search path at call time does not matter to it; it
-- pins nothing, which lets the planner inline the small ones (a name's CHECK runs at every
-- request).

\echo Use "CREATE EXTENSION restart_worker" to load this file. \quit

CREATE SCHEMA restart_worker;
COMMENT ON SCHEMA restart_worker IS
	'Private to restart_worker: agent and service registry, admin functions. Never expose it through PostgREST.';
REVOKE ALL ON SCHEMA restart_worker FROM PUBLIC;
-- Tables: the registry (private) and the requests (public, behind row level security).

-- A name of an agent or a service: a letter or digit, then letters, digits, '_', '.', '-'.
CREATE FUNCTION restart_worker.valid_name(p_name text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_name IS NOT NULL
	AND length(p_name) BETWEEN 1 AND 63
	AND p_name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]*$';

-- An agent URL: http(s)://host[:port][/path] with no user info, query or fragment, or
-- unix:/absolute/path for HTTP over a local socket.
CREATE FUNCTION restart_worker.valid_agent_url(p_url text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_url IS NOT NULL
	AND length(p_url) <= 2048
	AND (p_url ~ '^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:[0-9]{1,5})?(/[A-Za-z0-9._~/%-]*)?$'
		 OR p_url ~ '^unix:/[A-Za-z0-9._~/-]+$');

-- A signing secret in the Standard Webhooks form: whsec_ then base64 of 24 to 64 bytes.
CREATE FUNCTION restart_worker.valid_secret(p_secret text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = ''
AS $$
BEGIN
	IF p_secret IS NULL OR p_secret !~ '^whsec_[A-Za-z0-9+/]+={0,2}$' THEN
		RETURN false;
	END IF;
	RETURN length(decode(substr(p_secret, 7), 'base64')) BETWEEN 24 AND 64;
EXCEPTION
	WHEN invalid_parameter_value THEN
		RETURN false;
END;
$$;

CREATE TABLE restart_worker.agents (
	name		text PRIMARY KEY CHECK (restart_worker.valid_name(name)),
	url			text NOT NULL CHECK (restart_worker.valid_agent_url(url)),
	secret		text NOT NULL CHECK (restart_worker.valid_secret(secret)),
	created_at	timestamptz NOT NULL DEFAULT now(),
	updated_at	timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE restart_worker.agents IS
	'One restart agent per target host: where it listens and the secret calls to it are signed with.';

CREATE TABLE restart_worker.services (
	name		text PRIMARY KEY CHECK (restart_worker.valid_name(name)),
	agent		text NOT NULL REFERENCES restart_worker.agents (name) ON UPDATE CASCADE,
	cooldown	interval NOT NULL DEFAULT '5 minutes' CHECK (cooldown >= '0'),
	enabled		boolean NOT NULL DEFAULT true,
	deadline	interval NOT NULL DEFAULT '15 minutes' CHECK (deadline > '0'),
	max_attempts integer CHECK (max_attempts BETWEEN 1 AND 100),
	description text NOT NULL DEFAULT '',
	last_requested_at timestamptz,
	created_at	timestamptz NOT NULL DEFAULT now(),
	updated_at	timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE restart_worker.services IS
	'Services that may be restarted, the agent that restarts each, and its limits.';
COMMENT ON COLUMN restart_worker.services.max_attempts IS
	'Calls to the agent before the request fails; NULL means the GUC restart_worker.max_attempts.';
COMMENT ON COLUMN restart_worker.services.last_requested_at IS
	'When the latest request was accepted; written with every request so that concurrent callers conflict on this row.';
COMMENT ON COLUMN restart_worker.services.deadline IS
	'Time from the request to its end; a request past it fails with "timed out".';

CREATE TABLE public.service_restart_requests (
	id			uuid PRIMARY KEY DEFAULT gen_random_uuid(),
	service_name text NOT NULL,
	status		text NOT NULL DEFAULT 'pending'
		CHECK (status IN ('pending', 'dispatching', 'running', 'completed', 'failed', 'cancelled')),
	requested_by uuid,
	requested_by_role text NOT NULL,
	requested_at timestamptz NOT NULL DEFAULT now(),
	dispatched_at timestamptz,
	uncertain_at timestamptz,
	started_at	timestamptz,
	completed_at timestamptz,
	attempts	integer NOT NULL DEFAULT 0,
	exit_code	integer,
	output		text,
	error		text,
	next_attempt_at timestamptz NOT NULL DEFAULT now(),
	deadline_at timestamptz NOT NULL,
	updated_at	timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE public.service_restart_requests IS
	'Every restart request and what became of it: the audit trail. Written only by restart_worker.';
COMMENT ON COLUMN public.service_restart_requests.next_attempt_at IS
	'pending: the worker calls the agent from then on; dispatching or running: the lease of the worker expires then.';
COMMENT ON COLUMN public.service_restart_requests.dispatched_at IS
	'When the agent first accepted the request; such a request starts the cooldown of its service.';
COMMENT ON COLUMN public.service_restart_requests.uncertain_at IS
	'When a call that may have reached the agent first ended without an answer (timed out or lost after sending); such a request starts the cooldown too.';

-- At most one active request per service, whatever the path that inserts it.
CREATE UNIQUE INDEX service_restart_requests_one_active
	ON public.service_restart_requests (service_name)
	WHERE status IN ('pending', 'dispatching', 'running');

-- The cooldown check and the UI's "latest request" look-ups.
CREATE INDEX service_restart_requests_service_time
	ON public.service_restart_requests (service_name, requested_at DESC);

-- The worker's queue: active rows by the time they are due.
CREATE INDEX service_restart_requests_due
	ON public.service_restart_requests (next_attempt_at)
	WHERE status IN ('pending', 'dispatching', 'running');

ALTER TABLE public.service_restart_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE restart_worker.agents ENABLE ROW LEVEL SECURITY;
ALTER TABLE restart_worker.services ENABLE ROW LEVEL SECURITY;

-- pg_dump keeps the registry and the history: they are data, not part of the extension.
SELECT pg_catalog.pg_extension_config_dump('restart_worker.agents', '');
SELECT pg_catalog.pg_extension_config_dump('restart_worker.services', '');
SELECT pg_catalog.pg_extension_config_dump('public.service_restart_requests', '');
-- The public request API: request_service_restart() and the list of restartable services.

-- The caller as PostgREST presents it: the role the statement runs as (SET ROLE, or the
-- session user of a plain connection), the JWT role and the JWT subject. The claims are
-- read only for the roles PostgREST switches to; any other role could set them itself.
-- A setting that reads '' counts as missing; the legacy request.jwt.claim.* settings are
-- honoured.
CREATE FUNCTION restart_worker.caller(
	OUT db_role text, OUT jwt_role text, OUT sub text)
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
	v_raw		pg_catalog.text := nullif(current_setting('request.jwt.claims', true), '');
	v_claims	pg_catalog.jsonb;
BEGIN
	db_role := current_setting('role');
	IF db_role = 'none' THEN
		db_role := session_user;
	END IF;
	IF db_role NOT IN ('anon', 'authenticated', 'service_role') THEN
		RETURN;
	END IF;
	IF v_raw IS NOT NULL THEN
		BEGIN
			v_claims := v_raw::pg_catalog.jsonb;
		EXCEPTION
			WHEN invalid_text_representation THEN
				RAISE EXCEPTION 'request.jwt.claims is not valid JSON'
					USING ERRCODE = 'insufficient_privilege';
		END;
		IF jsonb_typeof(v_claims) = 'object' THEN
			jwt_role := nullif(v_claims ->> 'role', '');
			sub := nullif(v_claims ->> 'sub', '');
		END IF;
	END IF;
	jwt_role := coalesce(jwt_role, nullif(current_setting('request.jwt.claim.role', true), ''));
	sub := coalesce(sub, nullif(current_setting('request.jwt.claim.sub', true), ''));
END;
$$;

-- Check a service name given by a caller; raise the documented error if it is unusable.
CREATE FUNCTION restart_worker.check_service_name(p_service_name text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
	IF p_service_name IS NULL THEN
		RAISE EXCEPTION 'service name must not be null'
			USING ERRCODE = 'null_value_not_allowed';
	ELSIF p_service_name = '' THEN
		RAISE EXCEPTION 'service name must not be empty'
			USING ERRCODE = 'invalid_parameter_value';
	ELSIF length(p_service_name) > 63 THEN
		RAISE EXCEPTION 'service name is longer than 63 characters'
			USING ERRCODE = 'invalid_parameter_value';
	ELSIF NOT restart_worker.valid_name(p_service_name) THEN
		RAISE EXCEPTION 'service name "%" is malformed', p_service_name
			USING ERRCODE = 'invalid_parameter_value',
				  HINT = 'A service name is a letter or digit followed by letters, digits, "_", "." or "-".';
	END IF;
END;
$$;

-- Request a restart of a service: check who asks, the service, the active request and the
-- cooldown, then insert the request. The worker is woken when the transaction commits.
-- Callers are serialised per service by a row lock on the registry entry, so that of
-- sessions asking at the same instant exactly one inserts and the others see its row
-- (READ COMMITTED) or fail to serialise (40001, with a transaction-wide snapshot).
CREATE FUNCTION public.request_service_restart(p_service_name text)
RETURNS public.service_restart_requests
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
	v_caller	pg_catalog.record;
	v_by		pg_catalog.uuid;
	v_service	restart_worker.services;
	v_active	public.service_restart_requests;
	v_last		pg_catalog.timestamptz;
	v_now		pg_catalog.timestamptz;
	v_row		public.service_restart_requests;
BEGIN
	v_caller := restart_worker.caller();
	IF v_caller.db_role = 'anon' OR v_caller.jwt_role = 'anon' THEN
		RAISE EXCEPTION 'anonymous users may not request restarts'
			USING ERRCODE = 'insufficient_privilege';
	END IF;
	IF v_caller.sub IS NULL
		AND (v_caller.db_role = 'authenticated' OR v_caller.jwt_role = 'authenticated') THEN
		RAISE EXCEPTION 'an authenticated request needs a user id (JWT claim "sub")'
			USING ERRCODE = 'insufficient_privilege';
	END IF;
	IF v_caller.sub IS NOT NULL THEN
		IF v_caller.sub !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
			RAISE EXCEPTION 'JWT claim "sub" is not a user id'
				USING ERRCODE = 'insufficient_privilege';
		END IF;
		v_by := v_caller.sub::pg_catalog.uuid;
	END IF;

	PERFORM restart_worker.check_service_name(p_service_name);

	SELECT * INTO v_service FROM restart_worker.services s
		WHERE s.name = p_service_name FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown service "%"', p_service_name
			USING ERRCODE = 'invalid_parameter_value';
	ELSIF NOT v_service.enabled THEN
		RAISE EXCEPTION 'service "%" is disabled', p_service_name
			USING ERRCODE = 'invalid_parameter_value';
	END IF;

	-- The time of the request is taken after the lock, not at the start of the
	-- transaction: a long transaction must not backdate it past the cooldown.
	v_now := clock_timestamp();

	SELECT * INTO v_active FROM public.service_restart_requests r
		WHERE r.service_name = p_service_name
		  AND r.status IN ('pending', 'dispatching', 'running');
	IF FOUND THEN
		RAISE EXCEPTION 'A restart request is already pending'
			USING ERRCODE = 'PT409',
				  DETAIL = format('Request %s for service "%s" is %s.',
								  v_active.id, p_service_name, v_active.status);
	END IF;

	SELECT max(r.requested_at) INTO v_last FROM public.service_restart_requests r
		WHERE r.service_name = p_service_name
		  AND (r.dispatched_at IS NOT NULL OR r.uncertain_at IS NOT NULL)
		  AND r.requested_at > v_now - v_service.cooldown;
	IF v_last IS NOT NULL THEN
		RAISE EXCEPTION 'service "%" was restarted less than % ago', p_service_name, v_service.cooldown
			USING ERRCODE = 'PT429',
				  HINT = format('Retry after %s.',
								to_char(date_trunc('second', v_last + v_service.cooldown
												   + interval '0.999999 seconds') AT TIME ZONE 'UTC',
										'YYYY-MM-DD"T"HH24:MI:SS"Z"'));
	END IF;

	BEGIN
		INSERT INTO public.service_restart_requests
			(service_name, requested_by, requested_by_role, requested_at, next_attempt_at, deadline_at)
		VALUES (p_service_name, v_by,
				CASE WHEN v_caller.db_role = 'authenticated' THEN v_caller.db_role
					 ELSE coalesce(v_caller.jwt_role, v_caller.db_role) END,
				v_now, v_now, v_now + v_service.deadline)
		RETURNING * INTO v_row;
	EXCEPTION
		WHEN unique_violation THEN
			RAISE EXCEPTION 'A restart request is already pending'
				USING ERRCODE = 'PT409',
					  DETAIL = format('Another request for service "%s" was made at the same time.',
									  p_service_name);
	END;

	-- Touching the registry row makes a caller whose snapshot predates this request
	-- (REPEATABLE READ, SERIALIZABLE) fail with 40001 at its FOR UPDATE instead of
	-- missing this request and its cooldown.
	UPDATE restart_worker.services SET last_requested_at = v_now WHERE name = p_service_name;
	RETURN v_row;
END;
$$;
COMMENT ON FUNCTION public.request_service_restart(text) IS
	'Request a restart of a registered service; returns the new request. Errors: 22004, 22023, 42501, PT409, PT429.';

-- The restartable services with their latest request, for a UI. Never shows agents.
CREATE FUNCTION public.list_restartable_services()
RETURNS TABLE (
	service_name text,
	description text,
	cooldown interval,
	latest_request_id uuid,
	latest_status text,
	latest_requested_at timestamptz,
	latest_completed_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = ''
AS $$
	SELECT s.name, s.description, s.cooldown, r.id, r.status, r.requested_at, r.completed_at
	FROM restart_worker.services s
	LEFT JOIN LATERAL (
		SELECT q.id, q.status, q.requested_at, q.completed_at
		FROM public.service_restart_requests q
		WHERE q.service_name = s.name
		ORDER BY q.requested_at DESC
		LIMIT 1) r ON true
	WHERE s.enabled
	ORDER BY s.name;
$$;
COMMENT ON FUNCTION public.list_restartable_services() IS
	'Enabled services with their description and latest request; for the "Request Restart" UI.';
-- Administration of the registry and of requests. These functions live in the private
-- schema and may be executed only by superusers and the roles given grant_admin().

-- Raise 22004 for a NULL argument of an admin function.
CREATE FUNCTION restart_worker.require(p_value anyelement, p_what text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
	IF p_value IS NULL THEN
		RAISE EXCEPTION '% must not be null', p_what
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
END;
$$;

-- Check a name for an agent or service; raise 22023 if it is malformed.
CREATE FUNCTION restart_worker.check_name(p_name text, p_what text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
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

-- Check an agent URL; raise 22023 if it is not usable.
CREATE FUNCTION restart_worker.check_url(p_url text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
AS $$
BEGIN
	PERFORM restart_worker.require(p_url, 'agent URL');
	IF NOT restart_worker.valid_agent_url(p_url) THEN
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
SET search_path = ''
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
SET search_path = ''
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
SET search_path = ''
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

-- Remove an agent that no service uses any more.
CREATE FUNCTION restart_worker.remove_agent(p_name text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
	v_services	pg_catalog.text;
BEGIN
	PERFORM restart_worker.check_name(p_name, 'agent name');
	SELECT string_agg(name, ', ' ORDER BY name) INTO v_services
		FROM restart_worker.services WHERE agent = p_name;
	IF v_services IS NOT NULL THEN
		RAISE EXCEPTION 'agent "%" still serves services: %', p_name, v_services
			USING ERRCODE = 'dependent_objects_still_exist',
				  HINT = 'Remove those services or register them with another agent first.';
	END IF;
	DELETE FROM restart_worker.agents WHERE name = p_name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown agent "%"', p_name USING ERRCODE = 'invalid_parameter_value';
	END IF;
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
SET search_path = ''
AS $$
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
SET search_path = ''
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
SET search_path = ''
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
SET search_path = ''
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
SET search_path = ''
RETURN restart_worker.cancel(p_id, NULL,
	(SELECT c.db_role FROM restart_worker.caller() c));

-- Cancel one of the caller's own pending requests (users, through PostgREST).
CREATE FUNCTION public.cancel_service_restart(p_request_id uuid)
RETURNS public.service_restart_requests
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
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
-- service's cooldown; returns how many were deleted.
CREATE FUNCTION restart_worker.prune_requests(p_older_than interval DEFAULT '90 days')
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
	v_count		bigint;
BEGIN
	PERFORM restart_worker.require(p_older_than, 'age');
	IF p_older_than < interval '1 day' THEN
		RAISE EXCEPTION 'refusing to prune requests younger than a day'
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	DELETE FROM public.service_restart_requests
		WHERE status IN ('completed', 'failed', 'cancelled')
		  AND requested_at < now() - p_older_than
		  AND NOT EXISTS (SELECT 1 FROM restart_worker.services s
						  WHERE s.name = service_name
							AND requested_at > now() - s.cooldown);
	GET DIAGNOSTICS v_count = ROW_COUNT;
	RETURN v_count;
END;
$$;
-- Waking the background worker when a new request commits.

-- Statement trigger: arrange for the worker's latch to be set when (and only if) the
-- inserting transaction commits, so a request is dispatched within milliseconds.
CREATE FUNCTION restart_worker.wake_worker_at_commit()
RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', 'restart_worker_wake_worker_at_commit';

CREATE TRIGGER wake_worker_at_commit
	AFTER INSERT ON public.service_restart_requests
	FOR EACH STATEMENT
	EXECUTE FUNCTION restart_worker.wake_worker_at_commit();

-- How many times committing transactions have woken the worker since the server started.
CREATE FUNCTION restart_worker.commit_wakeups()
RETURNS bigint
LANGUAGE c VOLATILE STRICT
AS 'MODULE_PATHNAME', 'restart_worker_commit_wakeups';
-- The background worker's side: how it claims due requests, how it records what agents
-- answer, its status, and the NOTIFY announcing every status change.
--
-- The worker (src/worker.c) runs each of these in its own short transaction and never
-- holds a transaction across a call to an agent. The policy lives here so that it reads
-- in one place: which answers are retried, the backoff, the deadline, the lease.
--
-- The states of a request, and what the worker does with each:
--
--   pending      The request certainly never reached its agent: not yet tried, or every
--                call so far failed before anything was sent (could not connect, TLS
--                handshake, the agent's own 429 too_many_jobs or 500 internal_error,
--                which say that nothing ran). It can be cancelled; it does not start the
--                service's cooldown. Due at next_attempt_at.
--   dispatching  A call may have reached the agent: a call is in flight, or one ended
--                without a certain answer (timed out or connection lost after the request
--                was sent, 5xx from something in between) and the same request id is sent
--                again at next_attempt_at. It cannot be cancelled. The claim that makes a
--                row dispatching commits synchronously, before any byte is sent, so a crash
--                can never bring a request that may have been sent back to pending.
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

-- A time stamp of a job object: NULL for JSON null or a missing key, the time for an
-- RFC 3339 string; anything else raises an error (caught by parse_job()).
CREATE FUNCTION restart_worker.job_time(p_value jsonb)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = ''
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
SET search_path = ''
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
SET search_path = ''
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
-- (p_exclude): pending ones become dispatching (one attempt more), dispatching ones due
-- for another attempt and running ones whose lease expired are taken again. After a
-- restart (p_recover) every dispatching or running request is taken over at once: it is
-- driven on with the same id, and the agent answers with the existing job. Requests past
-- their deadline fail. Rows locked by someone else are skipped, never waited for.
-- maybe_sent says whether an earlier call may have reached the agent (the row was not
-- pending). The worker keeps what it has in flight in memory; the lease only matters if
-- it forgets a request.
CREATE FUNCTION restart_worker.worker_claim(
	p_limit integer, p_exclude uuid[], p_lease_ms integer, p_recover boolean)
RETURNS TABLE (id uuid, url text, key bytea, body text, deadline_at timestamptz,
			   maybe_sent boolean)
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
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

	RETURN QUERY
	WITH due AS (
		SELECT q.id, q.status AS old_status FROM public.service_restart_requests q
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
		   restart_worker.call_body(c::public.service_restart_requests), c.deadline_at,
		   d.old_status <> 'pending'
	FROM claimed c
	JOIN due d ON d.id = c.id
	LEFT JOIN restart_worker.services s ON s.name = c.service_name
	LEFT JOIN restart_worker.agents a ON a.name = s.agent;
END;
$$;

-- When the worker next has something to do for requests it does not have in flight:
-- the earliest due attempt or deadline, or NULL if there is none.
CREATE FUNCTION restart_worker.worker_next_due(p_exclude uuid[])
RETURNS timestamptz
LANGUAGE sql STABLE
RETURN least(
	(SELECT q.next_attempt_at FROM public.service_restart_requests q
	 WHERE q.status IN ('pending', 'dispatching', 'running') AND NOT (q.id = ANY (p_exclude))
	 ORDER BY q.next_attempt_at LIMIT 1),
	(SELECT q.deadline_at FROM public.service_restart_requests q
	 WHERE q.status IN ('pending', 'dispatching', 'running') AND NOT (q.id = ANY (p_exclude))
	 ORDER BY q.deadline_at LIMIT 1));

-- How a call without a usable answer went, from the worker's kind of failure (src/http.c)
-- or the HTTP status and body of the answer: the text for error, whether it may succeed
-- later (retry), and whether this call may have made the agent run something
-- (maybe_sent; p_sent says whether any byte of the request was sent).
CREATE FUNCTION restart_worker.classify(p_kind text, p_http integer, p_answer jsonb,
	p_sent boolean, OUT reason text, OUT retry boolean, OUT maybe_sent boolean)
LANGUAGE plpgsql IMMUTABLE
SET search_path = ''
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
		ELSE
			reason := 'invalid answer from the agent';
	END CASE;
END;
$$;

-- Copy a job object the agent answered with (see parse_job()) to the request, and say
-- what the worker does next: follow a running job, or the terminal status it reached.
CREATE FUNCTION restart_worker.record_job(p_row public.service_restart_requests,
	p_status text, p_started_at timestamptz, p_finished_at timestamptz,
	p_exit_code integer, p_output text, p_error text, p_lease_ms integer)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
	-- One update, also for a job that already ended: each row version costs.
	UPDATE public.service_restart_requests
		SET dispatched_at = coalesce(dispatched_at, pg_catalog.now()),
			started_at = coalesce(p_started_at, started_at),
			output = p_output,
			exit_code = p_exit_code,
			status = p_status,
			error = CASE WHEN p_status = 'running' THEN NULL ELSE p_error END,
			completed_at = CASE WHEN p_status = 'running' THEN NULL
								ELSE coalesce(p_finished_at, pg_catalog.now()) END,
			next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_ms / 1000.0),
			updated_at = pg_catalog.now()
		WHERE id = p_row.id;
	IF p_status <> 'running' THEN
		RETURN p_status;
	ELSIF p_row.deadline_at <= pg_catalog.now() THEN
		PERFORM restart_worker.finish(p_row.id, 'failed', restart_worker.timeout_error('running', NULL));
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
-- whether an earlier call may have reached the agent. A job object in a 200/202 answer is
-- copied to the row; any other answer that cannot succeed later fails the request at
-- once. A request the agent never accepted fails after its maximum attempts; any request
-- fails past its deadline.
CREATE FUNCTION restart_worker.worker_record(
	p_id uuid, p_kind text, p_http integer, p_body text, p_sent boolean,
	p_maybe_sent boolean, p_max_attempts integer, p_retry_base_ms integer,
	p_retry_max_ms integer, p_lease_ms integer,
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
			action := restart_worker.record_job(v_row, v_job.status, v_job.started_at,
				v_job.finished_at, v_job.exit_code, v_job.output, v_job.error, p_lease_ms);
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

-- Every status change but the claim's pending -> dispatching, which the worker announces
-- itself with worker_announce(), right after it sent the call: a transaction that
-- notifies holds a lock that serializes the commits of every notifying transaction of the
-- cluster until it has committed, and the claim commits synchronously, so a notifying
-- claim would hold that lock through a WAL flush (requests being made would wait for it).
CREATE TRIGGER notify_status_update
	AFTER UPDATE OF status ON public.service_restart_requests
	FOR EACH ROW
	WHEN (OLD.status IS DISTINCT FROM NEW.status
		  AND NOT (OLD.status = 'pending' AND NEW.status = 'dispatching'))
	EXECUTE FUNCTION restart_worker.notify_status();

-- Announce the requests the worker has just claimed (p_ids, pending before the claim)
-- with their status now (dispatching), the payload notify_status() gives; run by the
-- worker in a transaction of its own (committed asynchronously) once their calls are sent.
CREATE FUNCTION restart_worker.worker_announce(p_ids uuid[])
RETURNS void
LANGUAGE sql VOLATILE
BEGIN ATOMIC
	SELECT pg_catalog.count(pg_catalog.pg_notify('restart_worker',
		pg_catalog.json_build_object('id', q.id, 'service_name', q.service_name,
									 'status', q.status)::pg_catalog.text))
	FROM public.service_restart_requests q
	WHERE q.id = ANY (p_ids);
END;

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
SET search_path = ''
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
-- Privileges: nothing for PUBLIC, reading for requesters, everything for admins.
-- Supabase gives anon, authenticated and service_role default grants on new objects in
-- public; they are undone here and replaced by exactly what each role needs.

-- Let a role request restarts, cancel its own pending requests, read the requests and
-- list the services. Grant it to a group role and its members, including roles made
-- later, can request too.
CREATE FUNCTION restart_worker.grant_requester(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
	PERFORM restart_worker.require(p_role, 'role');
	IF p_role::pg_catalog.text = 'anon' THEN
		RAISE EXCEPTION 'anon may not request restarts' USING ERRCODE = 'insufficient_privilege';
	END IF;
	EXECUTE format('GRANT EXECUTE ON FUNCTION public.request_service_restart(text) TO %s', p_role);
	EXECUTE format('GRANT EXECUTE ON FUNCTION public.cancel_service_restart(uuid) TO %s', p_role);
	EXECUTE format('GRANT EXECUTE ON FUNCTION public.list_restartable_services() TO %s', p_role);
	EXECUTE format('GRANT SELECT ON TABLE public.service_restart_requests TO %s', p_role);
END;
$$;

-- Take back what grant_requester() gave.
CREATE FUNCTION restart_worker.revoke_requester(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
	PERFORM restart_worker.require(p_role, 'role');
	EXECUTE format('REVOKE ALL ON FUNCTION public.request_service_restart(text) FROM %s', p_role);
	EXECUTE format('REVOKE ALL ON FUNCTION public.cancel_service_restart(uuid) FROM %s', p_role);
	EXECUTE format('REVOKE ALL ON FUNCTION public.list_restartable_services() FROM %s', p_role);
	EXECUTE format('REVOKE ALL ON TABLE public.service_restart_requests FROM %s', p_role);
END;
$$;

-- Let a role administer restart_worker: the registry, the admin functions, and every
-- row of every table. Row level security lets in whoever may execute register_agent(),
-- so the grants alone decide, and pg_dump carries them over. No TRIGGER or REFERENCES:
-- a trigger of an admin would run as the owner of the SECURITY DEFINER functions.
CREATE FUNCTION restart_worker.grant_admin(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
	PERFORM restart_worker.require(p_role, 'role');
	IF p_role::pg_catalog.text IN ('anon', 'authenticated') THEN
		RAISE EXCEPTION '% may not administer restart_worker', p_role
			USING ERRCODE = 'insufficient_privilege';
	END IF;
	PERFORM restart_worker.grant_requester(p_role);
	EXECUTE format('GRANT USAGE ON SCHEMA restart_worker TO %s', p_role);
	EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA restart_worker TO %s', p_role);
	EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA restart_worker TO %s', p_role);
	EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE public.service_restart_requests TO %s', p_role);
END;
$$;

-- Everyone who may read the requests reads all of them: a UI shows every service's state.
CREATE POLICY read_requests ON public.service_restart_requests
	FOR SELECT USING (true);

-- Admins (see grant_admin) may read and write every row of every table.
CREATE POLICY admin_requests ON public.service_restart_requests
	USING (pg_catalog.has_function_privilege(
		'restart_worker.register_agent(pg_catalog.text,pg_catalog.text,pg_catalog.text)'::pg_catalog.regprocedure, 'EXECUTE'))
	WITH CHECK (pg_catalog.has_function_privilege(
		'restart_worker.register_agent(pg_catalog.text,pg_catalog.text,pg_catalog.text)'::pg_catalog.regprocedure, 'EXECUTE'));
CREATE POLICY admin_agents ON restart_worker.agents
	USING (pg_catalog.has_function_privilege(
		'restart_worker.register_agent(pg_catalog.text,pg_catalog.text,pg_catalog.text)'::pg_catalog.regprocedure, 'EXECUTE'))
	WITH CHECK (pg_catalog.has_function_privilege(
		'restart_worker.register_agent(pg_catalog.text,pg_catalog.text,pg_catalog.text)'::pg_catalog.regprocedure, 'EXECUTE'));
CREATE POLICY admin_services ON restart_worker.services
	USING (pg_catalog.has_function_privilege(
		'restart_worker.register_agent(pg_catalog.text,pg_catalog.text,pg_catalog.text)'::pg_catalog.regprocedure, 'EXECUTE'))
	WITH CHECK (pg_catalog.has_function_privilege(
		'restart_worker.register_agent(pg_catalog.text,pg_catalog.text,pg_catalog.text)'::pg_catalog.regprocedure, 'EXECUTE'));

-- Start from nothing: whatever default privileges gave anyone on the new objects (Supabase
-- grants anon, authenticated, service_role and postgres everything in public) is revoked
-- from every grantee but the owner; then each API role gets exactly what it needs.
DO $$
DECLARE
	v_kind		pg_catalog.text;
	v_object	pg_catalog.text;
	v_grantee	pg_catalog.text;
BEGIN
	FOR v_kind, v_object, v_grantee IN
		SELECT 'TABLE', c.oid::pg_catalog.regclass::pg_catalog.text, a.grantee::pg_catalog.regrole::pg_catalog.text
		FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
		WHERE (c.relnamespace = 'restart_worker'::pg_catalog.regnamespace
			   OR c.oid = 'public.service_restart_requests'::pg_catalog.regclass)
		  AND a.grantee <> c.relowner AND a.grantee <> 0
		UNION
		SELECT 'FUNCTION', p.oid::pg_catalog.regprocedure::pg_catalog.text, a.grantee::pg_catalog.regrole::pg_catalog.text
		FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
		WHERE (p.pronamespace = 'restart_worker'::pg_catalog.regnamespace
			   OR p.oid IN ('public.request_service_restart(pg_catalog.text)'::pg_catalog.regprocedure,
							'public.cancel_service_restart(pg_catalog.uuid)'::pg_catalog.regprocedure,
							'public.list_restartable_services()'::pg_catalog.regprocedure))
		  AND a.grantee <> p.proowner AND a.grantee <> 0
		UNION
		SELECT 'SCHEMA', 'restart_worker', a.grantee::pg_catalog.regrole::pg_catalog.text
		FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
		WHERE n.nspname = 'restart_worker' AND a.grantee <> n.nspowner AND a.grantee <> 0
	LOOP
		EXECUTE format('REVOKE ALL ON %s %s FROM %s', v_kind, v_object, v_grantee);
	END LOOP;

	-- Functions are executable by PUBLIC unless revoked.
	FOR v_object IN
		SELECT p.oid::pg_catalog.regprocedure::pg_catalog.text FROM pg_catalog.pg_proc p
		WHERE p.pronamespace = 'restart_worker'::pg_catalog.regnamespace
		   OR p.oid IN ('public.request_service_restart(pg_catalog.text)'::pg_catalog.regprocedure,
						'public.cancel_service_restart(pg_catalog.uuid)'::pg_catalog.regprocedure,
						'public.list_restartable_services()'::pg_catalog.regprocedure)
	LOOP
		EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_object);
	END LOOP;
	REVOKE ALL ON TABLE public.service_restart_requests FROM PUBLIC;
	REVOKE ALL ON ALL TABLES IN SCHEMA restart_worker FROM PUBLIC;

	IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
		PERFORM restart_worker.grant_requester('authenticated');
	END IF;
	IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
		PERFORM restart_worker.grant_admin('service_role');
	END IF;
END;
$$;

-- Tell PostgREST to pick up the new functions.
NOTIFY pgrst, 'reload schema';
