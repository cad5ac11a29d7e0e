/*-------------------------------------------------------------------------
 *
 * deadline.c
 *		Requests that reach their deadline while every call slot is busy.
 *
 * Each claim first fails the requests past their deadline (worker_claim()
 * in src/sql/50_worker.sql).  While every call slot is busy the worker does
 * not claim, so a request waiting for a slot (pending, or waiting to be
 * called again) would stay active past its deadline, until a slot was free.
 * Instead, while no slot is free, the worker asks the database
 * (worker_fail_late()), at most DEADLINE_LOOK_MS after it began to wait
 * for one, when the first of those requests reaches its deadline, and at
 * that time fails what is past its deadline and asks again.  What it
 * learnt holds until a request is committed (a wake-up, also one used up
 * inside a transaction: see src/wake.c), a claim runs or the safety-net
 * poll comes; then it asks again, at most DEADLINE_LOOK_MS later.  During
 * a burst the slots free up and claims follow each other much faster than
 * that, so the question is not asked.
 *
 * An extension older than 1.5 has no worker_fail_late(), and a role the
 * update did not grant it to (say, after restoring a dump: see the README)
 * may not run it; the worker then does without, as before, and says so in
 * the log once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

#define DEADLINE_LOOK_MS 100

static TimestampTz deadline_look_at = 0;	/* when to look, or 0 */
static bool deadline_known = false; /* deadline_look_at is the next deadline */
static uint64 deadline_wakes = 0;	/* the wake-up count at the last look */
static int	deadline_failures = 0;	/* looks in a row that failed */
static SPIPlanPtr deadline_plan = NULL;

/*
 * Make the look come DEADLINE_LOOK_MS from now, unless it comes sooner or
 * a failed look asked to wait longer.
 */
static void
deadline_look_soon(void)
{
	TimestampTz soon = GetCurrentTimestamp() + DEADLINE_LOOK_MS * 1000;

	/* After a failed look, not before its backoff ends (nor log more often). */
	if (deadline_failures > 0)
		return;

	if (deadline_look_at == 0 || deadline_look_at > soon)
		deadline_look_at = soon;
	deadline_known = false;
}

/*
 * A claim ran; it failed what was past its deadline.  If it was cut short
 * by the free slots (more), pending requests wait for a slot: look at their
 * deadlines soon, unless another claim comes first.  The backoff of a
 * failed look stays.
 */
void
rw_deadline_claimed(bool more)
{
	if (deadline_failures == 0)
		deadline_look_at = 0;
	deadline_known = false;
	if (more)
		deadline_look_soon();
}

/*
 * No slot is free: look soon, unless the worker already knows the next
 * deadline and nothing may have changed since: no request was committed
 * (no wake-up, counted or not), and nothing else new happened (new: the
 * latch was set, the safety-net poll came, or a slot was freed).
 */
void
rw_deadline_blocked(bool new)
{
	if (new || !deadline_known || restart_worker_wake_count() != deadline_wakes)
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
 * Whether the worker may run worker_fail_late(): the extension has it (1.5
 * and later) and the worker's role may execute it.  Found once per
 * extension; looked for again while missing, which is cheap (catalog cache
 * look-ups) and rare (only while every slot is busy).  A missing privilege
 * is logged once.
 */
static bool
deadline_function_usable(void)
{
	static Oid	found_in = InvalidOid;
	static bool logged = false;
	Oid			ext = get_extension_oid("restart_worker", true);
	Oid			types[1] = {UUIDARRAYOID};
	Oid			func;

	if (!OidIsValid(ext) || ext == found_in)
		return OidIsValid(ext);
	func = rw_extension_function("worker_fail_late", 1, types);
	if (!OidIsValid(func))
		return false;
	if (pg_proc_aclcheck(func, GetUserId(), ACL_EXECUTE) != ACLCHECK_OK)
	{
		if (!logged)
			ereport(LOG,
					(errmsg("restart_worker: role \"%s\" may not execute restart_worker.worker_fail_late(); "
							"requests waiting for a call slot end at their deadline only once a slot is free",
							GetUserNameFromId(GetUserId(), false)),
					 errhint("Run restart_worker.grant_admin() for that role again.")));
		logged = true;
		return false;
	}
	found_in = ext;
	logged = false;
	return true;
}

/*
 * The look proper, in its own transaction: fail what is past its deadline
 * except the requests in flight (exclude, a list of pg_uuid_t), and find
 * the next deadline of a request not in flight (0 if none).  Returns false
 * if the worker cannot ask.  A request it failed is an end the agent's
 * journal does not hold: the transaction commits synchronously (see
 * src/xact.c); one that changed nothing writes nothing.
 */
static bool
deadline_look(List *exclude, TimestampTz *next)
{
	Oid			types[1] = {UUIDARRAYOID};
	Datum		values[1];
	bool		isnull;
	Datum		d;

	rw_xact_begin("restart_worker: fail requests past their deadline");
	if (!deadline_function_usable())
	{
		rw_xact_end();
		return false;
	}
	rw_xact_make_durable();
	values[0] = rw_uuid_array(exclude);
	rw_run_one_row(&deadline_plan, "SELECT restart_worker.worker_fail_late($1)",
				   1, types, values, NULL, false);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	*next = isnull ? 0 : DatumGetTimestampTz(d);
	rw_xact_end();
	return true;
}

/*
 * Look, catching an error (it is logged and rolled back).  Returns 1 if
 * the look was made, 0 if the extension cannot make it, -1 on error.
 */
static int
deadline_try_look(List *exclude, TimestampTz *next)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile int result = -1;

	PG_TRY();
	{
		result = deadline_look(exclude, next) ? 1 : 0;
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
 * Whether a look is due now.
 */
bool
rw_deadline_look_due(void)
{
	return deadline_look_at != 0 && deadline_look_at <= GetCurrentTimestamp();
}

/*
 * Look now: fail the requests past their deadline that are not in flight
 * (exclude) and plan the next look for the next deadline.  A row past its
 * deadline that someone else holds is looked at again in a second; a look
 * that failed is tried again later, less and less often.  The look counts
 * as a poll in restart_worker.status().
 */
void
rw_deadline_look(List *exclude)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz next = 0;
	int			result;

	deadline_wakes = restart_worker_wake_count();
	result = deadline_try_look(exclude, &next);
	deadline_known = true;
	if (result < 0)
	{
		deadline_failures++;
		deadline_look_at = now + rw_retry_delay(deadline_failures);
		return;
	}
	deadline_failures = 0;
	rw_status_note_poll(0);

	/*
	 * A deadline before the look began was past for its transaction too:
	 * someone holds that row.  One that passed during the look is due now.
	 */
	if (result == 0 || next == 0)
		deadline_look_at = 0;
	else if (next <= now)
		deadline_look_at = now + USECS_PER_SEC;
	else
		deadline_look_at = next;
}
