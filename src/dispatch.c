/*-------------------------------------------------------------------------
 *
 * dispatch.c
 *		The requests the worker has in flight: one call slot each.
 *
 * A claimed request takes a slot and stays in it while the worker calls
 * its agent: the POST, then long-polls while the job runs.  Its outcome
 * is recorded after each call (src/record.c), in one transaction with the
 * outcomes of the other calls that ended by the same turn of the worker's
 * loop; the slot is freed when the request ends or is put back for a later
 * attempt.  The number of slots in
 * use is bounded by restart_worker.max_in_flight, which bounds the
 * worker's sockets.
 *
 * The agent holds its answer to the POST for a moment while the job runs
 * (src/http.c), so that a quick job's 202 tells its end: it is recorded
 * like any final answer.  A 202 of a job that still runs (a longer job, or
 * an agent that answers at once) is not recorded at once: the job is
 * followed right away, and the 202 is recorded together with that
 * long-poll's answer, in one transaction, if it comes within
 * DISPATCH_HOLD_MS of the long-poll's start, else on its own then (and
 * within DISPATCH_HOLD_MAX_MS of the 202 in any case: a long-poll may wait
 * for its turn).  Either way a job that ends quickly costs the worker one
 * transaction; the row still goes through running (announced), and
 * dispatched_at is when the 202 came.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

#define RW_MAX_SLOTS 512
#define DISPATCH_HOLD_MS 20
#define DISPATCH_HOLD_MAX_MS 1000

static RwCall *dispatch_slots = NULL;
static int	dispatch_in_flight = 0;
static uint64 dispatch_follow_seq = 0;	/* the last long-poll queued */
static MemoryContext dispatch_cxt = NULL;

/*
 * While the worker takes over what the worker before it left (recovery,
 * see worker_claim() in src/worker.c), the requests it has put back since
 * it started (DispatchPutBack, in dispatch_cxt), each until it is due
 * again.  Recovery claims take every request left dispatching or running
 * whatever its lease or backoff, and would take these again at once: with
 * fewer slots than requests to take over, an agent that was down used up
 * every attempt of its requests within a second.  Claims skip each until
 * then, not until recovery ends: a recovery that goes on (each claim takes
 * as many as there are free slots, say calls to an agent that does not
 * answer) would otherwise keep a request whose backoff ended behind every
 * other request left over, and one past its deadline from being failed.
 */
typedef struct DispatchPutBack
{
	pg_uuid_t	uuid;
	TimestampTz until;			/* when it is due again */
} DispatchPutBack;

static bool dispatch_recovering = true;
static List *dispatch_put_back = NIL;

static void dispatch_follow(RwCall *call);

/*
 * Allocate the call slots, once, for the largest max_in_flight allowed, so
 * that a reload can raise it.
 */
void
rw_dispatch_init(void)
{
	dispatch_cxt = AllocSetContextCreate(TopMemoryContext,
										 "restart_worker calls",
										 ALLOCSET_DEFAULT_SIZES);
	dispatch_slots = MemoryContextAllocZero(dispatch_cxt,
											sizeof(RwCall) * RW_MAX_SLOTS);
}

/*
 * How many more requests the worker may take now.
 */
int
rw_dispatch_free_slots(void)
{
	int			limit = Min(rw_max_in_flight, RW_MAX_SLOTS);

	return dispatch_in_flight >= limit ? 0 : limit - dispatch_in_flight;
}

/*
 * How many requests are in flight.
 */
int
rw_dispatch_in_flight(void)
{
	return dispatch_in_flight;
}

/*
 * The ids of the requests in flight (pointers to their pg_uuid_t), so that
 * claims skip them.
 */
List *
rw_dispatch_ids(void)
{
	List	   *ids = NIL;
	int			i;

	for (i = 0; i < RW_MAX_SLOTS; i++)
		if (dispatch_slots[i].in_use)
			ids = lappend(ids, &dispatch_slots[i].uuid);
	return ids;
}

/*
 * The ids a claim skips (pointers to pg_uuid_t): the requests in flight
 * and, while the worker recovers, those it put back since it started that
 * are not due again yet (see dispatch_put_back); those due are forgotten.
 */
