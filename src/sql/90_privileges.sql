-- Privileges: nothing for PUBLIC, reading for requesters, everything for admins.
-- Supabase gives anon, authenticated and service_role default grants on new objects in
-- public; they are undone here and replaced by exactly what each role needs.

-- Let a role request restarts, cancel its own pending requests, read the requests and
-- list the services. Grant it to a group role and its members, including roles made
-- later, can request too. This and the two functions below are SECURITY DEFINER (since
-- 1.9): an admin holds its privileges without the right to pass them on, so run as the
-- admin their GRANTs only warned "no privileges were granted" and changed nothing; now
-- the grants are the extension owner's, whoever of the admins makes or takes them back.
CREATE FUNCTION restart_worker.grant_requester(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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

-- Everyone who may read the requests reads all of them (a UI shows every service's state),
-- but anon, even if a grant slipped through (since 1.8).
CREATE POLICY read_requests ON public.service_restart_requests
	FOR SELECT USING (CURRENT_USER OPERATOR(pg_catalog.<>) 'anon');

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
