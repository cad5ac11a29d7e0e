/*-------------------------------------------------------------------------
 *
 * wake.c
 *		Wake the background worker when a transaction that inserted a
 *		restart request commits.
 *
 * An AFTER INSERT statement trigger on public.service_restart_requests
 * calls restart_worker_wake_worker_at_commit().  It only marks the current
 * transaction; a transaction callback sets the worker's latch once the
 * commit is durable and visible, and forgets the mark on abort.  The worker
 * publishes its PGPROC number in shared memory so that any backend can find
 * its latch.  Setting a latch of a process that has since exited is
 * harmless: latches tolerate spurious wake-ups.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/shmem.h"

#include "restart_worker.h"

RestartWorkerShared *restart_worker_shared = NULL;

static bool wake_pending = false;
static bool wake_callback_registered = false;

#if PG_VERSION_NUM >= 150000
static shmem_request_hook_type prev_shmem_request_hook = NULL;
#endif
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

PG_FUNCTION_INFO_V1(restart_worker_wake_worker_at_commit);
PG_FUNCTION_INFO_V1(restart_worker_commit_wakeups);

/*
 * Ask for our shared memory.  From PostgreSQL 15 on this must happen in
 * shmem_request_hook; before, directly from _PG_init.
 */
#if PG_VERSION_NUM >= 150000
static void
wake_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(RestartWorkerShared)));
}
#endif

/*
 * Create or attach to the shared state.  The first process to get here
 * initialises it: no worker is running yet.
 */
static void
wake_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	restart_worker_shared = ShmemInitStruct("restart_worker",
											sizeof(RestartWorkerShared),
											&found);
	if (!found)
	{
		memset(restart_worker_shared, 0, sizeof(RestartWorkerShared));
		SpinLockInit(&restart_worker_shared->mutex);
		restart_worker_shared->worker_procno = -1;
		restart_worker_shared->worker_pid = 0;
		restart_worker_shared->commit_wakeups = 0;
		restart_worker_shared->settled = !rw_settle_needed();
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Install the shared memory hooks.  Called from _PG_init while
 * shared_preload_libraries is being processed; without preloading there
 * is no worker to wake and the trigger does nothing.
 */
void
restart_worker_wake_init(void)
{
#if PG_VERSION_NUM >= 150000
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = wake_shmem_request;
#else
	RequestAddinShmemSpace(MAXALIGN(sizeof(RestartWorkerShared)));
#endif
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = wake_shmem_startup;
}

/*
 * Make the calling background worker the one that committing transactions
 * wake.  Called by the worker at start.
 */
void
restart_worker_wake_publish(void)
{
	SpinLockAcquire(&restart_worker_shared->mutex);
#if PG_VERSION_NUM >= 170000
	restart_worker_shared->worker_procno = MyProcNumber;
#else
	restart_worker_shared->worker_procno = MyProc->pgprocno;
#endif
	restart_worker_shared->worker_pid = MyProcPid;
	SpinLockRelease(&restart_worker_shared->mutex);
}

/*
 * Withdraw the calling worker, if it is the published one.  Called when the
 * worker exits so that nobody keeps setting a latch it no longer owns.
 */
void
restart_worker_wake_unpublish(void)
{
	if (restart_worker_shared == NULL)
		return;
	SpinLockAcquire(&restart_worker_shared->mutex);
	if (restart_worker_shared->worker_pid == MyProcPid)
	{
		restart_worker_shared->worker_procno = -1;
		restart_worker_shared->worker_pid = 0;
	}
	SpinLockRelease(&restart_worker_shared->mutex);
}

/*
 * Set the worker's latch, if a worker is running, and count the wake-up.
 */
static void
wake_set_worker_latch(void)
{
	int			procno;

	if (restart_worker_shared == NULL)
		return;
	SpinLockAcquire(&restart_worker_shared->mutex);
	procno = restart_worker_shared->worker_procno;
	restart_worker_shared->commit_wakeups++;
	SpinLockRelease(&restart_worker_shared->mutex);

	if (procno >= 0)
		SetLatch(&ProcGlobal->allProcs[procno].procLatch);
}

/*
 * Transaction callback: wake the worker when a marked transaction commits,
 * forget the mark when it aborts or is prepared (a prepared transaction is
 * found by the worker's safety-net poll once it is committed).
 */
static void
wake_xact_callback(XactEvent event, void *arg)
{
	if (!wake_pending)
		return;
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			wake_pending = false;
			wake_set_worker_latch();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			wake_pending = false;
			break;
		default:
			break;
	}
}

/*
 * Trigger function: mark the current transaction so that its commit wakes
 * the worker.  The callback is registered once per backend.
 */
Datum
restart_worker_wake_worker_at_commit(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("restart_worker_wake_worker_at_commit() must be called as a trigger")));

	if (!wake_callback_registered)
	{
		RegisterXactCallback(wake_xact_callback, NULL);
		wake_callback_registered = true;
	}
	wake_pending = true;
	PG_RETURN_POINTER(NULL);
}

/*
 * The number of wake-ups committing transactions have sent since the
 * server started.  The worker compares it before it waits: a wait inside
 * one of its own transactions (for a lock, say) resets its latch, and so
 * may use up a wake-up meant for the main loop.
 */
uint64
restart_worker_wake_count(void)
{
	uint64		count;

	SpinLockAcquire(&restart_worker_shared->mutex);
	count = restart_worker_shared->commit_wakeups;
	SpinLockRelease(&restart_worker_shared->mutex);
	return count;
}

/*
 * SQL function: the number of wake-ups committing transactions have sent
 * since the server started, or NULL when the library was not preloaded.
 */
Datum
restart_worker_commit_wakeups(PG_FUNCTION_ARGS)
{
	uint64		count;

	if (restart_worker_shared == NULL)
		PG_RETURN_NULL();
	SpinLockAcquire(&restart_worker_shared->mutex);
	count = restart_worker_shared->commit_wakeups;
	SpinLockRelease(&restart_worker_shared->mutex);
	PG_RETURN_INT64((int64) count);
}
