/*-------------------------------------------------------------------------
 *
 * claim.c
 *		Claim due requests for the worker, and the work left after a claim
 *		(announcing the claimed requests, finding when the next one is due).
 *
 * A claim runs in a short transaction of its own (src/xact.c) that commits
 * before any network I/O.  The policy (what is due, the lease, the
 * deadline) is in SQL, worker_claim() in src/sql/50_worker.sql.  A claim
 * commits asynchronously once the worker has settled what a crash may
 * have lost of earlier claims (src/settle.c), synchronously before; one
 * that ends requests past their deadline makes itself synchronous.  What
 * agents answer is recorded by src/record.c.
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
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

/* The worker's statements, prepared once (see rw_plan()). */
static SPIPlanPtr claim_plan_claim = NULL;
static SPIPlanPtr claim_plan_next_due = NULL;
static SPIPlanPtr claim_plan_announce = NULL;

/*
 * Whether the extension's SQL is what this build calls.  After a new build
 * is installed, and until ALTER EXTENSION restart_worker UPDATE, the worker
 * claims nothing (it would send calls whose answers it could not record)
 * and says so in the log once.  worker_record_jobs() is new in 1.2; once
 * it is found for an extension, that extension is taken as current.
 */
static bool
claim_extension_current(void)
{
	static Oid	current = InvalidOid;
	static bool logged = false;
	Oid			ext = get_extension_oid("restart_worker", true);
	Oid			types[10] = {UUIDARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID,
	TIMESTAMPTZARRAYOID, INT4ARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
	TIMESTAMPTZARRAYOID, BOOLARRAYOID, INT4OID};

	if (!OidIsValid(ext) || ext == current)
		return OidIsValid(ext);
	if (OidIsValid(rw_extension_function("worker_record_jobs", 10, types)))
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
int
rw_lease_ms(void)
{
	return rw_request_timeout + rw_follow_wait * 1000 + 60000;
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

		d = SPI_getbinval(tup, desc, 1, &isnull);
		if (isnull)
			elog(ERROR, "restart_worker: worker_claim() returned a NULL id");
		row->uuid = *DatumGetUUIDP(d);
		strlcpy(row->id, SPI_getvalue(tup, desc, 1), sizeof(row->id));
		row->url = SPI_getvalue(tup, desc, 2);
		d = SPI_getbinval(tup, desc, 3, &isnull);
		row->key = isnull ? NULL : DatumGetByteaPCopy(d);
		row->body = SPI_getvalue(tup, desc, 4);
		row->deadline = DatumGetTimestampTz(SPI_getbinval(tup, desc, 5, &isnull));
		d = SPI_getbinval(tup, desc, 6, &isnull);
		row->maybe_sent = isnull || DatumGetBool(d);
		/* accepted is new in 1.7; before, every claimed request was sent */
		if (desc->natts >= 7)
		{
			d = SPI_getbinval(tup, desc, 7, &isnull);
			row->accepted = !isnull && DatumGetBool(d);
		}
		rows = lappend(rows, row);
	}
	MemoryContextSwitchTo(old);
	return rows;
}

/*
 * Run one of the worker's statements whose only parameter is a list of
 * request ids (a list of pg_uuid_t, passed as uuid[]), in the caller's
 * transaction; it returns one row, left in SPI_tuptable.
 */
static void
claim_run_with_ids(SPIPlanPtr *plan, const char *query, List *ids, bool read_only)
{
	Oid			types[1] = {UUIDARRAYOID};
	Datum		values[1];

	values[0] = rw_uuid_array(ids);
	rw_run_one_row(plan, query, 1, types, values, NULL, read_only);
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
					   "SELECT restart_worker.worker_next_due($1)",
					   exclude, true);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetTimestampTz(d);
}

/*
 * The claim proper, in its own transaction; see rw_claim().  The calls
 * start right after it commits.
 */
static RwClaimResult
claim_run(int limit, List *exclude, bool recover, List **rows,
		  TimestampTz *next_due, bool *more, MemoryContext cxt)
{
	Oid			types[4] = {INT4OID, UUIDARRAYOID, INT4OID, BOOLOID};
	Datum		values[4];
	SPIPlanPtr	plan;

	rw_xact_begin("restart_worker: claim due requests");
	if (!claim_extension_current())
	{
		rw_xact_end();
		return RW_CLAIM_NO_EXTENSION;
	}

	/* The worker's session runs with synchronous_commit off (src/settle.c). */
	if (!rw_settle_claims_async())
		rw_xact_make_durable();
	values[0] = Int32GetDatum(limit);
	values[1] = rw_uuid_array(exclude);
	values[2] = Int32GetDatum(rw_lease_ms());
	values[3] = BoolGetDatum(recover);
	/*
	 * Every column, however many the extension's version returns: the kept
	 * plan is made again when ALTER EXTENSION UPDATE replaces the function.
	 */
	plan = rw_plan(&claim_plan_claim,
				   "SELECT * FROM restart_worker.worker_claim($1, $2, $3, $4)",
				   4, types);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "restart_worker: claim failed");
	*rows = claim_copy_rows(cxt);
	*more = (SPI_processed >= (uint64) limit);
	/*
	 * Nothing to send: look for the next due now, in the same transaction,
	 * among all requests not in flight (exclude also holds, while the worker
	 * recovers, those it put back that are not due again yet).
	 */
	*next_due = (*rows == NIL) ? claim_next_due_query(rw_dispatch_ids()) : RW_NEXT_DUE_UNKNOWN;
	rw_xact_end();
	return RW_CLAIM_OK;
}

/*
 * Claim up to limit due requests, except those in exclude (a list of
 * pg_uuid_t: those in flight, see rw_dispatch_claim_exclude()).  After a restart (recover) every dispatching or running
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
		rw_xact_recover(cxt);
		*rows = NIL;
		*next_due = 0;
		*more = false;
		result = RW_CLAIM_ERROR;
	}
	PG_END_TRY();
	return result;
}

/*
 * Announce the requests in announce (a list of pg_uuid_t) with NOTIFY;
 * runs in the caller's transaction.
 */
static void
claim_announce(List *announce)
{
	claim_run_with_ids(&claim_plan_announce,
					   "SELECT restart_worker.worker_announce($1)",
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
 * Remember the after-claim work of a claim: announce (a list of
 * pg_uuid_t, copied) and, if want_due, the look-up of the next due.  A claim
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
	{
		pg_uuid_t  *id = palloc(sizeof(pg_uuid_t));

		memcpy(id, lfirst(lc), sizeof(pg_uuid_t));
		claim_after_announce = lappend(claim_after_announce, id);
	}
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
void
rw_after_claim_work(void)
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
void
rw_after_claim_done(bool ok)
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
		rw_xact_begin("restart_worker: announce claimed requests, look for the next due");
		if (rw_extension_exists())
			rw_after_claim_work();
		rw_xact_end();
		rw_after_claim_done(true);
	}
	PG_CATCH();
	{
		rw_xact_recover(cxt);
		rw_after_claim_done(false);
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

