/*-------------------------------------------------------------------------
 *
 * settle.c
 *		Claims that commit asynchronously, and what a crash may have lost of
 *		them.
 *
 * A claim makes its requests dispatching and commits before their calls
 * are sent (src/claim.c).  Waiting for that commit to reach the disk was
 * most of a request's way from its COMMIT to its agent, so claims commit
 * asynchronously, as the outcomes short of an end always did (src/xact.c).
 *
 * A claim lost in a crash (its commit not yet flushed), or one a standby
 * had not received when it was promoted, leaves its requests pending, yet
 * their calls may have reached their agent.  Such a request was due before
 * the crash, so before the first start of the worker in the server's life
 * (of its shared memory): a claim takes due requests only.  So, once in
 * the life of the server and before it claims anything, the worker takes
 * every request still pending that was due before that start for one that
 * may have been sent (worker_settle() in src/sql/50_worker.sql): it becomes
 * dispatching, is sent again with the same id (the agent answers with the
 * job it has, if any), holds its service's cooldown and can no longer be
 * cancelled.  Until the worker has done so, cancelling such a request is
 * refused: restart_worker.cancel() asks worker_unsettled_before(), below.
 * The time is compared with times an earlier server wrote, maybe on
 * another host (a promoted standby): restart_worker.settle_margin allows
 * for a clock that is behind the earlier server's; a lost claim of a
 * server whose clock was further ahead is not held back.
 *
 * A server that starts after a clean stop, as a primary, has lost no claim:
 * the stop's checkpoint flushed every commit.  Its worker has nothing to
 * settle, unless the server before it had not settled either (its worker
 * could not, say, before an operator restarted it): a marker file in the
 * data directory, made at every other start (after a crash, as a standby,
 * for a recovery) and removed once the worker has settled, carries that
 * over a clean stop (rw_settle_needed()).
 *
 * While settling fails (a missing privilege, say: after restoring a dump,
 * see the README) the worker claims nothing: a claim of such a request
 * taken for one never sent could make it pending again, cancellable.
 *
 * Claims commit synchronously, as they did before, with an extension older
 * than 1.6 (it has no worker_settle(), nor the check in cancel()), and
 * while synchronous standbys are configured: a primary cut off from its
 * standbys, while a standby is promoted in its place, must send no call
 * that the new primary does not know of.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/stat.h>

#include "access/xlog.h"
#include "catalog/pg_control.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "common/controldata_utils.h"
#include "common/file_perm.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "replication/syncrep.h"
#include "storage/fd.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

PG_FUNCTION_INFO_V1(restart_worker_worker_unsettled_before);

/*
 * In the data directory while a server that may hold claims an earlier one
 * lost has not settled them.
 */
#define SETTLE_MARKER "restart_worker.unsettled"

static TimestampTz settle_retry_at = 0; /* no attempt before then */
static int	settle_failures = 0;	/* attempts in a row that failed */
static SPIPlanPtr settle_plan = NULL;

/*
 * Whether a file exists (or cannot be looked at: then it may).  Paths are
 * relative to the data directory, every server process's working
 * directory.
 */
static bool
settle_file_exists(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 || errno != ENOENT;
}

/*
 * Whether the server stopped cleanly before this start and starts as a
 * primary: pg_control says it was shut down (not while in recovery), and
 * there is no signal file that makes it recover.  Read from the disk,
 * before the startup process changes it.
 */
static bool
settle_clean_start(void)
{
	ControlFileData *control;
	bool		crc_ok;
	bool		clean;

	control = get_controlfile(DataDir, &crc_ok);
	clean = crc_ok && control->state == DB_SHUTDOWNED;
	pfree(control);
	return clean && !settle_file_exists(STANDBY_SIGNAL_FILE) &&
		!settle_file_exists(RECOVERY_SIGNAL_FILE);
}

/*
 * Make the marker file, durably, so that a clean stop before the worker
 * settles does not make the next server forget that it must.  A failure is
 * only logged (by fsync_fname_ext() for the directory): the server must
 * start, and this one settles all the same.
 */
static void
settle_marker_create(void)
{
	int			fd;
	bool		ok;

	fd = BasicOpenFilePerm(SETTLE_MARKER, O_WRONLY | O_CREAT | PG_BINARY,
						   pg_file_create_mode);
	ok = fd >= 0 && pg_fsync(fd) == 0;
	if (!ok)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("restart_worker: could not create file \"%s\": %m", SETTLE_MARKER),
				 errdetail("A clean stop before the worker has settled would make the next start skip settling.")));
	if (fd >= 0)
		close(fd);
	if (ok)
		(void) fsync_fname_ext(".", true, false, WARNING);
}

/*
 * Called in the postmaster as it makes the shared memory, at the server's
 * start and again after a crash, before the startup process runs: whether
 * the worker will have to settle in this life of the server.  It need not
 * after a clean stop, as a primary, if the server before had settled (no
 * marker file); otherwise the marker is made, and removed once the worker
 * has settled.
 */
bool
rw_settle_needed(void)
{
	bool		clean = settle_clean_start();

	if (settle_file_exists(SETTLE_MARKER))
	{
		if (clean)
			ereport(LOG,
					(errmsg("restart_worker: the worker has yet to settle what a crash before the last clean stop may have lost of its claims"),
					 errdetail("The file \"%s\" in the data directory says so.", SETTLE_MARKER)));
		return true;
	}
	if (clean)
		return false;
	settle_marker_create();
	return true;
}

/*
 * A worker process started: the first in the life of the server notes
 * when, plus the margin then set, as the time before which a pending
 * request may have been sent.  It starts once recovery is finished, so
 * after any crash and after a promotion.  Noting the bound, not the
 * start, keeps it the same for the worker and for cancel() in every
 * backend, whatever the setting says later.
 */
