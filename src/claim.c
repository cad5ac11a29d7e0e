/*-------------------------------------------------------------------------
 *
 * claim.c
 *		The worker's short transactions: claim due requests, record what an
 *		agent answered.
 *
 * Each runs in a transaction of its own that commits before any network
 * I/O; no snapshot is held across a call to an agent.  The policy (which
 * answers are retried, backoff, deadline, lease) is in SQL, in
 * src/sql/50_worker.sql; answers are parsed there with jsonb.
 *
 * Outcomes are committed asynchronously (synchronous_commit = off, set in
 * src/worker.c): an outcome lost in a crash is redone with the same request
 * id, and the agent answers a repeated id with the existing job, so nothing
 * runs twice.  A claim commits synchronously: once a request may be sent,
 * its row must never be found pending (cancellable) again after a crash.
 *
 * An error in these transactions (a bad answer the SQL did not expect, a
 * missing privilege, a lock timeout) is logged and the transaction rolled
 * back; the worker goes on instead of exiting and restarting in a loop.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

/* The worker's statements, prepared once (see claim_plan()). */
static SPIPlanPtr claim_plan_claim = NULL;
static SPIPlanPtr claim_plan_next_due = NULL;
static SPIPlanPtr claim_plan_record = NULL;
static SPIPlanPtr claim_plan_record_job = NULL;
static SPIPlanPtr claim_plan_announce = NULL;

/*
 * Start a short transaction with SPI and a snapshot, and say so in
 * pg_stat_activity.
 */
static void
claim_begin(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "restart_worker: SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

/*
 * Commit the short transaction started by claim_begin().
 */
static void
claim_end(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * After an error in a short transaction: log it, roll the transaction back
 * and go back to the caller's memory context, so that the worker can go on.
 */
static void
claim_recover(MemoryContext cxt)
{
	HOLD_INTERRUPTS();
	MemoryContextSwitchTo(cxt);
	EmitErrorReport();
	AbortCurrentTransaction();
	FlushErrorState();
	pgstat_report_activity(STATE_IDLE, NULL);
	RESUME_INTERRUPTS();
	MemoryContextSwitchTo(cxt);
}

/*
 * Whether the extension exists in the worker's database.  A catalog
 * look-up, no query: cheap enough for every wake-up.
 */
static bool
claim_extension_exists(void)
{
	return OidIsValid(get_extension_oid("restart_worker", true));
}

/*
 * Whether the extension's SQL is what this build calls.  After a new build
 * is installed, and until ALTER EXTENSION restart_worker UPDATE, the worker
 * claims nothing (it would send calls whose answers it could not record)
 * and says so in the log once.  worker_record_job() is new in 1.1; once it
 * is found for an extension, that extension is taken as current.
 */
static bool
claim_extension_current(void)
{
	static Oid	current = InvalidOid;
	static bool logged = false;
	Oid			ext = get_extension_oid("restart_worker", true);
	Oid			types[10] = {UUIDOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	INT4OID, TEXTOID, TEXTOID, INT4OID, TIMESTAMPTZOID, BOOLOID};

	if (!OidIsValid(ext) || ext == current)
		return OidIsValid(ext);
	if (OidIsValid(LookupFuncName(list_make2(makeString(pstrdup("restart_worker")),
											 makeString(pstrdup("worker_record_job"))),
								  10, types, true)))
	{
		current = ext;
		logged = false;
		return true;
	}
	if (!logged)
		ereport(LOG,
				(errmsg("restart_worker: the extension in database \"%s\" is older than this build; "
						"no request is sent until ALTER EXTENSION restart_worker UPDATE",
						rw_database)));
	logged = true;
	return false;
}

/*
 * The lease a claimed request gets: longer than any call the worker makes,
 * so that it is only taken over when the worker forgot it.
 */
static int
claim_lease_ms(void)
{
	return rw_request_timeout + rw_follow_wait * 1000 + 60000;
}

/*
 * The saved plan of one of the worker's queries, prepared at its first use
 * and kept for the life of the worker, so that each short transaction does
 * not parse and plan its statement again.  The plan cache re-plans it when
 * the functions it calls change (DROP and CREATE EXTENSION).
 */
static SPIPlanPtr
claim_plan(SPIPlanPtr *plan, const char *query, int nargs, Oid *types)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(query, nargs, types);

		if (p == NULL || SPI_keepplan(p) != 0)
			elog(ERROR, "restart_worker: could not prepare \"%s\": %s",
				 query, SPI_result_code_string(SPI_result));
		*plan = p;
	}
	return *plan;
}