List *
rw_dispatch_claim_exclude(void)
{
	List	   *ids = rw_dispatch_ids();
	TimestampTz now = GetCurrentTimestamp();
	ListCell   *lc;

	if (!dispatch_recovering)
		return ids;
	foreach(lc, dispatch_put_back)
	{
		DispatchPutBack *p = (DispatchPutBack *) lfirst(lc);

		if (p->until > now)
			ids = lappend(ids, &p->uuid);
		else
		{
			dispatch_put_back = foreach_delete_current(dispatch_put_back, lc);
			pfree(p);
		}
	}
	return ids;
}

/*
 * Recovery has ended (a claim took every request left over): from now on
 * a request put back waits for its backoff or lease like any other, so
 * claims need not skip it.
 */
void
rw_dispatch_end_recovery(void)
{
	dispatch_recovering = false;
	list_free_deep(dispatch_put_back);
	dispatch_put_back = NIL;
}

/*
 * Remember, while the worker recovers, that the request of call was put
 * back until until (see dispatch_put_back).
 */
static void
dispatch_note_put_back(RwCall *call, TimestampTz until)
{
	MemoryContext old;
	DispatchPutBack *p;

	if (!dispatch_recovering)
		return;
	old = MemoryContextSwitchTo(dispatch_cxt);
	p = palloc(sizeof(DispatchPutBack));
	p->uuid = call->uuid;
	p->until = until;
	dispatch_put_back = lappend(dispatch_put_back, p);
	MemoryContextSwitchTo(old);
}

/*
 * Free a slot and what its call allocated.
 */
static void
dispatch_release(RwCall *call)
{
	if (call->url)
		pfree(call->url);
	if (call->body)
		pfree(call->body);
	if (call->resp)
		free(call->resp);
	if (call->held_resp)
		free(call->held_resp);
	memset(call, 0, sizeof(RwCall));
	dispatch_in_flight--;
	rw_status_set_in_flight(dispatch_in_flight);
	/* After a reload lowered max_in_flight, the connections follow. */
	if (dispatch_in_flight >= rw_max_in_flight)
		rw_http_configure();
}

/*
 * How many long-polls to an agent may be in flight at once: one less than
 * the connections to it, so that a new request's POST always finds a
 * connection instead of waiting behind jobs that run long.
 */
static int
dispatch_follow_limit(void)
{
	return Max(1, rw_max_connections_per_agent - 1);
}

/*
 * Whether a POST to the agent at url may ask it to hold the answer while
 * the job runs: not once its long-polls take every connection they may,
 * when the POSTs to it share what is left and each held answer would hold
 * up the next POST.
 */
static bool
dispatch_post_may_wait(const char *url)
{
	int			n = 0;
	int			i;

	for (i = 0; i < RW_MAX_SLOTS; i++)
	{
		RwCall	   *call = &dispatch_slots[i];

		if (call->in_use && call->following && call->easy != NULL &&
			strcmp(call->url, url) == 0)
			n++;
	}
	return n < dispatch_follow_limit();
}

/*
 * Take a free slot for a claimed request and fill in what its calls need
 * whatever their outcome.  The worker claims no more requests than there
 * are free slots, so one is always found.
 */
static RwCall *
dispatch_take_slot(RwClaimed *row)
{
	RwCall	   *call = NULL;
	int			i;

	for (i = 0; i < RW_MAX_SLOTS; i++)
		if (!dispatch_slots[i].in_use)
		{
			call = &dispatch_slots[i];
			break;
		}
	if (call == NULL)
		elog(ERROR, "restart_worker: no free call slot");

	call->in_use = true;
	dispatch_in_flight++;
	rw_status_set_in_flight(dispatch_in_flight);
	strlcpy(call->id, row->id, sizeof(call->id));
	call->uuid = row->uuid;
	call->deadline = row->deadline;
	call->maybe_sent = row->maybe_sent;
	call->following = false;
	call->follow_seq = 0;
	call->record_at = 0;
	call->record_tries = 0;
	return call;
}

/*
 * Take a slot for a claimed request and start the POST to its agent, or,
 * for a request the agent accepted already, queue the long-poll of its job
 * (rw_dispatch_start_follows() starts it): sent again, a request whose id
 * the agent no longer knows (its journal lost, the job pruned) would run
 * its steps again, where asking for the job gets a 404.
 */
