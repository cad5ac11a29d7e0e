-- The worker's claim reads only what it claims, however large the history of requests:
-- the due requests through their partial index, the rows it claims or fails through the
-- primary key. (Before 1.4 it updated them through a join that the planner ran as a scan
-- of the whole table, once the table held some thousands of rows, in a session with the
-- default settings.) Its plans are made once, for any arguments: the same calls check
-- that a claim after a restart takes over the requests in flight whatever their lease,
-- and that no claim takes a pending request before it is due.
\set VERBOSITY terse
ALTER TABLE service_restart_requests SET (autovacuum_enabled = false);
SELECT restart_worker.register_agent('clhost', 'http://127.0.0.1:9', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT count(restart_worker.register_service('cl' || i, 'clhost', '0'))
	FROM generate_series(1, 2106) i;

-- The history: 5,000 requests that ended.
INSERT INTO service_restart_requests (service_name, status, requested_by_role, requested_at,
									  deadline_at, completed_at)
	SELECT 'cl' || (i % 100 + 1), 'completed', 'postgres', now() - interval '1 day',
		   now() - interval '23 hours', now() - interval '1 day'
	FROM generate_series(1, 5000) i;
-- Active: cl1 and cl2 in flight, their lease running for an hour still; cl3 to cl100
-- pending and due long ago (before any request an earlier test left pending); cl101 to
-- cl103 pending, waiting for another attempt in an hour; cl104 to cl106 pending, past
-- their deadline.
INSERT INTO service_restart_requests (service_name, status, requested_by_role, attempts,
									  next_attempt_at, deadline_at)
	SELECT 'cl' || i, 'dispatching', 'postgres', 1, now() + interval '1 hour',
		   now() + interval '2 hours'
	FROM generate_series(1, 2) i;
INSERT INTO service_restart_requests (service_name, requested_by_role, requested_at,
									  next_attempt_at, deadline_at)
	SELECT 'cl' || i, 'postgres', now() - interval '1 minute',
		   CASE WHEN i <= 100 THEN now() - interval '1 year' ELSE now() + interval '1 hour' END,
		   CASE WHEN i <= 103 THEN now() + interval '2 hours' ELSE now() - interval '1 second' END
	FROM generate_series(3, 106) i;
ANALYZE service_restart_requests;

-- Rows of the table read by scanning it whole, as the statistics system has them.
CREATE FUNCTION pg_temp.scanned() RETURNS bigint
LANGUAGE sql AS $$
	SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'service_restart_requests'
$$;
SELECT pg_stat_force_next_flush();
SELECT pg_temp.scanned() AS scanned_before \gset

-- Claims of up to 64, as the worker makes them: 64, then the 34 left, then none. Then a
-- claim after a restart: cl1 and cl2 are taken over, with their lease an hour away, but
-- not the requests the worker has in flight (those claimed above). Each with its agent's
-- URL; none accepted by its agent yet (see the end for one that was).
CREATE TEMP TABLE claims (call integer, id uuid, maybe_sent boolean, accepted boolean, url text);
INSERT INTO claims SELECT 1, id, maybe_sent, accepted, url FROM restart_worker.worker_claim(64, '{}', 60000, false);
INSERT INTO claims SELECT 2, id, maybe_sent, accepted, url FROM restart_worker.worker_claim(64, '{}', 60000, false);
INSERT INTO claims SELECT 3, id, maybe_sent, accepted, url FROM restart_worker.worker_claim(64, '{}', 60000, false);
INSERT INTO claims SELECT 4, id, maybe_sent, accepted, url
	FROM restart_worker.worker_claim(64, (SELECT array_agg(id) FROM claims), 60000, true);
SELECT pg_stat_force_next_flush();
SELECT pg_temp.scanned() - :scanned_before AS rows_scanned;

-- (Requests left pending by earlier tests may be claimed too: they are not counted.)
SELECT c.call, count(*) AS claimed, count(*) FILTER (WHERE c.maybe_sent) AS maybe_sent,
	   count(*) FILTER (WHERE c.accepted) AS accepted,
	   count(*) FILTER (WHERE c.url = 'http://127.0.0.1:9') AS with_url
	FROM claims c JOIN service_restart_requests q USING (id)
	WHERE q.service_name LIKE 'cl%'
	GROUP BY c.call ORDER BY c.call;
SELECT q.status, q.attempts, q.error, count(*)
	FROM service_restart_requests q
	WHERE q.service_name LIKE 'cl%' AND q.status <> 'completed'
	GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;

-- 2,000 more requests waiting for another attempt in an hour, and ten claims that find
-- nothing due: each reads the index of the due requests up to now, not every active
-- request (before 1.4, the plan kept after a few calls read them all: 2,000 a claim, where
-- now the ten together read fewer).
INSERT INTO service_restart_requests (service_name, requested_by_role, next_attempt_at,
									  deadline_at)
	SELECT 'cl' || i, 'postgres', now() + interval '1 hour', now() + interval '2 hours'
	FROM generate_series(107, 2106) i;
CREATE FUNCTION pg_temp.due_read() RETURNS bigint
LANGUAGE sql AS $$
	SELECT idx_tup_read FROM pg_stat_user_indexes
	WHERE indexrelname = 'service_restart_requests_due'
$$;
SELECT pg_stat_force_next_flush();
SELECT pg_temp.due_read() AS due_read_before \gset
DO $$
BEGIN
	FOR k IN 1 .. 10 LOOP
		INSERT INTO claims SELECT 5, c.id, c.maybe_sent
			FROM restart_worker.worker_claim(64, (SELECT array_agg(id) FROM claims), 60000, false) c;
	END LOOP;
END $$;
SELECT count(*) AS claimed FROM claims WHERE call = 5;
SELECT pg_stat_force_next_flush();
SELECT pg_temp.due_read() - :due_read_before < 2000 AS read_only_the_due;

-- worker_fail_late(), which the worker runs instead of a claim while every call slot is
-- busy: it fails the requests past their deadline, but not those in flight, and says when
-- the next active request not in flight reaches its deadline. cl107 and cl108 are past
-- their deadline, cl108 dispatching and in flight at first; cl109 reaches its deadline in
-- 90 minutes, the other pending requests in two hours; cl1, dispatching and in flight, in
-- 30 minutes; then cl2, dispatching and waiting for another call (not in flight), in 60
-- minutes. (Requests left active by earlier tests are ended first.)
UPDATE service_restart_requests SET status = 'cancelled'
	WHERE status IN ('pending', 'dispatching', 'running') AND service_name NOT LIKE 'cl%';
UPDATE service_restart_requests SET deadline_at = now() - interval '1 second'
	WHERE service_name IN ('cl107', 'cl108');
UPDATE service_restart_requests SET status = 'dispatching' WHERE service_name = 'cl108';
UPDATE service_restart_requests SET deadline_at = now() + interval '90 minutes'
	WHERE service_name = 'cl109'
	RETURNING deadline_at AS cl109_deadline \gset
UPDATE service_restart_requests SET deadline_at = now() + interval '30 minutes'
	WHERE service_name = 'cl1' AND status = 'dispatching';
SELECT restart_worker.worker_fail_late(ARRAY(SELECT id FROM service_restart_requests
											 WHERE service_name IN ('cl1', 'cl108')
											   AND status = 'dispatching'))
	= :'cl109_deadline' AS next_is_cl109;
SELECT service_name, status, error, completed_at IS NOT NULL AS completed_at
	FROM service_restart_requests WHERE service_name IN ('cl107', 'cl108', 'cl109', 'cl1')
	  AND status <> 'completed'
	ORDER BY service_name;
UPDATE service_restart_requests SET deadline_at = now() + interval '60 minutes'
	WHERE service_name = 'cl2' AND status = 'dispatching'
	RETURNING deadline_at AS cl2_deadline \gset
SELECT restart_worker.worker_fail_late(ARRAY(SELECT id FROM service_restart_requests
											 WHERE service_name = 'cl1'
											   AND status = 'dispatching'))
	= :'cl2_deadline' AS next_is_cl2;
SELECT service_name, status, error FROM service_restart_requests
	WHERE service_name = 'cl108';
-- Nothing active but what is in flight: no next deadline.
UPDATE service_restart_requests SET status = 'cancelled'
	WHERE service_name LIKE 'cl%' AND status IN ('pending', 'dispatching', 'running')
	  AND service_name <> 'cl1';
SELECT restart_worker.worker_fail_late(ARRAY(SELECT id FROM service_restart_requests
											 WHERE service_name = 'cl1'
											   AND status = 'dispatching')) AS next_deadline;

-- A claim that ends requests past their deadline commits synchronously, also in a session
-- (the worker's) whose claims do not: such an end must not be lost in a crash.
BEGIN;
SET LOCAL synchronous_commit = off;
SELECT count(*) AS claimed FROM restart_worker.worker_claim(0, '{}', 0, false);
SELECT current_setting('synchronous_commit') AS without_late;
INSERT INTO service_restart_requests (service_name, requested_by_role, next_attempt_at, deadline_at)
	VALUES ('cl110', 'postgres', now() + interval '1 hour', now() - interval '1 second');
SELECT count(*) AS claimed FROM restart_worker.worker_claim(0, '{}', 0, false);
SELECT current_setting('synchronous_commit') AS with_late;
SELECT status FROM service_restart_requests WHERE service_name = 'cl110' AND status <> 'cancelled';
ROLLBACK;

-- After a start of the server the worker settles what a claim lost in a crash may have
-- left pending (worker_settle()): every request still pending that was due before the
-- worker's first start becomes dispatching, holds its service's cooldown and can no
-- longer be cancelled. Requests due later, and those in any other state, stay as they
-- are. The regression database is not the worker's: no cancellation is held back here.
UPDATE service_restart_requests SET status = 'cancelled'
	WHERE service_name LIKE 'cl%' AND status IN ('pending', 'dispatching', 'running');
INSERT INTO service_restart_requests (service_name, status, requested_by_role, attempts,
									  next_attempt_at, deadline_at, uncertain_at, dispatched_at)
	VALUES ('cl111', 'pending', 'postgres', 0, now() - interval '10 minutes', now() + interval '1 hour', NULL, NULL),
		   ('cl112', 'pending', 'postgres', 2, now() - interval '10 minutes', now() + interval '1 hour',
			'2026-01-01 00:00:00+00', NULL),
		   ('cl113', 'pending', 'postgres', 1, now() - interval '1 minute', now() + interval '1 hour', NULL, NULL),
		   ('cl114', 'running', 'postgres', 1, now() - interval '10 minutes', now() + interval '1 hour', NULL, now());
SELECT restart_worker.worker_settle(now() - interval '5 minutes') AS settled;
SELECT service_name, status, attempts, next_attempt_at <= now() AS due,
	   uncertain_at IS NOT NULL AS holds_cooldown, uncertain_at = '2026-01-01 00:00:00+00' AS kept
	FROM service_restart_requests WHERE service_name IN ('cl111', 'cl112', 'cl113', 'cl114')
	  AND status <> 'cancelled'
	ORDER BY service_name;
SELECT restart_worker.worker_settle(now() - interval '5 minutes') AS settled_again;
SELECT restart_worker.worker_unsettled_before() IS NULL AS nothing_held_back;
DO $$
BEGIN
	PERFORM restart_worker.cancel_request(id) FROM service_restart_requests
		WHERE service_name = 'cl111' AND status = 'dispatching';
EXCEPTION WHEN object_not_in_prerequisite_state THEN
	RAISE NOTICE '%', regexp_replace(SQLERRM, '[0-9a-f-]{36}', '<id>');
END;
$$;
SELECT (restart_worker.cancel_request(id)).status FROM service_restart_requests
	WHERE service_name = 'cl113' AND status = 'pending';
UPDATE service_restart_requests SET status = 'cancelled'
	WHERE service_name LIKE 'cl%' AND status IN ('pending', 'dispatching', 'running');

-- A running request (accepted by its agent) due again, and a dispatching one: the claim
-- says which the agent accepted, so that the worker asks for that job instead of sending
-- the request again (1.7); both may have reached the agent.
INSERT INTO service_restart_requests (service_name, status, requested_by_role, attempts,
									  next_attempt_at, deadline_at, dispatched_at)
	VALUES ('cl115', 'running', 'postgres', 1, now() - interval '1 second', now() + interval '1 hour', now()),
		   ('cl116', 'dispatching', 'postgres', 1, now() - interval '1 second', now() + interval '1 hour', NULL);
SELECT q.service_name, c.maybe_sent, c.accepted, c.url
	FROM restart_worker.worker_claim(64, '{}', 60000, false) c
	JOIN service_restart_requests q USING (id)
	WHERE q.service_name IN ('cl115', 'cl116')
	ORDER BY 1;
UPDATE service_restart_requests SET status = 'cancelled'
	WHERE service_name IN ('cl115', 'cl116');

-- When the worker next has something to do (worker_next_due()), for requests it does not
-- have in flight: cl117, accepted by its agent, past its deadline, its lease running for an
-- hour, is claimed (for a last look) only once its lease has run out: its deadline does not
-- count (1.10; before, the worker woke at once, found nothing to claim, and claimed again
-- once a second until the lease ended). cl118, never accepted, in the same state, is failed
-- by the next claim: its deadline counts. Other active requests are left out.
INSERT INTO service_restart_requests (service_name, status, requested_by_role, attempts,
									  requested_at, next_attempt_at, deadline_at, dispatched_at)
	VALUES ('cl117', 'running', 'postgres', 1, '2026-01-01 00:00:00+00',
			now() + interval '1 hour', '2026-01-01 00:01:00+00', '2026-01-01 00:00:01+00'),
		   ('cl118', 'dispatching', 'postgres', 1, '2026-01-01 00:00:00+00',
			now() + interval '1 hour', '2026-01-01 00:02:00+00', NULL);
CREATE FUNCTION pg_temp.next_due_of(p_services text[]) RETURNS text
LANGUAGE sql AS $$
	SELECT CASE restart_worker.worker_next_due(ARRAY(
				SELECT id FROM service_restart_requests
				WHERE status IN ('pending', 'dispatching', 'running')
				  AND NOT (service_name = ANY (p_services))))
		   WHEN (SELECT next_attempt_at FROM service_restart_requests
				 WHERE service_name = 'cl117' AND status = 'running') THEN 'at the lease''s end'
		   WHEN '2026-01-01 00:01:00+00' THEN 'at cl117''s deadline, past'
		   WHEN '2026-01-01 00:02:00+00' THEN 'at cl118''s deadline, past'
		   ELSE 'elsewhen' END
$$;
SELECT pg_temp.next_due_of('{cl117}') AS accepted_alone,
	   pg_temp.next_due_of('{cl117,cl118}') AS with_one_never_accepted;
UPDATE service_restart_requests SET status = 'cancelled'
	WHERE service_name IN ('cl117', 'cl118');

DELETE FROM service_restart_requests WHERE service_name LIKE 'cl%';
DELETE FROM restart_worker.services WHERE name LIKE 'cl%';
DELETE FROM restart_worker.agents WHERE name = 'clhost';
ALTER TABLE service_restart_requests RESET (autovacuum_enabled);
