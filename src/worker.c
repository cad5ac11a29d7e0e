/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The background worker: registration, start-up and the main loop.
 *
 * The worker waits on one wait event set: its latch (set at COMMIT of a
 * transaction that inserted a request, see src/wake.c), postmaster death
 * and the sockets of its calls in flight.  The wait ends when the first of
 * these is due: libcurl's timer, the next retry, lease or deadline of a
 * request, or the safety-net poll.  So a request committed while calls are
 * in flight is claimed at once, and SIGTERM and SIGHUP are noticed at once.
 * Idle, the worker issues no query but the safety-net poll and writes
 * nothing.
 *
 * While the extension does not exist in its database, the worker only
 * looks for it at wake-ups and polls.  If its database cannot be connected
 * to (dropped, or a wrong restart_worker.database), the worker exits and
 * each new start waits longer before it tries again, up to five minutes.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

/*
 * Register the background worker.  Called from _PG_init while
 * shared_preload_libraries is processed.  It starts once recovery is
 * finished (never on a standby, at promotion) and is restarted 5 s after
 * it exits with an error.
 */
void
restart_worker_register(void)
{
	BackgroundWorker bgw;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = 5;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, "restart_worker");
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "restart_worker_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "restart_worker");
	snprintf(bgw.bgw_type, BGW_MAXLEN, "restart_worker");
	RegisterBackgroundWorker(&bgw);
}

/*
 * Exit callback: stop being the worker committing transactions wake.
 */
static void
worker_on_exit(int code, Datum arg)
{
	restart_worker_wake_unpublish();
	rw_status_set_state(RW_STATE_STOPPED);
}

/*
 * Connect to restart_worker.database.  After failed attempts (the
 * connection error ends the process and the postmaster starts a new one)
 * wait longer and longer first, so that a missing database does not fill
 * the log.
 */
