-- The public request API: request_service_restart() and the list of restartable services.

-- The caller as PostgREST presents it: the role the statement runs as (SET ROLE, or the
-- session user of a plain connection), the JWT role and the JWT subject. The claims are
-- read only for the roles PostgREST switches to; any other role could set them itself.
-- A setting that reads '' counts as missing; the legacy request.jwt.claim.* settings are
-- honoured.
CREATE FUNCTION restart_worker.caller(
	OUT db_role text, OUT jwt_role text, OUT sub text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
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
			WHEN data_exception THEN
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
SET search_path = pg_catalog, pg_temp
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
SET search_path = pg_catalog, pg_temp
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

-- The restartable services with their latest request, for a UI. Never shows agents, and
-- shows nothing to anon, even if a grant slipped through (PL/pgSQL for that check since
-- 1.8).
CREATE FUNCTION public.list_restartable_services()
RETURNS TABLE (
	service_name text,
	description text,
	cooldown interval,
	latest_request_id uuid,
	latest_status text,
	latest_requested_at timestamptz,
	latest_completed_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_caller	pg_catalog.record;
BEGIN
	v_caller := restart_worker.caller();
	IF v_caller.db_role = 'anon' OR v_caller.jwt_role = 'anon' THEN
		RAISE EXCEPTION 'anonymous users may not list services'
			USING ERRCODE = 'insufficient_privilege';
	END IF;
	RETURN QUERY
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
END;
$$;
COMMENT ON FUNCTION public.list_restartable_services() IS
	'Enabled services with their description and latest request; for the "Request Restart" UI.';
