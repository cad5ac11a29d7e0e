/*-------------------------------------------------------------------------
 *
 * deadline.c
 *		Requests that reach their deadline while every call slot is busy.
 *
 * Each claim first fails the requests past their deadline (fail_late() in
 * src/sql/50_worker.sql).  While every call slot is busy the worker does
 * not claim, so a request waiting for a slot would stay pending past its
 * deadline, until a slot was free.  Instead, once the worker wants to claim
 * and cannot, it asks the database (worker_fail_late()), at most
 * DEADLINE_LOOK_MS later, which pending request reaches its deadline first,
 * and at that time fails what is past its deadline and asks again.  What it
 * learnt holds until a request is committed (a wake-up) or a claim runs;
 * then it asks again, at most DEADLINE_LOOK_MS later.  During a burst the
 * slots free up and claims follow each other much faster than that, so
 * the look is never made.
 *
 * An extension older than 1.5 has no worker_fail_late(): the worker then
 * does without, as before.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

#define DEADLINE_LOOK_MS 100

static TimestampTz deadline_look_at = 0;	/* when to look, or 0 */
static bool deadline_known = false; /* deadline_look_at is the next deadline */
static int	deadline_failures = 0;	/* looks in a row that failed */
static SPIPlanPtr deadline_plan = NULL;

/*
 * Make the look come DEADLINE_LOOK_MS from now, unless it comes sooner.
 */
static void
deadline_look_soon(void)
{
	TimestampTz soon = GetCurrentTimestamp() + DEADLINE_LOOK_MS * 1000;

	if (deadline_look_at == 0 || deadline_look_at > soon)
		deadline_look_at = soon;
	deadline_known = false;
}

/*
 * A claim ran; it failed what was past its deadline.  If it was cut short
 * by the free slots (more), pending requests wait for a slot: look at their
 * deadlines soon, unless another claim comes first.
 */
void
rw_deadline_claimed(bool more)
{
	deadline_look_at = 0;
	deadline_known = false;
	if (more)
		deadline_look_soon();
}

/*
 * The worker wants to claim (woken, if a request was committed since it
 * last waited) and has no free slot: look soon, unless it already knows
 * the next deadline and nothing new was committed.
 */
void
rw_deadline_blocked(bool woken)
{
	if (woken || !deadline_known)
		deadline_look_soon();
}

/*
 * When the worker should look next (0: no look is planned), for its wait.
 */
TimestampTz
rw_deadline_look_at(void)
{
	return deadline_look_at;
}

/*
 * Whether the extension has worker_fail_late() (1.5 and later).  Found once
 * per extension; looked for again while missing, which is cheap (a catalog
 * cache look-up) and rare (only while every slot is busy).
 */
static bool
deadline_function_exists(void)
{
	static Oid	found_in = InvalidOid;
	Oid			ext = get_extension_oid("restart_worker", true);
	Oid			types[1] = {UUIDARRAYOID};

	if (!OidIsValid(ext) || ext == found_in)
		return OidIsValid(ext);
	if (!OidIsValid(LookupFuncName(list_make2(makeString(pstrdup("restart_worker")),
											  makeString(pstrdup("worker_fail_late"))),
								   1, types, true)))
		return false;
	found_in = ext;
	return true;
}

/*
 * The look proper, in its own transaction: fail what is past its deadline
 * except the requests in flight (exclude, a list of id strings), and find
 * the next deadline of a pending request (0 if none).  Returns false if the
 * extension cannot do it.  A request it failed is an end the agent's
 * journal does not hold: it commits synchronously (see src/xact.c).
 */
static bool
deadline_look(List *exclude, int *failed, TimestampTz *next)
{
	Oid			types[1] = {UUIDARRAYOID};
	Datum		values[1];
	bool		isnull;
	Datum		d;

	rw_xact_begin("restart_worker: fail requests past their deadline");
	if (!deadline_function_exists())
	{
		rw_xact_end();
		return false;
	}
	values[0] = rw_uuid_array(exclude);
	rw_run_one_row(&deadline_plan,
				   "SELECT failed, next_deadline FROM restart_worker.worker_fail_late($1)",
				   1, types, values, NULL, false);
	*failed = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
										  &isnull));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	*next = isnull ? 0 : DatumGetTimestampTz(d);
	if (*failed > 0)
		rw_xact_make_durable();
	rw_xact_end();
	return true;
}

/*
 * Look, catching an error (it is logged and rolled back).  Returns 1 if
 * the look was made, 0 if the extension cannot make it, -1 on error.
 */
static int
deadline_try_look(List *exclude, int *failed, TimestampTz *next)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile int result = -1;

	PG_TRY();
	{
		result = deadline_look(exclude, failed, next) ? 1 : 0;
	}
	PG_CATCH();
	{
		rw_xact_recover(cxt);
		result = -1;
	}
	PG_END_TRY();
	return result;
}

/*
 * Look now if a look is due: fail the requests past their deadline that
 * are not in flight (exclude) and plan the next look for the next deadline.
 * A row past its deadline that someone else holds is looked at again in a
 * second; a look that failed is tried again later, less and less often.
 */
void
rw_deadline_look(List *exclude)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next = 0;
	int			failed = 0;
	int			result;

	if (deadline_look_at == 0 || deadline_look_at > now)
		return;
	result = deadline_try_look(exclude, &failed, &next);
	deadline_known = true;
	if (result < 0)
	{
		deadline_failures++;
		deadline_look_at = now +
			(TimestampTz) Min(1000L << Min(deadline_failures - 1, 6), 60000L) * 1000;
		return;
	}
	deadline_failures = 0;
	RW_COUNT_ADD(failed, failed);
	if (result == 0 || next == 0)
		deadline_look_at = 0;
	else if (next <= now)		/* a row past it that someone holds */
		deadline_look_at = now + USECS_PER_SEC;
	else
		deadline_look_at = next;
}
