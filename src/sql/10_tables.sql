-- Tables: the registry (private) and the requests (public, behind row level security).

-- A name of an agent or a service: a letter or digit, then letters, digits, '_', '.', '-'.
CREATE FUNCTION restart_worker.valid_name(p_name text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_name IS NOT NULL
	AND length(p_name) BETWEEN 1 AND 63
	AND p_name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]*$';

-- An agent URL: http(s)://host[:port][/path] with no user info, query or fragment, and a
-- port from 1 to 65535 (since 1.9; libcurl refuses any other, and such a call failed as
-- an invalid answer), or unix:/absolute/path for HTTP over a local socket.
CREATE FUNCTION restart_worker.valid_agent_url(p_url text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN p_url IS NOT NULL
	AND length(p_url) <= 2048
	AND ((p_url ~ '^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:[0-9]{1,5})?(/[A-Za-z0-9._~/%-]*)?$'
		  AND coalesce((pg_catalog.substring(p_url, '^https?://(?:\[[^]]*\]|[^:/]*):([0-9]+)'))::integer
					   BETWEEN 1 AND 65535, true))
		 OR p_url ~ '^unix:/[A-Za-z0-9._~/-]+$');

-- A signing secret in the Standard Webhooks form: whsec_ then base64 of 24 to 64 bytes.
CREATE FUNCTION restart_worker.valid_secret(p_secret text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
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