/*
 * A list of request ids as a uuid[] literal.
 */
static Datum
claim_ids_array(List *ids)
{
	StringInfoData buf;
	ListCell   *lc;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	foreach(lc, ids)
	{
		if (buf.len > 1)
			appendStringInfoChar(&buf, ',');
		appendStringInfoString(&buf, (char *) lfirst(lc));
	}
	appendStringInfoChar(&buf, '}');
	return CStringGetTextDatum(buf.data);
}

/*
 * Copy the claimed rows out of SPI's memory into the caller's context.
 */
static List *
claim_copy_rows(MemoryContext cxt)
{
	List	   *rows = NIL;
	MemoryContext old = MemoryContextSwitchTo(cxt);
	uint64		i;

	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		RwClaimed  *row = palloc0(sizeof(RwClaimed));
		bool		isnull;
		Datum		d;

		strlcpy(row->id, SPI_getvalue(tup, desc, 1), sizeof(row->id));
		row->url = SPI_getvalue(tup, desc, 2);
		d = SPI_getbinval(tup, desc, 3, &isnull);
		row->key = isnull ? NULL : DatumGetByteaPCopy(d);
		row->body = SPI_getvalue(tup, desc, 4);
		row->deadline = DatumGetTimestampTz(SPI_getbinval(tup, desc, 5, &isnull));
		d = SPI_getbinval(tup, desc, 6, &isnull);
		row->maybe_sent = isnull || DatumGetBool(d);
		rows = lappend(rows, row);
	}
	MemoryContextSwitchTo(old);
	return rows;
}

/*
 * Run one of the worker's statements that return one row (left in
 * SPI_tuptable), in the caller's transaction; see claim_plan().
 */
static void
claim_run_one_row(SPIPlanPtr *plan, const char *query, int nargs, Oid *types,
				  Datum *values, const char *nulls, bool read_only)
{
	if (SPI_execute_plan(claim_plan(plan, query, nargs, types), values, nulls,
						 read_only, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "restart_worker: \"%s\" failed", query);
}

/*
 * Run one of the worker's statements whose only parameter is a list of
 * request ids (a list of id strings, passed as uuid[]), in the caller's
 * transaction; it returns one row, left in SPI_tuptable.
 */
static void
claim_run_with_ids(SPIPlanPtr *plan, const char *query, List *ids, bool read_only)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	values[0] = claim_ids_array(ids);
	claim_run_one_row(plan, query, 1, types, values, NULL, read_only);
}

/*
 * When the next request not in flight (exclude) is due, or 0; runs in the
 * caller's transaction.
 */
static TimestampTz
claim_next_due_query(List *exclude)
{
	bool		isnull;
	Datum		d;

	claim_run_with_ids(&claim_plan_next_due,
					   "SELECT restart_worker.worker_next_due($1::uuid[])",
					   exclude, true);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetTimestampTz(d);
}

/*
 * The claim proper, in its own transaction; see rw_claim().  The claim
 * commits synchronously: the calls start right after it.
 */
static RwClaimResult
claim_run(int limit, List *exclude, bool recover, List **rows,
		  TimestampTz *next_due, bool *more, MemoryContext cxt)
{
	Oid			types[4] = {INT4OID, TEXTOID, INT4OID, BOOLOID};
	Datum		values[4];
	SPIPlanPtr	plan;

	claim_begin("restart_worker: claim due requests");
	if (!claim_extension_current())
	{
		claim_end();
		return RW_CLAIM_NO_EXTENSION;
	}

	/*
	 * The worker's session runs with synchronous_commit off; this transaction
	 * commits with on (also waiting for synchronous standbys).  Set directly,
	 * as SET LOCAL would, without parsing a statement.
	 */
	(void) set_config_option("synchronous_commit", "on", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	values[0] = Int32GetDatum(limit);
	values[1] = claim_ids_array(exclude);
	values[2] = Int32GetDatum(claim_lease_ms());
	values[3] = BoolGetDatum(recover);
	plan = claim_plan(&claim_plan_claim,
					  "SELECT id::text, url, key, body, deadline_at, maybe_sent"
					  " FROM restart_worker.worker_claim($1, $2::uuid[], $3, $4)",
					  4, types);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "restart_worker: claim failed");
	*rows = claim_copy_rows(cxt);
	*more = (SPI_processed >= (uint64) limit);
	/* Nothing to send: look for the next due now, in the same transaction. */
	*next_due = (*rows == NIL) ? claim_next_due_query(exclude) : RW_NEXT_DUE_UNKNOWN;
	claim_end();
	return RW_CLAIM_OK;
}

