/*-------------------------------------------------------------------------
 *
 * guc.c
 *		The settings of the restart_worker background worker.
 *
 * Every setting is named restart_worker.*; the prefix is reserved so that
 * a misspelt setting in postgresql.conf is reported instead of ignored.
 * Only the database and the role need a restart; the others are read
 * again on SIGHUP.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/guc.h"

#include "restart_worker.h"

char	   *rw_database = NULL;
char	   *rw_role = NULL;
int			rw_poll_interval = 300;
int			rw_max_in_flight = 128;
int			rw_max_connections_per_agent = 8;
int			rw_connect_timeout = 5000;
int			rw_request_timeout = 30000;
int			rw_retry_base = 1000;
int			rw_retry_max = 60000;
int			rw_max_attempts = 5;
int			rw_follow_wait = 25;
int			rw_settle_margin = 10;
int			rw_max_response_size = 1024;
char	   *rw_ca_file = NULL;

/*
 * Define the settings that decide where the worker connects.  They are
 * fixed at server start: the worker's connection cannot move.
 */
static void
guc_define_connection(void)
{
	DefineCustomStringVariable("restart_worker.database",
							   "Database in which the background worker looks for restart requests.",
							   "The extension must be created in this database.",
							   &rw_database, "postgres",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("restart_worker.role",
							   "Role the background worker connects as; empty means the bootstrap superuser.",
							   "A role other than a superuser needs restart_worker.grant_admin().",
							   &rw_role, "",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
}

/*
 * Define the timing settings: the safety-net poll, the timeouts and the
 * retry backoff.
 */
static void
guc_define_timing(void)
{
	DefineCustomIntVariable("restart_worker.poll_interval",
							"Interval of the safety-net look at the queue when nothing wakes the worker.",
							"Requests are dispatched at COMMIT; this only catches what no wake-up announced.",
							&rw_poll_interval, 300, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("restart_worker.connect_timeout",
							"Time allowed to connect to an agent.",
							NULL, &rw_connect_timeout, 5000, 100, 600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("restart_worker.request_timeout",
							"Time allowed for a whole call to an agent (a long-poll gets follow_wait more).",
							NULL, &rw_request_timeout, 30000, 100, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("restart_worker.retry_base",
							"Delay before the second attempt of a call that may succeed later; it doubles per attempt.",
							NULL, &rw_retry_base, 1000, 1, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("restart_worker.retry_max",
							"Longest delay between two attempts.",
							NULL, &rw_retry_max, 60000, 1, 86400000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("restart_worker.follow_wait",
							"Seconds each long-poll asks the agent to wait for a running job to end.",
							NULL, &rw_follow_wait, 25, 1, 300,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("restart_worker.settle_margin",
							"How far the clock of a server may be behind that of the server before it: pending requests due up to this long after the worker's first start are settled as possibly sent.",
							"Read when the first worker starts after a server start, a crash or a promotion.",
							&rw_settle_margin, 10, 0, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
}

/*
 * Define the limits: attempts, calls in flight, connections, response size.
 */
static void
guc_define_limits(void)
{
	DefineCustomIntVariable("restart_worker.max_attempts",
							"Calls to an agent before a request that never reached it fails, unless its service sets max_attempts.",
							NULL, &rw_max_attempts, 5, 1, 100,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("restart_worker.max_in_flight",
							"Calls to agents the worker makes at the same time; bounds its sockets.",
							NULL, &rw_max_in_flight, 128, 1, 512,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("restart_worker.max_connections_per_agent",
							"Connections the worker opens to one agent at most (one is always kept for new requests); calls beyond wait for one.",
							NULL, &rw_max_connections_per_agent, 8, 2, 512,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("restart_worker.max_response_size",
							"Largest answer accepted from an agent.",
							NULL, &rw_max_response_size, 1024, 16, 65536,
							PGC_SIGHUP, GUC_UNIT_KB, NULL, NULL, NULL);
	DefineCustomStringVariable("restart_worker.ca_file",
							   "File of CA certificates that https agents are verified against; empty means the system's.",
							   NULL, &rw_ca_file, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
}

/*
 * Define every setting and reserve the prefix.  Called from _PG_init, also
 * when the library is loaded without preloading, so that SHOW works; the
 * settings fixed at server start can only be defined while preloading.
 */
void
restart_worker_guc_init(void)
{
	if (process_shared_preload_libraries_in_progress)
		guc_define_connection();
	guc_define_timing();
	guc_define_limits();
#if PG_VERSION_NUM >= 150000
	MarkGUCPrefixReserved("restart_worker");
#else
	EmitWarningsOnPlaceholders("restart_worker");
#endif
}
