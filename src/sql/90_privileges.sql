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
	IF p_role::text = 'anon' THEN
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
-- row of every table (row level security policies included).
CREATE FUNCTION restart_worker.grant_admin(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
BEGIN
	PERFORM restart_worker.require(p_role, 'role');
	IF p_role::text IN ('anon', 'authenticated') THEN
		RAISE EXCEPTION '% may not administer restart_worker', p_role
			USING ERRCODE = 'insufficient_privilege';
	END IF;
	PERFORM restart_worker.grant_requester(p_role);
	EXECUTE format('GRANT USAGE ON SCHEMA restart_worker TO %s', p_role);
	EXECUTE format('GRANT ALL ON ALL TABLES IN SCHEMA restart_worker TO %s', p_role);
	EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA restart_worker TO %s', p_role);
	EXECUTE format('GRANT ALL ON TABLE public.service_restart_requests TO %s', p_role);
	EXECUTE format('DROP POLICY IF EXISTS %I ON public.service_restart_requests', 'admin_' || p_role::text);
	EXECUTE format('CREATE POLICY %I ON public.service_restart_requests TO %s USING (true) WITH CHECK (true)',
				   'admin_' || p_role::text, p_role);
	EXECUTE format('DROP POLICY IF EXISTS %I ON restart_worker.agents', 'admin_' || p_role::text);
	EXECUTE format('CREATE POLICY %I ON restart_worker.agents TO %s USING (true) WITH CHECK (true)',
				   'admin_' || p_role::text, p_role);
	EXECUTE format('DROP POLICY IF EXISTS %I ON restart_worker.services', 'admin_' || p_role::text);
	EXECUTE format('CREATE POLICY %I ON restart_worker.services TO %s USING (true) WITH CHECK (true)',
				   'admin_' || p_role::text, p_role);
END;
$$;

-- Everyone who may read the requests reads all of them: a UI shows every service's state.
CREATE POLICY read_requests ON public.service_restart_requests
	FOR SELECT USING (true);

-- Start from nothing: no PUBLIC grants, and none of the default grants Supabase's
-- API roles receive on new objects.
DO $$
DECLARE
	v_role		text;
	v_fn		regprocedure;
	v_tab		regclass;
BEGIN
	FOR v_role IN
		SELECT 'PUBLIC' UNION ALL
		SELECT quote_ident(rolname) FROM pg_catalog.pg_roles
		WHERE rolname IN ('anon', 'authenticated', 'service_role')
	LOOP
		FOR v_fn IN
			SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
			WHERE p.pronamespace = 'restart_worker'::regnamespace
			   OR p.oid IN ('public.request_service_restart(text)'::regprocedure,
							'public.cancel_service_restart(uuid)'::regprocedure,
							'public.list_restartable_services()'::regprocedure)
		LOOP
			EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %s', v_fn, v_role);
		END LOOP;
		FOR v_tab IN
			SELECT c.oid::regclass FROM pg_catalog.pg_class c
			WHERE c.relnamespace = 'restart_worker'::regnamespace AND c.relkind = 'r'
			UNION ALL SELECT 'public.service_restart_requests'::regclass
		LOOP
			EXECUTE format('REVOKE ALL ON TABLE %s FROM %s', v_tab, v_role);
		END LOOP;
	END LOOP;

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