/*
 * Claim up to limit due requests, except those in flight (exclude, a list
 * of id strings).  After a restart (recover) every dispatching or running
 * request is taken over.  Claims nothing if the extension does not exist,
 * or if the claim failed (the error is logged).  *more says whether the
 * claim was cut short by the limit.  When nothing was claimed, *next_due
 * is when the next request is due (0 if none), found in the same
 * transaction, so that an idle poll is one transaction; otherwise it is
 * RW_NEXT_DUE_UNKNOWN and the caller defers that look-up with
 * rw_after_claim_defer() once the calls are sent.
 */
RwClaimResult
rw_claim(int limit, List *exclude, bool recover, List **rows,
		 TimestampTz *next_due, bool *more)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile RwClaimResult result = RW_CLAIM_ERROR;

	*rows = NIL;
	*next_due = 0;
	*more = false;
	PG_TRY();
	{
		result = claim_run(limit, exclude, recover, rows, next_due, more, cxt);
	}
	PG_CATCH();
	{
		claim_recover(cxt);
		*rows = NIL;
		*next_due = 0;
		*more = false;
		result = RW_CLAIM_ERROR;
	}
	PG_END_TRY();
	return result;
}

/*
 * Announce the requests in announce (a list of id strings) with NOTIFY;
 * runs in the caller's transaction.
 */
static void
claim_announce(List *announce)
{
	claim_run_with_ids(&claim_plan_announce,
					   "SELECT restart_worker.worker_announce($1::uuid[])",
					   announce, false);
}

/*
 * The work left after a claim whose calls have been sent: announce the
 * requests it made dispatching (their NOTIFY is left out of the claim, see
 * worker_announce() in src/sql/50_worker.sql), and find when the next
 * request the worker does not have in flight is due.  It is done in the
 * next transaction that records an answer, which for a request made now is
 * its agent's answer a few milliseconds later, so that a request costs the
 * worker two transactions, not three; rw_after_claim_next_due() does it
 * on its own if no answer comes within CLAIM_AFTER_MS.
 */
#define CLAIM_AFTER_MS 10

static MemoryContext claim_after_cxt = NULL;
static List *claim_after_announce = NIL;	/* ids to announce */
static TimestampTz claim_after_at = 0;	/* work to do by then, or 0 */
static bool claim_after_want_due = false;	/* look up the next due too */
static bool claim_after_found = false;	/* claim_after_next_due is new */
static TimestampTz claim_after_next_due = 0;

/*
 * Remember the after-claim work of a claim: announce (a list of id
 * strings, copied) and, if want_due, the look-up of the next due.  A claim
 * cut short by the number of free slots wants none: the worker claims
 * again as soon as a slot is free, and that claim looks.
 */