void
rw_dispatch_start(RwClaimed *row)
{
	RwCall	   *call = dispatch_take_slot(row);

	if (row->url == NULL || row->key == NULL ||
		VARSIZE_ANY_EXHDR(row->key) > (int) sizeof(call->key))
	{
		call->url = MemoryContextStrdup(dispatch_cxt, "");
		call->body = MemoryContextStrdup(dispatch_cxt, "");
		rw_http_fail(call, RW_CALL_UNREGISTERED,
					 "the service or its agent is no longer registered");
		return;
	}
	call->url = MemoryContextStrdup(dispatch_cxt, row->url);
	call->body = MemoryContextStrdup(dispatch_cxt, row->body);
	call->keylen = VARSIZE_ANY_EXHDR(row->key);
	memcpy(call->key, VARDATA_ANY(row->key), call->keylen);
	if (!rw_http_url_usable(call->url))
	{
		rw_http_fail(call, RW_CALL_URL, "libcurl refuses the agent's URL, or its port is 0");
		return;
	}
	if (row->accepted)
		dispatch_follow(call);
	else if (call->deadline <= GetCurrentTimestamp())
	{
		/*
		 * The claim took the request before its deadline, judged when its
		 * transaction began; its commit can take long (a synchronous one
		 * waits for the synchronous standbys), and the deadline passed
		 * meanwhile.  Sent now, with no time left, the agent would accept it
		 * and run its steps after the deadline.  It times out unsent.
		 */
		rw_http_fail(call, RW_CALL_TIMEOUT,
					 "the request's deadline passed before its call could be sent");
	}
	else
	{
		call->post_wait = dispatch_post_may_wait(call->url);
		rw_http_start(call);
	}
}

/*
 * Long-polls in flight to one agent, while queued ones are started.
 */
typedef struct DispatchAgentFollows
{
	const char *url;
	int			n;
} DispatchAgentFollows;

/*
 * The counter of the agent at url in agents[] (*nagents in use), added if
 * missing.  Agents are few, so a linear look-up is cheapest; the caller
 * has room for one agent per slot.
 */
static DispatchAgentFollows *
dispatch_agent_follows(DispatchAgentFollows *agents, int *nagents, const char *url)
{
	int			i;

	for (i = 0; i < *nagents; i++)
		if (strcmp(agents[i].url, url) == 0)
			return &agents[i];
	agents[*nagents].url = url;
	agents[*nagents].n = 0;
	return &agents[(*nagents)++];
}

/*
 * Queue the long-poll of a running job at the back of its agent's queue;
 * rw_dispatch_start_follows() starts it when its turn comes.  A job
 * whose long-poll has just answered "running" queues behind those already
 * waiting, so that every running job is polled in turn and none waits
 * behind another that runs long.
 */
static void
dispatch_follow(RwCall *call)
{
	call->following = true;
	call->follow_seq = ++dispatch_follow_seq;
}

/*
 * qsort comparator: queued long-polls, the longest waiting first.
 */
static int
dispatch_queue_cmp(const void *a, const void *b)
{
	const RwCall *ca = *(RwCall *const *) a;
	const RwCall *cb = *(RwCall *const *) b;

	if (ca->follow_seq != cb->follow_seq)
		return ca->follow_seq < cb->follow_seq ? -1 : 1;
	return 0;
}

/*
 * Start queued long-polls whose agent has room for them, in the order they
 * were queued: the longest waiting of each agent goes first.  The
 * long-polls in flight are counted per agent once, so that a burst of
 * running jobs costs one pass over the slots, not one per job.  Called
 * after each claim (for requests the agent had accepted) and after the
 * outcomes of each turn are recorded.
 */
