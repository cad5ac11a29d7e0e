/*-------------------------------------------------------------------------
 *
 * status.c
 *		What the worker is doing, in shared memory, and the SQL function
 *		that shows it (restart_worker.worker_state(), wrapped by
 *		restart_worker.status() in src/sql/50_worker.sql).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

PG_FUNCTION_INFO_V1(restart_worker_worker_state);

/*
 * Set what the worker is doing, if it changed.
 */
void
rw_status_set_state(RestartWorkerState state)
{
	if (restart_worker_shared == NULL)
		return;
	SpinLockAcquire(&restart_worker_shared->mutex);
	restart_worker_shared->state = state;
	SpinLockRelease(&restart_worker_shared->mutex);
}

/*
 * A new worker started: note when, and reset the counters.
 */
void
rw_status_worker_started(void)
{
	SpinLockAcquire(&restart_worker_shared->mutex);
	restart_worker_shared->started_at = GetCurrentTimestamp();
	restart_worker_shared->last_wake = 0;
	restart_worker_shared->last_poll = 0;
	restart_worker_shared->in_flight = 0;
	restart_worker_shared->max_in_flight = 0;
	restart_worker_shared->sockets = 0;
	restart_worker_shared->max_sockets = 0;
	memset(&restart_worker_shared->counters, 0, sizeof(RestartWorkerCounters));
	SpinLockRelease(&restart_worker_shared->mutex);
}

/*
 * The worker's latch was set: note when.
 */
void
rw_status_note_wake(void)
{
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&restart_worker_shared->mutex);
	restart_worker_shared->last_wake = now;
	restart_worker_shared->counters.wakeups++;
	SpinLockRelease(&restart_worker_shared->mutex);
}

/*
 * The worker looked at the queue and claimed some requests.
 */
void
rw_status_note_poll(int claimed)
{
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&restart_worker_shared->mutex);
	restart_worker_shared->last_poll = now;
	restart_worker_shared->counters.polls++;
	restart_worker_shared->counters.claimed += claimed;
	SpinLockRelease(&restart_worker_shared->mutex);
}

/*
 * The number of calls in flight changed; keep its high-water mark, so that
 * tests and admins see the peak, not a sample.
 */
void
rw_status_set_in_flight(int n)
{
	SpinLockAcquire(&restart_worker_shared->mutex);
	restart_worker_shared->in_flight = n;
	restart_worker_shared->max_in_flight = Max(restart_worker_shared->max_in_flight, n);
	SpinLockRelease(&restart_worker_shared->mutex);
}

/*
 * The number of sockets libcurl has open changed; keep its high-water mark.
 */
void
rw_status_set_sockets(int n)
{
	SpinLockAcquire(&restart_worker_shared->mutex);
	restart_worker_shared->sockets = n;
	restart_worker_shared->max_sockets = Max(restart_worker_shared->max_sockets, n);
	SpinLockRelease(&restart_worker_shared->mutex);
}

/*
 * The name of a state, as restart_worker.status() shows it.
 */
static const char *
status_state_name(RestartWorkerState state)
{
	switch (state)
	{
		case RW_STATE_STOPPED:
			return "stopped";
		case RW_STATE_STARTING:
			return "starting";
		case RW_STATE_NO_EXTENSION:
			return "waiting for extension";
		case RW_STATE_IDLE:
			return "idle";
		case RW_STATE_BUSY:
			return "busy";
		case RW_STATE_SETTLING:
			return "settling";
	}
	return "unknown";
}

/*
 * Set a timestamp column, NULL when the time is unknown (0).
 */
static void
status_put_time(Datum *values, bool *nulls, int i, TimestampTz t)
{
	values[i] = TimestampTzGetDatum(t);
	nulls[i] = (t == 0);
}

/*
 * SQL function restart_worker.worker_state(): the worker's pid (NULL when
 * none runs), state, times, calls in flight and counters since it started,
 * and the high-water marks of calls in flight and sockets.
 * All NULL when the library was not preloaded.
 */
Datum
restart_worker_worker_state(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[18];
	bool		nulls[18];
	RestartWorkerShared copy;
	int			i;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	memset(nulls, true, sizeof(nulls));
	if (restart_worker_shared == NULL)
		PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));

	SpinLockAcquire(&restart_worker_shared->mutex);
	memcpy(&copy, restart_worker_shared, sizeof(copy));
	SpinLockRelease(&restart_worker_shared->mutex);
	if (copy.worker_pid == 0)
		copy.state = RW_STATE_STOPPED;

	memset(nulls, false, sizeof(nulls));
	values[0] = Int32GetDatum(copy.worker_pid);
	nulls[0] = (copy.worker_pid == 0);
	values[1] = CStringGetTextDatum(status_state_name(copy.state));
	status_put_time(values, nulls, 2, copy.started_at);
	status_put_time(values, nulls, 3, copy.last_wake);
	status_put_time(values, nulls, 4, copy.last_poll);
	values[5] = Int32GetDatum(copy.in_flight);
	values[6] = Int64GetDatum((int64) copy.commit_wakeups);
	i = 7;
	values[i++] = Int64GetDatum((int64) copy.counters.wakeups);
	values[i++] = Int64GetDatum((int64) copy.counters.polls);
	values[i++] = Int64GetDatum((int64) copy.counters.claimed);
	values[i++] = Int64GetDatum((int64) copy.counters.calls);
	values[i++] = Int64GetDatum((int64) copy.counters.call_errors);
	values[i++] = Int64GetDatum((int64) copy.counters.retries);
	values[i++] = Int64GetDatum((int64) copy.counters.completed);
	values[i++] = Int64GetDatum((int64) copy.counters.failed);
	values[i++] = Int32GetDatum(copy.max_in_flight);
	values[i++] = Int32GetDatum(copy.sockets);
	values[i++] = Int32GetDatum(copy.max_sockets);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