void
rw_after_claim_defer(List *announce, bool want_due)
{
	MemoryContext old;
	ListCell   *lc;

	if (announce == NIL && !want_due)
		return;
	if (claim_after_cxt == NULL)
		claim_after_cxt = AllocSetContextCreate(TopMemoryContext,
												"restart_worker announcements",
												ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(claim_after_cxt);
	foreach(lc, announce)
		claim_after_announce = lappend(claim_after_announce, pstrdup(lfirst(lc)));
	MemoryContextSwitchTo(old);
	if (claim_after_at == 0)
		claim_after_at = GetCurrentTimestamp() + CLAIM_AFTER_MS * 1000;
	claim_after_want_due |= want_due;
	claim_after_next_due = 0;	/* stays so if the extension is gone */
}

/*
 * When the after-claim work must be done at the latest, or 0 if there is
 * none.
 */
TimestampTz
rw_after_claim_due(void)
{
	return claim_after_at;
}

/*
 * Do the after-claim work in the caller's transaction, if there is any.
 */
static void
claim_after_work(void)
{
	if (claim_after_at == 0)
		return;
	if (claim_after_announce != NIL)
		claim_announce(claim_after_announce);
	if (claim_after_want_due)
		claim_after_next_due = claim_next_due_query(rw_dispatch_ids());
}

/*
 * Forget the after-claim work: it was committed (ok), or it failed with
 * its transaction and the worker looks again in a second (the error is
 * logged; the announcements are lost).
 */
static void
claim_after_done(bool ok)
{
	if (claim_after_at == 0)
		return;
	if (!ok)
		claim_after_next_due = GetCurrentTimestamp() + USECS_PER_SEC;
	claim_after_found = claim_after_want_due || !ok;
	claim_after_want_due = false;
	claim_after_at = 0;
	claim_after_announce = NIL;
	MemoryContextReset(claim_after_cxt);
}

/*
 * Do the after-claim work in a transaction of its own, committed
 * asynchronously.
 */
static void
claim_after_run(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		claim_begin("restart_worker: announce claimed requests, look for the next due");
		if (claim_extension_exists())
			claim_after_work();
		claim_end();
		claim_after_done(true);
	}
	PG_CATCH();
	{
		claim_recover(cxt);
		claim_after_done(false);
	}
	PG_END_TRY();
}

/*
 * Called by the worker at each turn: do the after-claim work now if its
 * time has come and no recording did it meanwhile, and set *next_due to
 * when the next request not in flight is due (0 if none) if it was looked
 * up since the last call (or to a second from now if the work failed).
 * Otherwise *next_due is left as it is.
 */
void
rw_after_claim_next_due(TimestampTz *next_due)
{
	if (claim_after_at != 0 && claim_after_at <= GetCurrentTimestamp())
		claim_after_run();
	if (claim_after_found)
	{
		claim_after_found = false;
		*next_due = claim_after_next_due;
	}
}

/*
 * What the last answer recorded did to its request, counted in
 * restart_worker.status() once its transaction has committed.
 */
typedef enum ClaimCount
{
	CLAIM_COUNT_NONE,
	CLAIM_COUNT_RETRY,
	CLAIM_COUNT_COMPLETED,
	CLAIM_COUNT_FAILED
} ClaimCount;

static ClaimCount claim_count = CLAIM_COUNT_NONE;

/*
 * Translate a recorded outcome for the caller, and note what to count.
 */
static RwOutcome
claim_outcome(const char *action)
{
	claim_count = CLAIM_COUNT_NONE;
	if (strcmp(action, "follow") == 0)
		return RW_OUTCOME_FOLLOW;
	if (strcmp(action, "locked") == 0)
		return RW_OUTCOME_LOCKED;
	if (strcmp(action, "retry") == 0)
	{
		claim_count = CLAIM_COUNT_RETRY;
		return RW_OUTCOME_RETRY;
	}
	if (strcmp(action, "completed") == 0)
		claim_count = CLAIM_COUNT_COMPLETED;
	else if (strcmp(action, "failed") == 0)
		claim_count = CLAIM_COUNT_FAILED;
	return RW_OUTCOME_DONE;
}

/*
 * Count what the committed recording did.
 */
static void
claim_count_committed(void)
{
	if (claim_count == CLAIM_COUNT_RETRY)
		RW_COUNT(retries);
	else if (claim_count == CLAIM_COUNT_COMPLETED)
		RW_COUNT(completed);
	else if (claim_count == CLAIM_COUNT_FAILED)
		RW_COUNT(failed);
	claim_count = CLAIM_COUNT_NONE;
}

/*
 * Whether an answer is a job object src/job.c reads, in *job.
 */
static bool
claim_read_job(RwCall *call, RwJob *job)
{
	return call->kind == RW_CALL_ANSWER && call->resp != NULL && call->resp_len > 0 &&
		(call->http_status == 200 || call->http_status == 202) &&
		pg_verifymbstr(call->resp, call->resp_len, true) &&
		rw_job_read(call->id, call->resp, call->resp_len, job);
}

/*
 * Record a job object read by src/job.c with worker_record_job(), in the
 * caller's transaction.  Returns false if that left the request alone
 * (its row is locked or no longer the worker's): worker_record() then says
 * what it is.
 */