static void
worker_connect(void)
{
	int			failures;

	SpinLockAcquire(&restart_worker_shared->mutex);
	failures = restart_worker_shared->connect_failures++;
	SpinLockRelease(&restart_worker_shared->mutex);
	if (failures > 0)
	{
		long		delay_ms = Min(300000L, 5000L << Min(failures - 1, 6));

		ereport(LOG,
				(errmsg("restart_worker: waiting %ld s before connecting to database \"%s\" again",
						delay_ms / 1000, rw_database)));
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 delay_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	BackgroundWorkerInitializeConnection(rw_database,
										 rw_role[0] != '\0' ? rw_role : NULL, 0);
	SpinLockAcquire(&restart_worker_shared->mutex);
	restart_worker_shared->connect_failures = 0;
	SpinLockRelease(&restart_worker_shared->mutex);
}

/* The latch is the first event of the wait event set. */
#define WORKER_LATCH_POS 0

/*
 * Build the wait event set: the latch, postmaster death and the sockets of
 * the calls in flight, with room for as many sockets as libcurl may watch.
 * Sockets added or changed later are updated in place, and sockets libcurl
 * let go of stay in it, parked (src/http.c); the set is built anew only
 * when a parked socket became ready or the set is full.
 */
static WaitEventSet *
worker_build_wait_set(WaitEventSet *old)
{
	WaitEventSet *set;

	if (old)
		FreeWaitEventSet(old);
#if PG_VERSION_NUM >= 170000
	set = CreateWaitEventSet(NULL, 2 + rw_http_max_sockets());
#else
	set = CreateWaitEventSet(TopMemoryContext, 2 + rw_http_max_sockets());
#endif
	if (AddWaitEventToSet(set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch,
						  NULL) != WORKER_LATCH_POS)
		elog(ERROR, "restart_worker: the latch is not the first wait event");
	AddWaitEventToSet(set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	rw_http_add_sockets(set);
	return set;
}

/*
 * Milliseconds from now until t, rounded up, at least 0.
 */
static long
worker_ms_until(TimestampTz t, TimestampTz now)
{
	if (t <= now)
		return 0;
	return (long) ((t - now + 999) / 1000);
}

/* After a failed claim: no claim before then, not even for a new request. */
static TimestampTz worker_claim_retry_at = 0;

/* Settling failed at the last claim: the worker claims nothing meanwhile. */
static bool worker_settling = false;

/*
 * How long to wait: until libcurl's timer, an outcome or after-claim work
 * to record, the deadline of a request whose long-poll is queued, the
 * safety-net poll, and, if a slot is free, the next due
 * request (neither that nor the poll before a failed claim may be tried
 * again), or, if no slot is free, the next look at deadlines (see
 * src/deadline.c), whichever is first.
 */
static long
worker_wait_timeout(TimestampTz next_due, TimestampTz last_poll)
{
	TimestampTz now = GetCurrentTimestamp();
	long		timeout;
	long		curl_ms = rw_http_timeout();

	TimestampTz calls_at = rw_dispatch_next_turn();
	TimestampTz after_claim_at = rw_after_claim_due();

	TimestampTz look_at = rw_deadline_look_at();
	TimestampTz poll_at = last_poll + (TimestampTz) rw_poll_interval * USECS_PER_SEC;

	if (rw_dispatch_free_slots() > 0)
	{
		timeout = worker_ms_until(Max(poll_at, worker_claim_retry_at), now);
		if (next_due != 0)
			timeout = Min(timeout, worker_ms_until(Max(next_due, worker_claim_retry_at), now));
	}
	else
	{
		timeout = worker_ms_until(poll_at, now);
		if (look_at != 0)
			timeout = Min(timeout, worker_ms_until(look_at, now));
	}
	if (calls_at != 0)
		timeout = Min(timeout, worker_ms_until(calls_at, now));
	if (after_claim_at != 0)
		timeout = Min(timeout, worker_ms_until(after_claim_at, now));
	if (curl_ms >= 0)
		timeout = Min(timeout, curl_ms);
	return timeout;
}

/*
 * Start the calls of the requests a claim took.  Returns the ids of those
 * that were pending, whose new status is announced once the calls are
 * sent; the others (taken over after a restart, or for a last look) were
 * announced when they left pending.
 */
static List *
worker_start_calls(List *rows)
{
	List	   *announce = NIL;
	ListCell   *lc;

	foreach(lc, rows)
	{
		RwClaimed  *row = (RwClaimed *) lfirst(lc);

		rw_dispatch_start(row);
		if (!row->maybe_sent)
			announce = lappend(announce, &row->uuid);
	}
	rw_dispatch_start_follows();
	return announce;
}

/*
 * Claim as many due requests as there are free slots, start their calls
 * and find when the next request not in flight is due; first, once in the
 * life of the server, settle what a crash may have lost of earlier claims
 * (src/settle.c: while that fails, claim nothing).  Returns false if the
 * extension does not exist (yet, or any more); calls in flight are then
 * abandoned.  A claim that failed (the error is logged) is tried again
 * later, less and less often, so that a persistent error (say, a role
 * without privileges) neither stops nor restarts the worker in a loop.
 * Recovery (taking over every request left dispatching or running) goes on
 * until a successful claim took them all; a failed claim does not end it.
 * Meanwhile claims skip the requests put back for a retry (or whose answer
 * could not be recorded) until they are due again, which would otherwise
 * be taken again at once (src/dispatch.c).
 */
static bool
worker_claim(bool *recover, TimestampTz *next_due, bool *more)
{
	static int	failures = 0;
	List	   *rows;
	List	   *announce;
	RwClaimResult result;
	TimestampTz settle_at = 0;

	worker_settling = !rw_settle(&settle_at);
	if (worker_settling)
	{
		*next_due = worker_claim_retry_at = settle_at;
		*more = false;
		return true;
	}
	result = rw_claim(rw_dispatch_free_slots(), rw_dispatch_claim_exclude(), *recover,
					  &rows, next_due, more);
	if (result == RW_CLAIM_NO_EXTENSION)
	{
		rw_dispatch_abort_all();
		rw_status_set_state(RW_STATE_NO_EXTENSION);
		return false;
	}
	if (result == RW_CLAIM_ERROR)
	{
		failures++;
		*next_due = GetCurrentTimestamp() + rw_retry_delay(failures);
		worker_claim_retry_at = *next_due;
		return true;
	}
	failures = 0;
	worker_claim_retry_at = 0;
	rw_deadline_claimed(*more);
	*recover = *recover && *more;
	if (!*recover)
		rw_dispatch_end_recovery();
	rw_status_note_poll(list_length(rows));
	announce = worker_start_calls(rows);

	/*
	 * Send the calls before anything else; announcing the requests that were
	 * pending and looking for the next due is left to the next transaction
	 * (src/claim.c), at most a few milliseconds later.  A claim cut short by
	 * the free slots looks for none: the next claim comes as soon as a slot
	 * is free, and does.  A request then found
	 * due committed after the claim's snapshot (its wake-up may even have
	 * been lost: waiting for a synchronous standby resets the latch), so the
	 * next turn claims it.
	 */
	if (*next_due == RW_NEXT_DUE_UNKNOWN)
	{
		rw_http_timer_event();
		rw_after_claim_defer(announce, !*more);
		*next_due = 0;
		return true;
	}

	/*
	 * Nothing was claimed, yet a row is due: someone holds its lock (locked
	 * rows are skipped, never waited for).  Look again in a second.
	 */
	if (!*more && *next_due != 0 && *next_due <= GetCurrentTimestamp())
		*next_due = GetCurrentTimestamp() + USECS_PER_SEC;
	return true;
}

/*
 * Whether the worker may claim now: a slot is free, and no failed claim
 * asks it to wait (a new request does not make it try again sooner, or a
 * persistent error would be logged once per request).
 */
static bool
worker_may_claim(void)
{
	return rw_dispatch_free_slots() > 0 &&
		(worker_claim_retry_at == 0 || GetCurrentTimestamp() >= worker_claim_retry_at);
}

/*
 * Handle the n events of one look at the wait event set: sockets of calls
 * in flight go to libcurl.  Returns true if the latch was among them (it is
 * then reset).
 */
static bool
worker_handle_events(WaitEvent *events, int n)
{
	bool		latched = false;
	int			i;

	for (i = 0; i < n; i++)
	{
		if (events[i].events & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			latched = true;
		}
		else if (events[i].events & (WL_SOCKET_READABLE | WL_SOCKET_WRITEABLE))
			rw_http_socket_event(events[i].fd, events[i].events);
	}
	return latched;
}

/*
 * Look at the sockets of the calls in flight without waiting, the latch
 * left out.  In PostgreSQL 15 and 16 (13 to 16 at least; 18 no longer),
 * WaitEventSetWait() reports a latch that is set alone, without looking at
 * the sockets.  In a stream of requests each commit sets the latch, and
 * when commits come faster than the worker's turns, no call in flight would
 * move on (a connection made is never seen ready, an answer never read)
 * until the stream pauses: the calls of (b) in bench/run waited up to 50 ms
 * so.  The latch is disabled for this look (since PostgreSQL 14; before,
 * it was reset when reported, and the look ends early if it is set again
 * meanwhile); set meanwhile, it stays set for the next wait.  The caller
 * already knows the latch was set.  Where WaitEventSetWait() looks at the
 * sockets anyway, this look costs one system call that finds nothing new.
 */
static void
worker_look_at_sockets(WaitEventSet *set)
{
	WaitEvent	events[64];
	int			n;

#if PG_VERSION_NUM >= 140000
	ModifyWaitEvent(set, WORKER_LATCH_POS, WL_LATCH_SET, NULL);
#endif
	n = WaitEventSetWait(set, 0, events, lengthof(events), PG_WAIT_EXTENSION);
#if PG_VERSION_NUM >= 140000
	ModifyWaitEvent(set, WORKER_LATCH_POS, WL_LATCH_SET, MyLatch);
#endif
	(void) worker_handle_events(events, n);
}

/*
 * Wait for the next event and handle what woke us: the latch (a new
 * request, or a signal), or sockets of calls in flight.  Returns true if
 * the latch was set.
 */
static bool
worker_wait(WaitEventSet **set, long timeout)
{
	WaitEvent	events[64];
	bool		latched;
	int			n;

	if (*set == NULL || rw_http_wait_set_stale() || !rw_http_update_sockets(*set))
		*set = worker_build_wait_set(*set);
	n = WaitEventSetWait(*set, timeout, events, lengthof(events), PG_WAIT_EXTENSION);
	latched = worker_handle_events(events, n);
	if (latched && n == 1 && rw_dispatch_in_flight() > 0)
		worker_look_at_sockets(*set);
	rw_http_timer_event();
	return latched;
}

/*
 * What the main loop carries from one turn to the next.
 */
typedef struct WorkerLoop
{
	WaitEventSet *set;			/* latch, postmaster death, sockets */
	TimestampTz next_due;		/* when the next request not in flight is due */
	TimestampTz last_poll;		/* the last claim, or look for lost wake-ups */
	uint64		wakes_seen;		/* wake-ups counted at the last claim */
	bool		need_claim;		/* woken, or something came due */
	bool		recover;		/* still taking over a crash's requests */
	bool		extension_seen; /* the last claim found the extension */
	bool		more;			/* the last claim left due requests behind */
	bool		more_done;		/* work is left: the next wait must not block */
	bool		deferred;		/* outcomes were left for this turn */
	bool		woken;			/* the latch was set at the last wait */
	bool		freed;			/* a slot was freed at the last turn */
} WorkerLoop;

/*
 * First part of a turn: claim if woken, at the safety-net poll or when a
 * request is due, as long as a slot is free.  With no slot free, requests
 * waiting for one still end at their deadline (src/deadline.c): the poll
 * is such a look, and so is a slot freed without a claim (a request put
 * back while a lowered max_in_flight keeps every slot busy).
 */
static void
worker_turn_claim(WorkerLoop *w)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		poll_due;

	poll_due = now >= w->last_poll + (TimestampTz) rw_poll_interval * USECS_PER_SEC;
	if ((w->next_due != 0 && w->next_due <= now) || poll_due)
		w->need_claim = true;
	if (w->need_claim && worker_may_claim())
	{
		w->wakes_seen = restart_worker_wake_count();
		w->extension_seen = worker_claim(&w->recover, &w->next_due, &w->more);
		w->last_poll = now;
		w->need_claim = false;
	}
	else if (rw_dispatch_free_slots() == 0)
	{
		rw_deadline_blocked(w->woken || poll_due || w->freed);
		if (poll_due)
			w->last_poll = now;
		if (rw_deadline_look_due())
			rw_deadline_look(rw_dispatch_ids());
	}
	w->woken = w->freed = false;
	rw_status_set_state(!w->extension_seen ? RW_STATE_NO_EXTENSION :
						worker_settling ? RW_STATE_SETTLING :
						rw_dispatch_in_flight() > 0 ? RW_STATE_BUSY : RW_STATE_IDLE);
}

/*
 * Second part of a turn: wait until something is due, or not at all when
 * work is left over.  A wake-up used up inside a transaction (see
 * src/wake.c) counts as one.
 */
static void
worker_turn_wait(WorkerLoop *w)
{
	long		timeout;

	if (worker_may_claim() && restart_worker_wake_count() != w->wakes_seen)
		w->more_done = w->need_claim = true;
	timeout = w->more_done ? 0 : worker_wait_timeout(w->next_due, w->last_poll);
	if (worker_wait(&w->set, timeout))
	{
		rw_status_note_wake();
		w->need_claim = w->woken = true;
	}
}

/*
 * Last part of a turn: record the outcomes of finished calls, and find when
 * the next retry is due.  A request that just committed is claimed first:
 * the outcomes wait for the next turn, but never two turns in a row, so
 * that a stream of commits cannot hold them (and the long-polls they
 * start) back.
 */
static void
worker_turn_finish(WorkerLoop *w)
{
	TimestampTz retry_at = 0;

	if (w->need_claim && worker_may_claim() && !w->deferred)
	{
		w->more_done = true;
		w->deferred = true;
	}
	else
	{
		w->deferred = false;
		if (rw_dispatch_finish(&retry_at, &w->more_done))
		{
			w->need_claim |= w->more;
			w->freed = true;	/* what is in flight changed */
		}
	}
	rw_after_claim_next_due(&w->next_due);
	if (retry_at != 0 && (w->next_due == 0 || retry_at < w->next_due))
		w->next_due = retry_at;
}

/*
 * The main loop.  Each turn claims when woken, when a request is due and
 * at the safety-net poll, waits, and records outcomes as calls finish.
 */
static void
worker_loop(void)
{
	MemoryContext loopcxt = AllocSetContextCreate(TopMemoryContext,
												  "restart_worker loop",
												  ALLOCSET_DEFAULT_SIZES);
	WorkerLoop	w;

	memset(&w, 0, sizeof(w));
	w.need_claim = true;
	w.recover = true;
	for (;;)
	{
		MemoryContextReset(loopcxt);
		MemoryContextSwitchTo(loopcxt);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			rw_http_configure();
		}
		worker_turn_claim(&w);
		worker_turn_wait(&w);
		worker_turn_finish(&w);
	}
}