void
rw_dispatch_start_follows(void)
{
	RwCall	   *queued[RW_MAX_SLOTS];
	DispatchAgentFollows agents[RW_MAX_SLOTS];
	TimestampTz now = GetCurrentTimestamp();
	int			nagents = 0;
	int			n = 0;
	int			i;

	for (i = 0; i < RW_MAX_SLOTS; i++)
	{
		RwCall	   *call = &dispatch_slots[i];

		if (!call->in_use)
			continue;
		if (call->follow_seq != 0)
			queued[n++] = call;
		else if (call->following && call->easy != NULL)
			dispatch_agent_follows(agents, &nagents, call->url)->n++;
	}
	if (n > 1)
		qsort(queued, n, sizeof(RwCall *), dispatch_queue_cmp);
	for (i = 0; i < n; i++)
	{
		RwCall	   *call = queued[i];
		DispatchAgentFollows *agent = dispatch_agent_follows(agents, &nagents, call->url);

		/*
		 * One past its request's deadline starts anyway, asking the agent not
		 * to wait: its answer ends the request (as the job ended, or timed
		 * out) now, not once a long-poll ahead of it came back.
		 */
		if (agent->n >= dispatch_follow_limit() && call->deadline > now)
			continue;
		call->follow_seq = 0;
		rw_http_start(call);
		if (call->easy != NULL)
			agent->n++;
		if (call->held_resp != NULL)
			call->record_at = Min(call->record_at,
								  GetCurrentTimestamp() + DISPATCH_HOLD_MS * 1000);
	}
}

/*
 * Hold the answer of a call that is a 202 to a POST whose job still runs:
 * follow the job at once and record the 202 with the next answer (see the
 * head comment).  Returns false if the call is something else, such as a
 * 202 that already tells the job's end (the agent held the POST's answer
 * while a quick job ran).
 */
static bool
dispatch_hold(RwCall *call)
{
	if (call->following || call->kind != RW_CALL_ANSWER ||
		call->http_status != 202 || call->resp == NULL ||
		!rw_job_running(call->id, call->resp, call->resp_len))
		return false;
	call->held_resp = call->resp;
	call->held_len = call->resp_len;
	call->resp = NULL;
	call->resp_len = 0;
	call->unrecorded = false;
	call->accepted_at = GetCurrentTimestamp();
	call->record_at = call->accepted_at + DISPATCH_HOLD_MAX_MS * 1000;
	call->maybe_sent = true;
	call->record_tries = 0;
	dispatch_follow(call);
	return true;
}

/*
 * Fill *held with call, its answer replaced by the 202 it holds.
 */
static void
dispatch_held_answer(RwCall *call, RwCall *held)
{
	*held = *call;
	held->following = false;
	held->resp = call->held_resp;
	held->resp_len = call->held_len;
	held->resp_too_big = false;
	held->http_status = 202;
	held->kind = RW_CALL_ANSWER;
	held->sent = true;
}

/*
 * Fill *rec with what is due to be recorded for a request: its held 202
 * (copied to *held) and the answer of its finished call, or either alone.
 */
static void
dispatch_prepare(RwCall *call, RwCall *held, RwRecord *rec)
{
	bool		holding = call->held_resp != NULL;

	call->record_at = 0;
	if (holding)
		dispatch_held_answer(call, held);
	rec->first = holding ? held : call;
	rec->second = holding && call->unrecorded ? call : NULL;
	rec->accepted_at = call->accepted_at;
}

/*
 * Move a request on after its answers were recorded (see
 * dispatch_prepare()) with this outcome: a running job is followed with a
 * long-poll, a locked row is recorded again a little later, anything else
 * frees the slot (and drops a long-poll still on its way).  Lowers *next_at
 * to the earliest retry put back.  Returns true if the slot was freed.
 */
static bool
dispatch_recorded(RwCall *call, RwOutcome outcome, TimestampTz at,
				  TimestampTz *next_at)
{
	bool		finished = call->unrecorded;

	if (outcome == RW_OUTCOME_LOCKED)
	{
		/* Never wait for a row lock: try again, less and less often. */
		call->record_tries++;
		call->record_at = GetCurrentTimestamp() +
			(TimestampTz) Min(100L << Min(call->record_tries, 6), 5000L) * 1000;
		return false;
	}
	if (call->held_resp != NULL)
	{
		free(call->held_resp);
		call->held_resp = NULL;
		call->held_len = 0;
	}
	call->accepted_at = 0;
	call->unrecorded = false;
	if (outcome == RW_OUTCOME_FOLLOW)
	{
		/* A job that runs: follow it (unless a long-poll is on its way). */
		call->maybe_sent = true;
		call->record_tries = 0;
		if (finished)
			dispatch_follow(call);
		return false;
	}
	if (outcome == RW_OUTCOME_RETRY)
		dispatch_note_put_back(call, at != 0 ? at :
							   GetCurrentTimestamp() + (TimestampTz) rw_lease_ms() * 1000);
	if (outcome == RW_OUTCOME_RETRY && at != 0 && (*next_at == 0 || at < *next_at))
		*next_at = at;
	if (outcome == RW_OUTCOME_ERROR)
	{
		/*
		 * Not recorded (the error is logged): the request's lease brings it
		 * back (while the worker recovers, too, see dispatch_put_back; its
		 * claim began the lease, so it has ended by then).  It is no longer
		 * in flight, so the next look for what is due finds when; look in a
		 * second rather than at the safety-net poll.
		 */
		dispatch_note_put_back(call, GetCurrentTimestamp() +
							   (TimestampTz) rw_lease_ms() * 1000);
		at = GetCurrentTimestamp() + USECS_PER_SEC;
		if (*next_at == 0 || at < *next_at)
			*next_at = at;
	}
	rw_http_abort(call);
	dispatch_release(call);
	return true;
}