static bool
claim_record_job(RwCall *call, const RwJob *job, TimestampTz accepted_at,
				 bool running_first, RwOutcome *outcome)
{
	Oid			types[10] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	INT4OID, TEXTOID, TEXTOID, INT4OID, TIMESTAMPTZOID, BOOLOID};
	Datum		values[10];
	char		nulls[10];
	bool		isnull;
	Datum		d;

	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(call->id);
	values[1] = CStringGetTextDatum(job->status);
	values[2] = TimestampTzGetDatum(job->started_at);
	nulls[2] = job->has_started_at ? ' ' : 'n';
	values[3] = TimestampTzGetDatum(job->finished_at);
	nulls[3] = job->has_finished_at ? ' ' : 'n';
	values[4] = Int32GetDatum(job->exit_code);
	nulls[4] = job->has_exit_code ? ' ' : 'n';
	values[5] = job->output ? CStringGetTextDatum(job->output) : (Datum) 0;
	nulls[5] = job->output ? ' ' : 'n';
	values[6] = job->error ? CStringGetTextDatum(job->error) : (Datum) 0;
	nulls[6] = job->error ? ' ' : 'n';
	values[7] = Int32GetDatum(claim_lease_ms());
	values[8] = TimestampTzGetDatum(accepted_at);
	nulls[8] = accepted_at == 0 ? 'n' : ' ';
	values[9] = BoolGetDatum(running_first);
	claim_run_one_row(&claim_plan_record_job,
					  "SELECT restart_worker.worker_record_job("
					  "$1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
					  10, types, values, nulls, false);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		return false;
	*outcome = claim_outcome(TextDatumGetCString(d));
	return true;
}

/*
 * Record the outcome of one call in the caller's transaction; see
 * rw_record().  The common answer, a job object in a 200 or 202, is read
 * in C (src/job.c) if fast is true; anything else is judged by
 * worker_record().
 */
static RwOutcome
claim_record_one(RwCall *call, TimestampTz accepted_at, bool fast,
				 TimestampTz *next_at)
{
	Oid			types[11] = {TEXTOID, TEXTOID, INT4OID, TEXTOID, BOOLOID,
	BOOLOID, INT4OID, INT4OID, INT4OID, INT4OID, TIMESTAMPTZOID};
	Datum		values[11];
	char		nulls[11];
	bool		answered = call->kind == RW_CALL_ANSWER;
	bool		valid;
	bool		isnull;
	Datum		d;
	RwJob		job;
	RwOutcome	outcome;

	*next_at = 0;
	if (fast && claim_read_job(call, &job) &&
		claim_record_job(call, &job, accepted_at, false, &outcome))
		return outcome;

	valid = answered && call->resp != NULL && call->resp_len > 0 &&
		pg_verifymbstr(call->resp, call->resp_len, true);
	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(call->id);
	values[1] = CStringGetTextDatum(rw_http_kind_name(call->kind));
	values[2] = Int32GetDatum((int32) call->http_status);
	if (!answered)
		nulls[2] = 'n';
	if (valid)
		values[3] = PointerGetDatum(cstring_to_text_with_len(call->resp, call->resp_len));
	else
		nulls[3] = 'n';
	values[4] = BoolGetDatum(call->sent);
	values[5] = BoolGetDatum(call->maybe_sent);
	values[6] = Int32GetDatum(rw_max_attempts);
	values[7] = Int32GetDatum(rw_retry_base);
	values[8] = Int32GetDatum(rw_retry_max);
	values[9] = Int32GetDatum(claim_lease_ms());
	values[10] = TimestampTzGetDatum(accepted_at);
	if (accepted_at == 0)
		nulls[10] = 'n';
	claim_run_one_row(&claim_plan_record,
					  "SELECT action, next_at FROM restart_worker.worker_record("
					  "$1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
					  11, types, values, nulls, false);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	*next_at = isnull ? 0 : DatumGetTimestampTz(d);
	return claim_outcome(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1));
}

/*
 * Two answers recorded at once, a job's 202 (first) and its end (second),
 * with one row update instead of two (see worker_record_job()), in the
 * caller's transaction.  Returns false if they are anything else, or the
 * update left the request alone: the caller records them one by one.
 */