/*
 * Pin the settings the worker's session is written for, whatever the
 * cluster, the database or the worker's role says (a session setting
 * outranks those, also after a reload).
 *
 * - synchronous_commit off: claims and outcomes lost in a crash are redone
 *   with the same id (see src/settle.c and src/xact.c); what must not be
 *   lost commits synchronously with a transaction-local setting.
 * - lock_timeout 1s: the worker never waits long for a lock.
 * - enable_seqscan off: every query of the worker has an index to use.
 *   Their plans are kept for the life of the worker: one made while the
 *   requests table was nearly empty would otherwise scan it whole once it
 *   has grown, until the next ANALYZE.
 * - READ COMMITTED: a claim skips the rows others hold and takes the rest
 *   as they are now.  Under REPEATABLE READ or SERIALIZABLE the claims and
 *   records failed to serialise whenever a caller touched a row meanwhile,
 *   and serializable ones took part in the callers' conflict checks.
 * - standard_conforming_strings: the extension's PL/pgSQL that the worker
 *   runs is parsed in its session, and its literals are written for it
 *   ('\d' in a pattern).
 * - exit_on_error off: the worker catches errors on purpose (an answer
 *   that is not JSON, a row that is locked); made FATAL, each exited it.
 * - row_security on: a worker role that is no superuser reads and writes
 *   the requests through the policies granted to it; with it off every
 *   claim failed.
 * - session_replication_role origin: the triggers that announce each
 *   status change fire for the worker's updates.
 * - transaction_timeout 0 (PostgreSQL 17 and later, untested here): it
 *   applies to a background worker's transactions too, and ends the
 *   process (FATAL) when one runs over, as a lock wait or a flush may.
 * - jit off: the worker's statements touch a few rows each.  A plan with
 *   a disabled scan (enable_seqscan is off) costs over jit_above_cost
 *   however small the table, and each run was compiled anew: a second of
 *   CPU a claim here with a worker role that is no superuser before 1.12,
 *   whose claim's update scanned the table under row level security.
 *
 * - application_name restart_worker, in pg_stat_activity.
 *
 * default_transaction_read_only is left as it is: a database made
 * read-only gets no writes from the worker.
 */
static void
worker_pin_settings(void)
{
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("lock_timeout", "1s", PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("enable_seqscan", "off", PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("default_transaction_isolation", "read committed",
					PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("standard_conforming_strings", "on", PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("exit_on_error", "off", PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("row_security", "on", PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("session_replication_role", "origin", PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_SESSION);
#if PG_VERSION_NUM >= 170000
	SetConfigOption("transaction_timeout", "0", PGC_SUSET, PGC_S_SESSION);
#endif
	SetConfigOption("application_name", "restart_worker", PGC_USERSET, PGC_S_OVERRIDE);
}

/*
 * Entry point of the background worker.
 */
void
restart_worker_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	rw_status_set_state(RW_STATE_STARTING);
	rw_settle_note_start();

	worker_connect();
	before_shmem_exit(worker_on_exit, (Datum) 0);
	restart_worker_wake_publish();
	rw_status_worker_started();

	worker_pin_settings();
	rw_encoding_init();
	rw_http_init();
	rw_dispatch_init();
	ereport(LOG,
			(errmsg("restart_worker: started in database \"%s\"", rw_database)));
	worker_loop();
}
