/*-------------------------------------------------------------------------
 *
 * restart_worker.h
 *		Declarations shared by the files of the restart_worker extension.
 *
 * The path of a request through the extension, one file per step:
 *	src/sql/20_request.sql	request_service_restart() inserts the row;
 *	src/wake.c				the insert sets the worker's latch at COMMIT;
 *	src/worker*.c			the background worker claims, calls the agent, records.
 *
 *-------------------------------------------------------------------------
 */
#ifndef RESTART_WORKER_H
#define RESTART_WORKER_H

#include "postgres.h"

#include "storage/latch.h"
#include "storage/spin.h"

/*
 * State in shared memory, created by the postmaster when the library is in
 * shared_preload_libraries.  The worker publishes its PGPROC number here so
 * that committing backends can set its latch; the counters are for
 * observation and tests.
 */
typedef struct RestartWorkerShared
{
	slock_t		mutex;			/* protects the fields below */
	int			worker_procno;	/* pgprocno of the running worker, or -1 */
	pid_t		worker_pid;		/* its pid, or 0 */
	uint64		commit_wakeups; /* latches set by committing transactions */
} RestartWorkerShared;

/* src/wake.c */
extern RestartWorkerShared *restart_worker_shared;
extern void restart_worker_wake_init(void);
extern void restart_worker_wake_publish(void);
extern void restart_worker_wake_unpublish(void);

#endif							/* RESTART_WORKER_H */
