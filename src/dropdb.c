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

#include "access/xact.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/syscache.h"

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
 * Whether a database is a template, which DROP DATABASE refuses to drop.
 */
static bool
dropdb_is_template(Oid dboid)
{
	HeapTuple	tup;
	bool		result = false;

	tup = SearchSysCache1(DATABASEOID, ObjectIdGetDatum(dboid));
	if (HeapTupleIsValid(tup))
	{
		result = ((Form_pg_database) GETSTRUCT(tup))->datistemplate;
		ReleaseSysCache(tup);
	}
	return result;
}

/*
 * Whether a DROP DATABASE of the worker's database will get past the checks
 * that come before its wait for other sessions: run at top level outside a
 * transaction block, by the owner (or a superuser) of a database that
 * exists, is not a template and is not the session's own.  Only then is the worker stopped; anyone else gets the usual
 * error from DROP DATABASE, and the worker goes on.
 */
static bool
dropdb_will_proceed(DropdbStmt *stmt, ProcessUtilityContext context)
{
	Oid			dboid;

	if (restart_worker_shared == NULL || rw_database == NULL ||
		strcmp(stmt->dbname, rw_database) != 0)
		return false;
	if (context != PROCESS_UTILITY_TOPLEVEL || IsTransactionBlock())
		return false;
	dboid = get_database_oid(stmt->dbname, true);
	if (!OidIsValid(dboid) || dboid == MyDatabaseId || dropdb_is_template(dboid))
		return false;
#if PG_VERSION_NUM >= 160000
	return object_ownercheck(DatabaseRelationId, dboid, GetUserId());
#else
	return pg_database_ownercheck(dboid, GetUserId());
#endif
}

/*
 * ProcessUtility hook: before DROP DATABASE of the worker's database, stop
 * the worker if the statement will proceed; then run it as usual.
 */
static void
dropdb_process_utility(PlannedStmt *pstmt, const char *queryString,
					   bool readOnlyTree, ProcessUtilityContext context,
					   ParamListInfo params, QueryEnvironment *queryEnv,
					   DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (IsA(parsetree, DropdbStmt) &&
		dropdb_will_proceed((DropdbStmt *) parsetree, context))
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
