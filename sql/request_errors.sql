-- The rules of a request: every error a caller can meet, with its SQLSTATE, and that
-- nothing is written when a request is refused.
\set VERBOSITY terse

-- The service name.
SELECT outcome($$SELECT request_service_restart(NULL)$$);
SELECT outcome($$SELECT request_service_restart('')$$);
SELECT outcome($$SELECT request_service_restart(repeat('a', 64))$$);
SELECT outcome($$SELECT request_service_restart('mqtt subscriber')$$);
SELECT outcome($$SELECT request_service_restart('-leading-dash')$$);
SELECT outcome($$SELECT request_service_restart('x;drop table t')$$);
SELECT outcome($$SELECT request_service_restart('unknown-service')$$);
SELECT restart_worker.set_service_enabled('api', false);
SELECT outcome($$SELECT request_service_restart('api')$$);
SELECT restart_worker.set_service_enabled('api', true);
SELECT count(*) AS rows_written FROM service_restart_requests;

-- The named argument PostgREST passes, as supabase.rpc() sends it.
SELECT service_name, status, requested_by, requested_by_role, attempts,
	   dispatched_at IS NULL AS not_dispatched, deadline_at - requested_at AS deadline
	FROM request_service_restart(p_service_name := 'mqtt-subscriber');

-- An active request: PT409, with the pending request named in the DETAIL.
SELECT outcome($$SELECT request_service_restart('mqtt-subscriber')$$);
UPDATE service_restart_requests SET status = 'dispatching' WHERE service_name = 'mqtt-subscriber';
SELECT outcome($$SELECT request_service_restart('mqtt-subscriber')$$);
UPDATE service_restart_requests SET status = 'running', dispatched_at = now()
	WHERE service_name = 'mqtt-subscriber';
SELECT outcome($$SELECT request_service_restart('mqtt-subscriber')$$);
DO $$
DECLARE
	v_detail	text;
	v_id		uuid;
BEGIN
	SELECT id INTO v_id FROM service_restart_requests WHERE service_name = 'mqtt-subscriber';
	PERFORM request_service_restart('mqtt-subscriber');
EXCEPTION
	WHEN SQLSTATE 'PT409' THEN
		GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
		RAISE NOTICE 'detail names the active request: %', position(v_id::text IN v_detail) > 0;
END;
$$;

-- Cooldown: a request that reached its agent within the cooldown refuses new ones
-- with PT429 and a HINT saying when to retry (rounded up to the second).
UPDATE service_restart_requests SET status = 'completed', completed_at = now()
	WHERE service_name = 'mqtt-subscriber';
SELECT outcome($$SELECT request_service_restart('mqtt-subscriber')$$);
DO $$
DECLARE
	v_hint		text;
BEGIN
	PERFORM request_service_restart('mqtt-subscriber');
EXCEPTION
	WHEN SQLSTATE 'PT429' THEN
		GET STACKED DIAGNOSTICS v_hint = PG_EXCEPTION_HINT;
		RAISE NOTICE 'retry time is the request time plus the cooldown: %',
			substring(v_hint FROM 'Retry after (.*)\.$')::timestamptz
			= date_trunc('second', (SELECT requested_at FROM service_restart_requests
									WHERE service_name = 'mqtt-subscriber')
								   + interval '5 minutes' + interval '0.999999 seconds');
END;
$$;
-- Once the cooldown has passed, a new request is accepted.
UPDATE service_restart_requests SET requested_at = now() - interval '6 minutes'
	WHERE service_name = 'mqtt-subscriber';
SELECT service_name, status FROM request_service_restart('mqtt-subscriber');

-- A request that never reached its agent starts no cooldown.
UPDATE service_restart_requests SET status = 'failed', error = 'could not connect'
	WHERE service_name = 'mqtt-subscriber' AND status = 'pending';
SELECT service_name, status FROM request_service_restart('mqtt-subscriber');
SELECT outcome($$SELECT restart_worker.cancel_request(
	(SELECT id FROM service_restart_requests WHERE service_name = 'mqtt-subscriber' AND status = 'pending'))$$);
SELECT service_name, status FROM request_service_restart('mqtt-subscriber');
SELECT status, count(*), count(dispatched_at) AS dispatched
	FROM service_restart_requests WHERE service_name = 'mqtt-subscriber'
	GROUP BY status ORDER BY status;

-- A request whose call may have reached the agent (sent, then no answer) holds the
-- cooldown like a dispatched one: its steps may have run.
SELECT restart_worker.register_service('uncertain-svc', 'host1', '10 minutes');
SELECT service_name, status FROM request_service_restart('uncertain-svc');
UPDATE service_restart_requests SET status = 'failed', uncertain_at = now(),
	error = 'gave up after 5 attempts: timed out waiting for the agent; the agent may have received the request'
	WHERE service_name = 'uncertain-svc';
SELECT outcome($$SELECT request_service_restart('uncertain-svc')$$);
-- Also when the worker fails it at its deadline while it is still dispatching (the worker's
-- record of the uncertain call may have been lost in a crash).
UPDATE service_restart_requests SET uncertain_at = NULL, requested_at = now() - interval '1 hour'
	WHERE service_name = 'uncertain-svc';
SELECT service_name, status FROM request_service_restart('uncertain-svc');
UPDATE service_restart_requests SET status = 'dispatching', attempts = 1,
	deadline_at = now() - interval '1 second'
	WHERE service_name = 'uncertain-svc' AND status = 'pending';
SELECT count(*) AS claimed FROM restart_worker.worker_claim(0, '{}', 60000, false);
SELECT status, error, uncertain_at IS NOT NULL AS holds_cooldown FROM service_restart_requests
	WHERE service_name = 'uncertain-svc' AND attempts = 1;
SELECT outcome($$SELECT request_service_restart('uncertain-svc')$$);
SELECT restart_worker.remove_service('uncertain-svc');

-- A service with no cooldown accepts a request as soon as the last one ended.
SELECT service_name, status FROM request_service_restart('nocool');
UPDATE service_restart_requests SET status = 'completed', dispatched_at = now()
	WHERE service_name = 'nocool';
SELECT service_name, status FROM request_service_restart('nocool');

-- requested_at is the time of the request, not of the start of its transaction: a
-- transaction kept open for a while cannot date a request back (the cooldown counts from
-- it).
BEGIN;
UPDATE service_restart_requests SET status = 'completed'
	WHERE service_name = 'nocool' AND status = 'pending';
SELECT now() AS xact_start, pg_sleep(0.05) AS slept \gset
SELECT requested_at >= :'xact_start'::timestamptz + interval '50 ms' AS dated_at_the_request
	FROM request_service_restart('nocool');
ROLLBACK;

-- Refused requests wrote nothing; the unique index backs the rule up for any writer.
SELECT service_name, count(*) FROM service_restart_requests GROUP BY 1 ORDER BY 1;
SELECT outcome($$INSERT INTO service_restart_requests (service_name, requested_by_role, deadline_at)
	VALUES ('nocool', 'postgres', now())$$);
