/*-------------------------------------------------------------------------
 *
 * restart_worker.c
 *		Entry point of the restart_worker extension: request restarts of
 *		services on other hosts from SQL, carried out by a background worker
 *		that calls a signed restart agent on each host.
 *
 * This file only wires the parts together when the library is loaded; each
 * part lives in its own file under src/ (see src/restart_worker.h).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"

#include "restart_worker.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/*
 * Module load callback.  The settings are defined whenever the library is
 * loaded; shared memory, the DROP DATABASE hook and the background worker
 * exist only when it is in shared_preload_libraries.  Loaded later (by a
 * call to one of its SQL functions) it provides the functions alone.
 */
void
_PG_init(void)
{
	restart_worker_guc_init();
	if (!process_shared_preload_libraries_in_progress)
		return;

	restart_worker_wake_init();
	restart_worker_dropdb_init();
	restart_worker_register();
}