void
rw_settle_note_start(void)
{
	TimestampTz before = GetCurrentTimestamp() +
		(TimestampTz) rw_settle_margin * USECS_PER_SEC;

	SpinLockAcquire(&restart_worker_shared->mutex);
	if (restart_worker_shared->settle_before == 0)
		restart_worker_shared->settle_before = before;
	SpinLockRelease(&restart_worker_shared->mutex);
}

/*
 * Whether the worker has settled, in the life of the server, the requests
 * an earlier server may have sent; and *before, the time before which a
 * pending request may be one of those: when the first worker started,
 * plus the margin, or 0 if none has started yet.
 */
static bool
settle_state(TimestampTz *before)
{
	bool		settled;

	SpinLockAcquire(&restart_worker_shared->mutex);
	settled = restart_worker_shared->settled;
	*before = restart_worker_shared->settle_before;
	SpinLockRelease(&restart_worker_shared->mutex);
	return settled;
}

/*
 * Whether the installed extension has worker_settle() (1.6 and later).
 * Runs in the caller's transaction.
 */
static bool
settle_function_exists(void)
{
	Oid			types[1] = {TIMESTAMPTZOID};

	return OidIsValid(rw_extension_function("worker_settle", 1, types));
}

/*
 * Settle in a transaction of its own, which commits synchronously: the
 * claims after it do not.  Without the extension, or with one older than
 * 1.6 (whose claims commit synchronously), no earlier claim can have been
 * lost: there is nothing to settle, and an extension created or updated
 * later needs nothing either.
 */
static void
settle_run(TimestampTz before)
{
	Oid			types[1] = {TIMESTAMPTZOID};
	Datum		values[1];
	bool		isnull;
	int32		count = 0;

	rw_xact_begin("restart_worker: settle the requests an earlier server may have sent");
	if (rw_extension_exists() && settle_function_exists())
	{
		rw_xact_make_durable();
		values[0] = TimestampTzGetDatum(before);
		rw_run_one_row(&settle_plan, "SELECT restart_worker.worker_settle($1)",
					   1, types, values, NULL, false);
		count = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0],
											SPI_tuptable->tupdesc, 1, &isnull));
		if (isnull)
			elog(ERROR, "restart_worker: worker_settle() returned NULL");
	}
	rw_xact_end();

	SpinLockAcquire(&restart_worker_shared->mutex);
	restart_worker_shared->settled = true;
	SpinLockRelease(&restart_worker_shared->mutex);
	if (settle_file_exists(SETTLE_MARKER))
		(void) durable_unlink(SETTLE_MARKER, WARNING);
	if (count > 0)
		ereport(LOG,
				(errmsg("restart_worker: %d pending requests due before the server started may have reached their agents; "
						"they are sent again as dispatching", count)));
}

/*
 * settle_run(), catching an error (it is logged and rolled back).  Returns
 * whether the worker settled.
 */
static bool
settle_try(TimestampTz before)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = false;

	PG_TRY();
	{
		settle_run(before);
		ok = true;
	}
	PG_CATCH();
	{
		rw_xact_recover(cxt);
	}
	PG_END_TRY();
	return ok;
}

/*
 * Called before each claim: settle, if the worker has not yet in the life
 * of the server.  Returns whether the worker may claim now.  It may not
 * while settling fails (a lock timeout, a missing privilege; the error is
 * logged): it tries again later, less and less often, and *retry_at says
 * when.
 */
bool
rw_settle(TimestampTz *retry_at)
{
	TimestampTz before;
	TimestampTz now;

	if (settle_state(&before))
		return true;
	now = GetCurrentTimestamp();
	if (settle_retry_at != 0 && now < settle_retry_at)
	{
		*retry_at = settle_retry_at;
		return false;
	}
	if (settle_try(before))
	{
		settle_failures = 0;
		return true;
	}
	settle_failures++;
	settle_retry_at = now + rw_retry_delay(settle_failures);
	*retry_at = settle_retry_at;
	return false;
}

/*
 * Whether the claim at hand may commit asynchronously: the worker has
 * settled, no synchronous standby is configured, and the installed
 * extension has worker_settle() (an older one, created again since, has
 * not, nor the check in its cancel()).  Found once per extension.  Runs in
 * the claim's transaction.
 */
bool
rw_settle_claims_async(void)
{
	static Oid	found_in = InvalidOid;
	TimestampTz before;
	Oid			ext;

	if (!settle_state(&before) ||
		(SyncRepStandbyNames != NULL && SyncRepStandbyNames[0] != '\0'))
		return false;
	ext = get_extension_oid("restart_worker", true);
	if (!OidIsValid(ext) || ext == found_in)
		return OidIsValid(ext);
	if (!settle_function_exists())
		return false;
	found_in = ext;
	return true;
}

/*
 * SQL function restart_worker.worker_unsettled_before(): the time before
 * which a pending request of this database may have been sent by a claim
 * an earlier server lost, while the worker has not yet settled those
 * requests (the first worker's start plus the margin); infinity if no
 * worker has started yet in the life of the server.  NULL once it has
 * settled, in a database other than the worker's, and when the library
 * was not preloaded (there is no worker).
 */
Datum
restart_worker_worker_unsettled_before(PG_FUNCTION_ARGS)
{
	TimestampTz before;
	char	   *dbname;

	if (restart_worker_shared == NULL)
		PG_RETURN_NULL();
	dbname = get_database_name(MyDatabaseId);
	if (dbname == NULL || strcmp(dbname, rw_database) != 0)
		PG_RETURN_NULL();
	if (settle_state(&before))
		PG_RETURN_NULL();
	if (before == 0)
		TIMESTAMP_NOEND(before);
	PG_RETURN_TIMESTAMPTZ(before);
}
