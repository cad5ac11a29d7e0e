-- The registry and request administration: every check of the admin functions.
\set VERBOSITY terse

-- Agents: names, URLs and secrets are validated; NULLs get 22004.
SELECT outcome($$SELECT restart_worker.register_agent(NULL, 'http://h', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')$$);
SELECT outcome($$SELECT restart_worker.register_agent('a b', 'http://h', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')$$);
SELECT outcome($$SELECT restart_worker.register_agent('h', NULL, 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')$$);
SELECT url, outcome(format('SELECT restart_worker.register_agent(%L, %L, %L)', 'h', url,
						   'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')) AS outcome
	FROM (VALUES ('http://10.0.0.5:8787'), ('https://agent.example.com/restart'),
				 ('http://[::1]:8787'), ('unix:/run/restart-agent/agent.sock'),
				 ('ftp://h'), ('http://user:pw@h'), ('http://h/?q=1'), ('http://h/#f'),
				 ('http://h:8787 '), ('javascript:alert(1)'), ('unix:relative.sock'), (''),
				 ('http://'), ('https://-h'), ('http://h:0'), ('http://h:65535'), ('http://h:65536'),
				 ('http://h:99999/p'), ('http://[::1]:0'), ('https://[::1]:443/p')) v(url);
-- Since 1.11 an http(s) URL must be one libcurl takes, as the worker judges it before each
-- call (src/http.c): a bracketed host is an IPv6 address, not an IPv4 one nor '::1.2' (which
-- PostgreSQL's inet takes). 1.10 registered these, and every call to the agent failed at once.
SELECT url, outcome(format('SELECT restart_worker.register_agent(%L, %L, %L)', 'h', url,
						   'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')) AS outcome
	FROM (VALUES ('http://[1.2.3.4]:80'), ('http://[::1.2]:80'), ('https://[10.0.0.5]:8787/p'),
				 ('http://[:::]:8787'), ('http://[1:2:3:4:5:6:7:8:9]:8787'), ('http://[::]:8787'),
				 ('http://[::ffff:10.0.0.5]:8787'), ('http://[fe80::1]:8787')) v(url);
-- The judgement alone: libcurl's, the worker's; a unix: URL is not libcurl's (the worker
-- calls such an agent through an http URL of its own). Not for PUBLIC.
SELECT url, restart_worker.curl_url_usable(url) AS usable
	FROM (VALUES ('http://10.0.0.5:8787'), ('http://[::1]:8787/p'), ('http://[10.0.0.5]:8787'),
				 ('http://h:0'), ('http://h:65536'), ('unix:/run/restart-agent/agent.sock'),
				 (NULL)) v(url);
SELECT has_function_privilege('public', 'restart_worker.curl_url_usable(text)', 'EXECUTE') AS public_may_ask;
SELECT secret, outcome(format('SELECT restart_worker.register_agent(%L, %L, %L)', 'h',
							  'http://h', secret)) AS outcome
	FROM (VALUES ('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'),
				 ('MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'),
				 ('whsec_'),
				 ('whsec_not base64!'),
				 ('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2La'),
				 ('whsec_' || encode(sha256('a'), 'base64')),
				 ('whsec_' || replace(encode(sha512('a') || 'x', 'base64'), E'\n', '')),
				 ('whsec_' || replace(encode(sha512('a'), 'base64'), E'\n', ''))) v(secret);
SELECT outcome($$SELECT restart_worker.register_agent('h', 'http://h', NULL)$$);
-- An upsert: the second call changes the URL.
SELECT restart_worker.register_agent('h', 'http://other:9000', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT name, url FROM restart_worker.agents WHERE name = 'h';
SELECT outcome($$SELECT restart_worker.rotate_agent_secret('h', 'nope')$$);
SELECT outcome($$SELECT restart_worker.rotate_agent_secret('nobody', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')$$);
SELECT restart_worker.rotate_agent_secret('h', 'whsec_' || encode(sha256('new'), 'base64'));
SELECT secret = 'whsec_' || encode(sha256('new'), 'base64') AS rotated FROM restart_worker.agents WHERE name = 'h';

-- Services: a known agent, a sane cooldown, deadline and attempt limit.
SELECT outcome($$SELECT restart_worker.register_service('s1', 'nobody')$$);
SELECT outcome($$SELECT restart_worker.register_service('s1', 'h', '-1 minute')$$);
SELECT outcome($$SELECT restart_worker.register_service('s1', 'h', NULL)$$);
SELECT outcome($$SELECT restart_worker.register_service('s1', 'h', p_deadline := '0')$$);
-- Signs on the times reached from now: as intervals a year is 360 days, and these two
-- compared as positive.
SELECT outcome($$SELECT restart_worker.register_service('s1', 'h', p_deadline := '-1 year 360 days 1 second')$$);
SELECT outcome($$SELECT restart_worker.register_service('s1', 'h', '-1 year 361 days')$$);
-- Intervals that take a time out of the range of timestamptz (4713 BC to 294276 AD): 22023
-- naming the argument (since 1.11; before, 22008 "timestamp out of range"). A cooldown of
-- 10000 years reaches forward but not back, as every request looks back over it: 1.10 took
-- it, and the service's requests failed with 22008; a deadline of 10000 years is fine.
SELECT v.span,
	   outcome(format('SELECT restart_worker.register_service(%L, %L, %L)', 'span', 'h', v.span)) AS as_cooldown,
	   outcome(format('SELECT restart_worker.register_service(%L, %L, p_deadline := %L)', 'span', 'h', v.span)) AS as_deadline
	FROM (VALUES ('300000 years'), ('10000 years'), ('-10000 years'), ('-300000 years'),
				 ('-178956970 years -8 months'), ('178956970 years'), ('2147483647 days')) v(span);
SELECT name, cooldown, deadline FROM restart_worker.services WHERE name = 'span';
SELECT restart_worker.remove_service('span');
SELECT outcome($$SELECT restart_worker.register_service('s1', 'h', p_max_attempts := 0)$$);
SELECT outcome($$SELECT restart_worker.register_service('bad name', 'h')$$);
SELECT restart_worker.register_service('s1', 'h', '1 minute', 'first', '2 minutes', 3);
-- Optional arguments left out keep their values; the cooldown is always set.
SELECT restart_worker.register_service('s1', 'h');
SELECT name, agent, cooldown, description, deadline, max_attempts FROM restart_worker.services WHERE name = 's1';
SELECT outcome($$SELECT restart_worker.set_service_enabled('nobody', false)$$);
SELECT outcome($$SELECT restart_worker.set_service_enabled('s1', NULL)$$);

-- Removing: not an agent that still serves, not a service with an active request.
SELECT outcome($$SELECT restart_worker.remove_agent('h')$$);
SELECT outcome($$SELECT restart_worker.remove_agent('nobody')$$);
SELECT id AS s1_request FROM request_service_restart('s1') \gset
SELECT outcome($$SELECT restart_worker.remove_service('s1')$$);
SELECT outcome($$SELECT restart_worker.remove_service('nobody')$$);

-- Moving a service to another agent: allowed while its request is pending (it never
-- reached an agent), refused once it may have (dispatching, running): the new agent would
-- not know its id and run the steps again. Changing anything else stays allowed.
SELECT restart_worker.register_agent('h2', 'http://10.0.0.6:8787', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw');
SELECT restart_worker.register_service('s1', 'h2', '1 minute');
SELECT restart_worker.register_service('s1', 'h', '1 minute');
UPDATE service_restart_requests SET status = 'dispatching' WHERE id = :'s1_request';
SELECT outcome($$SELECT restart_worker.register_service('s1', 'h2', '1 minute')$$);
UPDATE service_restart_requests SET status = 'running' WHERE id = :'s1_request';
SELECT outcome($$SELECT restart_worker.register_service('s1', 'h2', '1 minute')$$);
SELECT restart_worker.register_service('s1', 'h', '1 minute', 'still on h');
SELECT agent, description FROM restart_worker.services WHERE name = 's1';
UPDATE service_restart_requests SET status = 'pending' WHERE id = :'s1_request';
SELECT restart_worker.remove_agent('h2');

-- Cancelling: only pending requests, and only existing ones.
SELECT outcome($$SELECT restart_worker.cancel_request(NULL)$$);
SELECT outcome($$SELECT restart_worker.cancel_request('00000000-0000-0000-0000-000000000000')$$);
SELECT status, error, completed_at IS NOT NULL AS ended FROM restart_worker.cancel_request(:'s1_request');
SELECT outcome(format('SELECT restart_worker.cancel_request(%L)', :'s1_request'));
SELECT restart_worker.remove_service('s1');
SELECT restart_worker.remove_agent('h');
SELECT count(*) AS history_kept FROM service_restart_requests WHERE service_name = 's1';

-- Pruning: finished requests older than the age, never active ones, never younger than a day.
SELECT outcome($$SELECT restart_worker.prune_requests('1 hour')$$);
SELECT outcome($$SELECT restart_worker.prune_requests(NULL)$$);
-- An age that compares as two days (a year as 360 days) but reaches into the future.
SELECT outcome($$SELECT restart_worker.prune_requests('-1 year 362 days')$$);
-- Ages that reach out of the range of timestamptz (since 1.11; before, 22008): back past
-- 4713 BC too long, forward past 294276 AD younger than a day.
SELECT v.age, outcome(format('SELECT restart_worker.prune_requests(%L)', v.age)) AS outcome
	FROM (VALUES ('10000 years'), ('300000 years'), ('-300000 years'), ('2147483647 days')) v(age);
SELECT status FROM request_service_restart('mqtt-subscriber');
UPDATE service_restart_requests SET requested_at = now() - interval '100 days'
	WHERE service_name IN ('s1', 'mqtt-subscriber');
SELECT restart_worker.prune_requests() AS pruned;
SELECT service_name, status FROM service_restart_requests
	WHERE service_name IN ('s1', 'mqtt-subscriber') ORDER BY 1, 2;

-- API roles can never be made admins, and anon never a requester.
SELECT outcome($$SELECT restart_worker.grant_admin('authenticated')$$);
SELECT outcome($$SELECT restart_worker.grant_requester('anon')$$);