/*
 * Record what is due for the requests in calls[] (n of them), together
 * (src/record.c), and move each on.  Lowers *next_at to the earliest retry
 * put back.  Returns true if a slot was freed.
 */
static bool
dispatch_record(RwCall **calls, int n, TimestampTz *next_at)
{
	RwRecord   *records;
	RwCall	   *helds;
	bool		freed = false;
	int			i;

	if (n == 0)
		return false;
	records = palloc0(sizeof(RwRecord) * n);
	helds = palloc(sizeof(RwCall) * n);
	for (i = 0; i < n; i++)
		dispatch_prepare(calls[i], &helds[i], &records[i]);
	rw_record_all(records, n);
	for (i = 0; i < n; i++)
		freed |= dispatch_recorded(calls[i], records[i].outcome, records[i].next_at,
								   next_at);
	pfree(records);
	pfree(helds);
	return freed;
}

/*
 * Record the outcome of every finished call, held 202s when they are due,
 * and again those whose row was locked, all in one transaction.  Lowers
 * *next_at to the earliest retry put back.  Returns true if a slot was
 * freed.  A new request comes first: when the worker's latch is set (a
 * request committed) it takes no more finished calls, so that the worker
 * claims the request soon, and says so in *more_done.
 */
bool
rw_dispatch_finish(TimestampTz *next_at, bool *more_done)
{
	RwCall	   *due[RW_MAX_SLOTS];
	RwCall	   *call;
	TimestampTz now = GetCurrentTimestamp();
	bool		freed;
	int			n = 0;
	int			i;

	*more_done = false;
	while ((call = rw_http_next_done()) != NULL)
	{
		call->unrecorded = true;
		if (!dispatch_hold(call))
		{
			call->record_at = 0;
			due[n++] = call;
		}
		if (MyLatch->is_set)
		{
			*more_done = true;
			break;
		}
	}
	for (i = 0; i < RW_MAX_SLOTS; i++)
	{
		call = &dispatch_slots[i];
		if (call->in_use && call->record_at != 0 && call->record_at <= now)
			due[n++] = call;
	}
	freed = dispatch_record(due, n, next_at);
	rw_dispatch_start_follows();
	return freed;
}

/*
 * When the calls need a turn of the worker that no socket or timer of
 * libcurl brings, or 0 if none does: the earliest outcome that found its
 * row locked, or held 202, to be recorded, and the earliest deadline of a
 * request whose long-poll waits in the queue (it then starts, see
 * rw_dispatch_start_follows()).
 */
TimestampTz
rw_dispatch_next_turn(void)
{
	TimestampTz next = 0;
	int			i;

	for (i = 0; i < RW_MAX_SLOTS; i++)
	{
		RwCall	   *call = &dispatch_slots[i];
		TimestampTz at;

		if (!call->in_use)
			continue;
		at = call->record_at;
		if (call->follow_seq != 0 && (at == 0 || call->deadline < at))
			at = call->deadline;
		if (at != 0 && (next == 0 || at < next))
			next = at;
	}
	return next;
}

/*
 * Abandon every call in flight, e.g. when the extension was dropped.
 */
void
rw_dispatch_abort_all(void)
{
	int			i;

	for (i = 0; i < RW_MAX_SLOTS; i++)
		if (dispatch_slots[i].in_use)
		{
			rw_http_abort(&dispatch_slots[i]);
			dispatch_release(&dispatch_slots[i]);
		}
}