static bool
claim_record_ended(RwCall *first, RwCall *second, TimestampTz accepted_at,
				   RwOutcome *outcome)
{
	RwJob		running;
	RwJob		ended;

	return claim_read_job(first, &running) && strcmp(running.status, "running") == 0 &&
		claim_read_job(second, &ended) && strcmp(ended.status, "running") != 0 &&
		claim_record_job(second, &ended, accepted_at, true, outcome);
}

/*
 * The recording proper, in its own transaction; see rw_record().
 */
static RwOutcome
claim_record_run(RwCall *first, RwCall *second, TimestampTz accepted_at,
				 bool fast, TimestampTz *next_at)
{
	RwOutcome	outcome;

	claim_count = CLAIM_COUNT_NONE;
	claim_begin("restart_worker: record an agent's answer");
	if (!claim_extension_exists())
	{
		claim_end();
		return RW_OUTCOME_DONE;
	}
	claim_after_work();
	if (fast && second != NULL && claim_record_ended(first, second, accepted_at, &outcome))
	{
		*next_at = 0;
		claim_end();
		return outcome;
	}
	outcome = claim_record_one(first, accepted_at, fast, next_at);
	if (outcome == RW_OUTCOME_FOLLOW && second != NULL)
		outcome = claim_record_one(second, accepted_at, fast, next_at);
	claim_end();
	return outcome;
}

/*
 * Run claim_record_run() and count what it did.  If it fails, roll back:
 * unless this is the last attempt, log the error as a LOG line and return
 * false, so that the caller tries again; on the last attempt log it as
 * the error it is and return RW_OUTCOME_ERROR in *outcome.
 */
static bool
claim_record_try(RwCall *first, RwCall *second, TimestampTz accepted_at,
				 bool fast, bool last, TimestampTz *next_at, RwOutcome *outcome)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool done = true;

	*next_at = 0;
	PG_TRY();
	{
		*outcome = claim_record_run(first, second, accepted_at, fast, next_at);
		claim_after_done(true);
		claim_count_committed();
	}
	PG_CATCH();
	{
		if (!last)
		{
			ErrorData  *edata;

			HOLD_INTERRUPTS();
			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			FlushErrorState();
			AbortCurrentTransaction();
			pgstat_report_activity(STATE_IDLE, NULL);
			RESUME_INTERRUPTS();
			ereport(LOG,
					(errmsg("restart_worker: recording an agent's answer failed, trying again%s: %s",
							fast ? " with every answer judged in SQL" :
							" without the announcements and next-due look-up of the last claim",
							edata->message)));
			FreeErrorData(edata);
			done = false;
		}
		else
		{
			claim_recover(cxt);
			claim_after_done(false);
			*outcome = RW_OUTCOME_ERROR;
		}
		*next_at = 0;
	}
	PG_END_TRY();
	return done;
}

/*
 * Record the outcome of a call in its own transaction and say what to do
 * next; if second is not NULL and the first outcome says to follow the
 * job, record second (the answer of that next call) in the same
 * transaction.  accepted_at is when the agent accepted the job, if an
 * earlier answer said so (0 if not).  For a retry, *next_at is when the
 * request is due again.  Any after-claim work is done in the same
 * transaction.  If the extension is gone, the request is forgotten.  If
 * recording fails, the error is logged and the request is left to its
 * lease.  After an error (say, a job object nested too deep for the
 * parser of the fast path) the transaction is done again with every answer
 * judged in SQL, and if that fails too, once more without the after-claim
 * work, so that an error there cannot keep an answer from being recorded.
 */
RwOutcome
rw_record(RwCall *first, RwCall *second, TimestampTz accepted_at,
		  TimestampTz *next_at)
{
	RwOutcome	outcome;

	if (claim_record_try(first, second, accepted_at, true, false, next_at, &outcome))
		return outcome;
	if (rw_after_claim_due() == 0)
		(void) claim_record_try(first, second, accepted_at, false, true, next_at, &outcome);
	else if (!claim_record_try(first, second, accepted_at, false, false, next_at, &outcome))
	{
		/* The after-claim work may be what fails: the answer goes first. */
		claim_after_done(false);
		(void) claim_record_try(first, second, accepted_at, false, true, next_at, &outcome);
	}
	return outcome;
}
