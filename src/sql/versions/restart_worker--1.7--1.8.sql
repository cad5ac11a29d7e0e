-- restart_worker 1.7 -> 1.8.
--
-- 1.8 closes holes in what callers could do. Every function pinned search_path = '', and
-- with an empty path PostgreSQL looks in the caller's temporary schema first for table and
-- type names: register_service() and worker_settle() declared variables of unqualified
-- types, so an admin who made a temporary domain named text or uuid had its CHECK, their
-- own code, run as the owner of those SECURITY DEFINER functions (a superuser, as a rule).
-- Now their types are qualified and every function pins search_path = pg_catalog, pg_temp,
-- the temporary schema last. anon reads no request and lists no service even with a
-- stray grant (the read policy and list_restartable_services()). prune_requests() checks
-- its limit of a day on the time the age reaches back to ('-1 year 362 days' passed it
-- and deleted every finished request). Claims that are not valid JSON for jsonb (a \u0000)
-- give 42501, like any claims that are not JSON. The tables and their rows are unchanged.
-- The definitions below are those of src/sql/20_request.sql, src/sql/30_admin.sql and
-- src/sql/50_worker.sql.

\echo Use "ALTER EXTENSION restart_worker UPDATE TO '1.8'" to load this file. \quit

-- The caller as PostgREST presents it: the role the statement runs as (SET ROLE, or the
-- session user of a plain connection), the JWT role and the JWT subject. The claims are
-- read only for the roles PostgREST switches to; any other role could set them itself.
-- A setting that reads '' counts as missing; the legacy request.jwt.claim.* settings are
-- honoured.
CREATE OR REPLACE FUNCTION restart_worker.caller(
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

-- The restartable services with their latest request, for a UI. Never shows agents, and
-- shows nothing to anon, even if a grant slipped through (PL/pgSQL for that check since
-- 1.8).
CREATE OR REPLACE FUNCTION public.list_restartable_services()
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

-- Delete finished requests older than the given age, keeping any that still holds a
-- service's cooldown; returns how many were deleted. The limit of a day is checked on the
-- time the age reaches back to, not on the interval itself: an interval compares a year
-- as 360 days, while now() - '-1 year 362 days' is in the future (1.7 and before deleted
-- every finished request so).
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
	v_before := now() - p_older_than;
	IF v_before > now() - interval '1 day' THEN
		RAISE EXCEPTION 'refusing to prune requests younger than a day'
			USING ERRCODE = 'invalid_parameter_value';
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
CREATE OR REPLACE FUNCTION restart_worker.worker_settle(p_before timestamptz)
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

-- Everyone who may read the requests reads all of them, but anon, even if a grant slipped
-- through.
ALTER POLICY read_requests ON public.service_restart_requests
	USING (CURRENT_USER OPERATOR(pg_catalog.<>) 'anon');

-- Every other function of the extension that pinned the empty path pins the new one.
DO $$
DECLARE
	v_function	pg_catalog.text;
BEGIN
	FOR v_function IN
		SELECT p.oid::pg_catalog.regprocedure::pg_catalog.text
		FROM pg_catalog.pg_proc p, pg_catalog.pg_depend d
		WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid
		  AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass AND d.deptype = 'e'
		  AND d.refobjid = (SELECT e.oid FROM pg_catalog.pg_extension e
							WHERE e.extname = 'restart_worker')
		  AND p.proconfig OPERATOR(pg_catalog.@>) ARRAY['search_path=""']
	LOOP
		EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp',
								  v_function);
	END LOOP;
END;
$$;
