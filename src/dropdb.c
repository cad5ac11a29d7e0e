/*-------------------------------------------------------------------------
 *
 * dropdb.c
 *		Let DROP DATABASE of the worker's database proceed.
 *
 * The worker stays connected to restart_worker.database, and DROP DATABASE
 * refuses a database that others are connected to.  Before a DROP DATABASE
 * of that database runs, the worker is asked to exit and awaited.  The
 * postmaster starts it again 5 s later; if the database is gone by then,
 * its connection fails and it backs off (src/worker.c) until the database
 * exists again or restart_worker.database is changed.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"

#include "restart_worker.h"

static ProcessUtility_hook_type prev_process_utility = NULL;

/*
 * Ask the worker to exit and wait up to 10 s until it has.
 */
static void
dropdb_stop_worker(void)
{
	int			i;

	for (i = 0; i < 1000; i++)
	{
		pid_t		pid;

		SpinLockAcquire(&restart_worker_shared->mutex);
		pid = restart_worker_shared->worker_pid;
		SpinLockRelease(&restart_worker_shared->mutex);
		if (pid == 0)
			return;
		if (i == 0)
			kill(pid, SIGTERM);
		CHECK_FOR_INTERRUPTS();
		pg_usleep(10000L);
	}
}

/*
 * ProcessUtility hook: before DROP DATABASE of the worker's database, stop
 * the worker; then run the statement as usual.
 */
static void
dropdb_process_utility(PlannedStmt *pstmt, const char *queryString,
					   bool readOnlyTree, ProcessUtilityContext context,
					   ParamListInfo params, QueryEnvironment *queryEnv,
					   DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (IsA(parsetree, DropdbStmt) && restart_worker_shared != NULL &&
		rw_database != NULL &&
		strcmp(((DropdbStmt *) parsetree)->dbname, rw_database) == 0)
		dropdb_stop_worker();

	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context,
							 params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

/*
 * Install the hook.  Called from _PG_init when preloaded.
 */
void
restart_worker_dropdb_init(void)
{
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = dropdb_process_utility;
}
