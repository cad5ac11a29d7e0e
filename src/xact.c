/*-------------------------------------------------------------------------
 *
 * xact.c
 *		The worker's short transactions and its prepared statements.
 *
 * Each claim (src/claim.c) and each recording (src/record.c) runs in a
 * transaction of its own that commits before any network I/O; no snapshot
 * is held across a call to an agent.
 *
 * Claims and outcomes short of an end are committed asynchronously
 * (synchronous_commit = off, set in src/worker.c): such an outcome lost in
 * a crash is redone with the same request id, and the agent answers a
 * repeated id with the existing job, so nothing runs twice; what a lost
 * claim leaves is settled by src/settle.c.  An end (completed or failed)
 * commits synchronously (rw_xact_make_durable()), so that it is never
 * visible or announced before it is on disk.  Lost in a crash, an end the
 * worker decided itself (it gave up, the agent refused, the deadline
 * passed) could bring the request back, and the restart run after all once
 * the request had been announced failed; an end the agent reported could
 * be replaced by one the worker decides after the restart (the deadline
 * passed meanwhile, or the agent is unreachable then), and be announced
 * twice, differently.
 *
 * An error in these transactions (a bad answer the SQL did not expect, a
 * missing privilege, a lock timeout) is logged and the transaction rolled
 * back; the worker goes on instead of exiting and restarting in a loop.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "pgstat.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/uuid.h"

#include "restart_worker.h"

/* The memory context of the caller of the transaction at hand. */
static MemoryContext xact_caller_cxt = NULL;

/*
 * Start a short transaction with SPI and a snapshot, and say so in
 * pg_stat_activity.
 */
void
rw_xact_begin(const char *activity)
{
	xact_caller_cxt = CurrentMemoryContext;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "restart_worker: SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

/*
 * Commit the short transaction started by rw_xact_begin(), and go back to
 * the caller's memory context (a commit leaves TopMemoryContext current,
 * where whatever the worker allocated next would never be freed).
 */
void
rw_xact_end(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(xact_caller_cxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Make the transaction at hand commit synchronously, as SET LOCAL
 * synchronous_commit = on would (also waiting for synchronous standbys),
 * without parsing a statement: for an end the agent's journal does not
 * hold (see the head of this file), for settling (src/settle.c), and for a
 * claim before the worker has settled.
 */
void
rw_xact_make_durable(void)
{
	(void) set_config_option("synchronous_commit", "on", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

/*
 * How long to wait before trying again a transaction that failed failures
 * times in a row (at least 1): a second, doubled at each failure up to a
 * minute, so that a persistent error (say, a missing privilege) is neither
 * retried nor logged in a loop.
 */
TimestampTz
rw_retry_delay(int failures)
{
	return (TimestampTz) Min(1000L << Min(failures - 1, 6), 60000L) * 1000;
}

/*
 * After an error in a short transaction: log it, roll the transaction back
 * and go back to the caller's memory context, so that the worker can go on.
 */
void
rw_xact_recover(MemoryContext cxt)
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
 * After an error in a short transaction that the caller will try again:
 * roll it back, go back to the caller's memory context cxt, and return the
 * error, copied there, for the caller to log as it sees fit.
 */
ErrorData *
rw_xact_abort(MemoryContext cxt)
{
	ErrorData  *edata;

	HOLD_INTERRUPTS();
	MemoryContextSwitchTo(cxt);
	edata = CopyErrorData();
	FlushErrorState();
	AbortCurrentTransaction();
	MemoryContextSwitchTo(cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	RESUME_INTERRUPTS();
	return edata;
}

/*
 * Whether the extension exists in the worker's database.  A catalog
 * look-up, no query: cheap enough for every wake-up.
 */
bool
rw_extension_exists(void)
{
	return OidIsValid(get_extension_oid("restart_worker", true));
}

/*
 * The saved plan of one of the worker's queries, prepared at its first use
 * and kept for the life of the worker, so that each short transaction does
 * not parse and plan its statement again.  The plan cache re-plans it when
 * the functions it calls change (DROP and CREATE EXTENSION).
 */
SPIPlanPtr
rw_plan(SPIPlanPtr *plan, const char *query, int nargs, Oid *types)
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
 * Run one of the worker's statements that return one row (left in
 * SPI_tuptable), in the caller's transaction; see rw_plan().
 */
void
rw_run_one_row(SPIPlanPtr *plan, const char *query, int nargs, Oid *types,
				  Datum *values, const char *nulls, bool read_only)
{
	if (SPI_execute_plan(rw_plan(plan, query, nargs, types), values, nulls,
						 read_only, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "restart_worker: \"%s\" failed", query);
}

/*
 * The function restart_worker.name(types) of the extension installed, or
 * InvalidOid if its version has none: the worker checks that a function it
 * needs exists before it calls it.
 */
Oid
rw_extension_function(const char *name, int nargs, Oid *types)
{
	return LookupFuncName(list_make2(makeString(pstrdup("restart_worker")),
									 makeString(pstrdup(name))),
						  nargs, types, true);
}

/*
 * A list of request ids (pointers to pg_uuid_t) as a uuid[] value, for a
 * parameter of one of the worker's statements.  Built in binary: the claims
 * of a burst pass the ids of every call in flight, and parsing them, as an
 * array literal and later one by one, took a tenth of a claim's time.
 */
Datum
rw_uuid_array(List *ids)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(list_length(ids), 1));
	int			n = 0;
	ListCell   *lc;

	foreach(lc, ids)
		elems[n++] = UUIDPGetDatum((pg_uuid_t *) lfirst(lc));
	return PointerGetDatum(construct_array(elems, n, UUIDOID, UUID_LEN, false,
										   TYPALIGN_CHAR));
}
