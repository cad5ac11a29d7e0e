/*-------------------------------------------------------------------------
 *
 * record.c
 *		Record what agents answered, in the worker's short transactions.
 *
 * The policy (which answers are retried, backoff, deadline, lease) is in
 * SQL, in src/sql/50_worker.sql.  The common answer, a job object, is read
 * in C (src/job.c) and recorded with worker_record_job(), or with
 * worker_record_jobs() for many at once; anything else is judged by
 * worker_record(), which parses it with jsonb.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "pgstat.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

/* The recording statements, prepared once (see rw_plan() in src/xact.c). */
static SPIPlanPtr record_plan_answer = NULL;
static SPIPlanPtr record_plan_job = NULL;

/*
 * What the answers recorded in the transaction at hand did to their
 * requests, counted in restart_worker.status() once it has committed.
 */
typedef struct RecordCounts
{
	int			retries;
	int			completed;
	int			failed;
} RecordCounts;

static RecordCounts record_counts;

/*
 * Translate a recorded outcome for the caller, and note what to count.  An
 * end (completed or failed) makes the transaction commit durably (see
 * src/xact.c), whether the agent reported it or the worker decided it.
 */
static RwOutcome
record_outcome(const char *action)
{
	if (strcmp(action, "completed") == 0 || strcmp(action, "failed") == 0)
		rw_xact_make_durable();
	if (strcmp(action, "follow") == 0)
		return RW_OUTCOME_FOLLOW;
	if (strcmp(action, "locked") == 0)
		return RW_OUTCOME_LOCKED;
	if (strcmp(action, "retry") == 0)
	{
		record_counts.retries++;
		return RW_OUTCOME_RETRY;
	}
	if (strcmp(action, "completed") == 0)
		record_counts.completed++;
	else if (strcmp(action, "failed") == 0)
		record_counts.failed++;
	return RW_OUTCOME_DONE;
}

/*
 * Count what the committed recording did.
 */
static void
record_count_committed(void)
{
	RW_COUNT_ADD(retries, record_counts.retries);
	RW_COUNT_ADD(completed, record_counts.completed);
	RW_COUNT_ADD(failed, record_counts.failed);
	memset(&record_counts, 0, sizeof(record_counts));
}

/*
 * Whether an answer is a job object src/job.c reads, in *job.
 */
static bool
record_read_job(RwCall *call, RwJob *job)
{
	return call->kind == RW_CALL_ANSWER && call->resp != NULL && call->resp_len > 0 &&
		(call->http_status == 200 || call->http_status == 202) &&
		pg_verifymbstr(call->resp, call->resp_len, true) &&
		rw_job_read(call->id, call->resp, call->resp_len, job);
}

/*
 * Whether an answer is a 202 whose job already ended: the agent accepted
 * the job and held its answer while it ran (docs/protocol.md, POST with
 * wait).  The row goes from dispatching to the end in one update, and
 * running is announced first.
 */
static bool
record_ends_accepted(RwCall *call, const RwJob *job)
{
	return call->http_status == 202 && strcmp(job->status, "running") != 0;
}

/*
 * The job a request's answers leave it in: the job object of its answer
 * (first), or of the answer (second) after a held 202 (first) that said
 * running.  *running_first says that the row goes from dispatching to the
 * end in one update, and running is announced first: after a held 202, or
 * for a 202 that tells the job's end.  Returns false if the answers are
 * anything else: worker_record() then judges them one by one.
 */
static bool
record_answers_job(RwCall *first, RwCall *second, RwJob *job, bool *running_first)
{
	RwJob		running;

	*running_first = false;
	if (second == NULL)
	{
		if (!record_read_job(first, job))
			return false;
		*running_first = record_ends_accepted(first, job);
		return true;
	}
	if (!record_read_job(first, &running) ||
		strcmp(running.status, "running") != 0 ||
		!record_read_job(second, job))
		return false;
	*running_first = strcmp(job->status, "running") != 0;
	return true;
}

/*
 * Record a job object read by src/job.c with worker_record_job(), in the
 * caller's transaction.  Returns false if that left the request alone
 * (its row is locked or no longer the worker's): worker_record() then says
 * what it is.
 */
static bool
record_job(RwCall *call, const RwJob *job, TimestampTz accepted_at,
		   bool running_first, RwOutcome *outcome)
{
	Oid			types[10] = {TEXTOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
	INT4OID, TEXTOID, TEXTOID, INT4OID, TIMESTAMPTZOID, BOOLOID};
	Datum		values[10];
	char		nulls[10];
	bool		isnull;
	Datum		d;

	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(call->id);
	values[1] = CStringGetTextDatum(job->status);
	values[2] = TimestampTzGetDatum(job->started_at);
	nulls[2] = job->has_started_at ? ' ' : 'n';
	values[3] = TimestampTzGetDatum(job->finished_at);
	nulls[3] = job->has_finished_at ? ' ' : 'n';
	values[4] = Int32GetDatum(job->exit_code);
	nulls[4] = job->has_exit_code ? ' ' : 'n';
	values[5] = job->output ? CStringGetTextDatum(job->output) : (Datum) 0;
	nulls[5] = job->output ? ' ' : 'n';
	values[6] = job->error ? CStringGetTextDatum(job->error) : (Datum) 0;
	nulls[6] = job->error ? ' ' : 'n';
	values[7] = Int32GetDatum(rw_lease_ms());
	values[8] = TimestampTzGetDatum(accepted_at);
	nulls[8] = accepted_at == 0 ? 'n' : ' ';
	values[9] = BoolGetDatum(running_first);
	rw_run_one_row(&record_plan_job,
				   "SELECT restart_worker.worker_record_job("
				   "$1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
				   10, types, values, nulls, false);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		return false;
	*outcome = record_outcome(TextDatumGetCString(d));
	return true;
}

/*
 * Record the outcome of one call in the caller's transaction; see
 * rw_record().  The common answer, a job object in a 200 or 202, is read
 * in C (src/job.c) if fast is true; anything else is judged by
 * worker_record().
 */
static RwOutcome
record_one(RwCall *call, TimestampTz accepted_at, bool fast,
		   TimestampTz *next_at)
{
	Oid			types[11] = {TEXTOID, TEXTOID, INT4OID, TEXTOID, BOOLOID,
	BOOLOID, INT4OID, INT4OID, INT4OID, INT4OID, TIMESTAMPTZOID};
	Datum		values[11];
	char		nulls[11];
	bool		answered = call->kind == RW_CALL_ANSWER;
	bool		valid;
	bool		isnull;
	Datum		d;
	RwJob		job;
	bool		running_first;
	RwOutcome	outcome;

	*next_at = 0;
	if (fast && record_answers_job(call, NULL, &job, &running_first) &&
		record_job(call, &job, accepted_at, running_first, &outcome))
		return outcome;

	valid = answered && call->resp != NULL && call->resp_len > 0 &&
		pg_verifymbstr(call->resp, call->resp_len, true);
	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(call->id);
	values[1] = CStringGetTextDatum(rw_http_kind_name(call->kind));
	values[2] = Int32GetDatum((int32) call->http_status);
	if (!answered)
		nulls[2] = 'n';
	if (valid)
		values[3] = PointerGetDatum(cstring_to_text_with_len(call->resp, call->resp_len));
	else
		nulls[3] = 'n';
	values[4] = BoolGetDatum(call->sent);
	values[5] = BoolGetDatum(call->maybe_sent);
	values[6] = Int32GetDatum(rw_max_attempts);
	values[7] = Int32GetDatum(rw_retry_base);
	values[8] = Int32GetDatum(rw_retry_max);
	values[9] = Int32GetDatum(rw_lease_ms());
	values[10] = TimestampTzGetDatum(accepted_at);
	if (accepted_at == 0)
		nulls[10] = 'n';
	rw_run_one_row(&record_plan_answer,
				   "SELECT action, next_at FROM restart_worker.worker_record("
				   "$1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
				   11, types, values, nulls, false);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
	*next_at = isnull ? 0 : DatumGetTimestampTz(d);
	return record_outcome(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1));
}

/*
 * Record a request's answers one by one, in the caller's transaction: the
 * first, and the second too if the first says to follow the job.
 */
static RwOutcome
record_each(RwCall *first, RwCall *second, TimestampTz accepted_at, bool fast,
			TimestampTz *next_at)
{
	RwOutcome	outcome = record_one(first, accepted_at, fast, next_at);

	if (outcome == RW_OUTCOME_FOLLOW && second != NULL)
		outcome = record_one(second, accepted_at, fast, next_at);
	return outcome;
}

/*
 * The recording proper, in its own transaction; see rw_record().
 */
static RwOutcome
record_run(RwCall *first, RwCall *second, TimestampTz accepted_at,
		   bool fast, TimestampTz *next_at)
{
	RwOutcome	outcome;
	RwJob		job;
	bool		running_first;

	memset(&record_counts, 0, sizeof(record_counts));
	rw_xact_begin("restart_worker: record an agent's answer");
	if (!rw_extension_exists())
	{
		rw_xact_end();
		return RW_OUTCOME_DONE;
	}
	rw_after_claim_work();
	/* A held 202 and the next answer: one row update (see worker_record_job()). */
	if (fast && second != NULL && record_answers_job(first, second, &job, &running_first) &&
		record_job(second, &job, accepted_at, running_first, &outcome))
	{
		*next_at = 0;
		rw_xact_end();
		return outcome;
	}
	outcome = record_each(first, second, accepted_at, fast, next_at);
	rw_xact_end();
	return outcome;
}

/*
 * Run record_run() and count what it did.  If it fails, roll back:
 * unless this is the last attempt, log the error as a LOG line and return
 * false, so that the caller tries again; on the last attempt log it as
 * the error it is and return RW_OUTCOME_ERROR in *outcome.
 */
static bool
record_try(RwCall *first, RwCall *second, TimestampTz accepted_at,
		   bool fast, bool last, TimestampTz *next_at, RwOutcome *outcome)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool done = true;

	*next_at = 0;
	PG_TRY();
	{
		*outcome = record_run(first, second, accepted_at, fast, next_at);
		rw_after_claim_done(true);
		record_count_committed();
	}
	PG_CATCH();
	{
		if (!last)
		{
			ErrorData  *edata = rw_xact_abort(cxt);

			ereport(LOG,
					(errmsg("restart_worker: recording an agent's answer failed, trying again%s: %s",
							fast ? " with every answer judged in SQL" :
							" without the announcements and next-due look-up of the last claim",
							edata->message)));
			FreeErrorData(edata);
			done = false;
		}
		else
		{
			rw_xact_recover(cxt);
			rw_after_claim_done(false);
			*outcome = RW_OUTCOME_ERROR;
		}
		*next_at = 0;
	}
	PG_END_TRY();
	return done;
}

/*
 * Record the outcome of a call in its own transaction and say what to do
 * next; if second is not NULL and the first outcome says to follow the
 * job, record second (the answer of that next call) in the same
 * transaction.  accepted_at is when the agent accepted the job, if an
 * earlier answer said so (0 if not).  For a retry, *next_at is when the
 * request is due again.  Any after-claim work is done in the same
 * transaction.  If the extension is gone, the request is forgotten.  If
 * recording fails, the error is logged and the request is left to its
 * lease.  After an error (say, a job object nested too deep for the
 * parser of the fast path) the transaction is done again with every answer
 * judged in SQL, and if that fails too, once more without the after-claim
 * work, so that an error there cannot keep an answer from being recorded.
 */
RwOutcome
rw_record(RwCall *first, RwCall *second, TimestampTz accepted_at,
		  TimestampTz *next_at)
{
	RwOutcome	outcome;

	if (record_try(first, second, accepted_at, true, false, next_at, &outcome))
		return outcome;
	if (rw_after_claim_due() == 0)
		(void) record_try(first, second, accepted_at, false, true, next_at, &outcome);
	else if (!record_try(first, second, accepted_at, false, false, next_at, &outcome))
	{
		/* The after-claim work may be what fails: the answer goes first. */
		rw_after_claim_done(false);
		(void) record_try(first, second, accepted_at, false, true, next_at, &outcome);
	}
	return outcome;
}

/*
 * Recording many requests at once.  In a burst, answers come in together:
 * the worker records those of one turn in one transaction, and their job
 * objects with one call of worker_record_jobs(), one update of every row.
 * What that call leaves alone, and any answer that is not a job object, is
 * recorded one by one in the same transaction, as rw_record() does.  If the
 * transaction fails, each request is recorded again in a transaction of its
 * own with rw_record(), whose retries narrow the error down.
 */
static SPIPlanPtr record_plan_jobs = NULL;

/* The columns of worker_record_jobs(): an array each, one job per element. */
#define RECORD_NCOLS 9
static const Oid record_col_types[RECORD_NCOLS] = {
	UUIDOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, INT4OID, TEXTOID, TEXTOID,
	TIMESTAMPTZOID, BOOLOID
};
static const Oid record_col_array_types[RECORD_NCOLS] = {
	UUIDARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID, TIMESTAMPTZARRAYOID, INT4ARRAYOID,
	TEXTARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID, BOOLARRAYOID
};

typedef struct RecordColumns
{
	int			n;				/* jobs so far */
	int		   *record;			/* the record of each job */
	Datum	   *values[RECORD_NCOLS];
	bool	   *nulls[RECORD_NCOLS];
} RecordColumns;

/*
 * Add a job to the columns, for records[k].
 */
static void
record_batch_add(RecordColumns *cols, int k, const pg_uuid_t *id, const RwJob *job,
				 TimestampTz accepted_at, bool running_first)
{
	int			i = cols->n++;
	pg_uuid_t  *uuid = palloc(sizeof(pg_uuid_t));

	*uuid = *id;
	cols->record[i] = k;
	cols->values[0][i] = UUIDPGetDatum(uuid);
	cols->values[1][i] = CStringGetTextDatum(job->status);
	cols->values[2][i] = TimestampTzGetDatum(job->started_at);
	cols->nulls[2][i] = !job->has_started_at;
	cols->values[3][i] = TimestampTzGetDatum(job->finished_at);
	cols->nulls[3][i] = !job->has_finished_at;
	cols->values[4][i] = Int32GetDatum(job->exit_code);
	cols->nulls[4][i] = !job->has_exit_code;
	cols->values[5][i] = job->output ? CStringGetTextDatum(job->output) : (Datum) 0;
	cols->nulls[5][i] = job->output == NULL;
	cols->values[6][i] = job->error ? CStringGetTextDatum(job->error) : (Datum) 0;
	cols->nulls[6][i] = job->error == NULL;
	cols->values[7][i] = TimestampTzGetDatum(accepted_at);
	cols->nulls[7][i] = accepted_at == 0;
	cols->values[8][i] = BoolGetDatum(running_first);
}

/*
 * The columns for every record whose answers are a job, in the caller's
 * transaction (its memory goes with it).
 */
static void
record_batch_columns(RwRecord *records, int n, RecordColumns *cols)
{
	int			c;
	int			k;

	cols->n = 0;
	cols->record = palloc(sizeof(int) * n);
	for (c = 0; c < RECORD_NCOLS; c++)
	{
		cols->values[c] = palloc0(sizeof(Datum) * n);
		cols->nulls[c] = palloc0(sizeof(bool) * n);
	}
	for (k = 0; k < n; k++)
	{
		RwJob		job;
		bool		running_first;

		if (record_answers_job(records[k].first, records[k].second, &job, &running_first))
			record_batch_add(cols, k, &records[k].first->uuid, &job,
							 records[k].accepted_at, running_first);
	}
}

/*
 * Record the jobs in the columns with one call of worker_record_jobs(), in
 * the caller's transaction; marks the records it recorded.
 */
static void
record_batch_jobs(RwRecord *records, RecordColumns *cols)
{
	Oid			types[RECORD_NCOLS + 1];
	Datum		values[RECORD_NCOLS + 1];
	int			dims[1] = {cols->n};
	int			lbs[1] = {1};
	int			c;
	uint64		i;

	for (c = 0; c < RECORD_NCOLS; c++)
	{
		int16		len;
		bool		byval;
		char		align;

		get_typlenbyvalalign(record_col_types[c], &len, &byval, &align);
		types[c] = record_col_array_types[c];
		values[c] = PointerGetDatum(construct_md_array(cols->values[c], cols->nulls[c],
													   1, dims, lbs, record_col_types[c],
													   len, byval, align));
	}
	types[RECORD_NCOLS] = INT4OID;
	values[RECORD_NCOLS] = Int32GetDatum(rw_lease_ms());
	if (SPI_execute_plan(rw_plan(&record_plan_jobs,
								 "SELECT n, action FROM restart_worker.worker_record_jobs("
								 "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
								 RECORD_NCOLS + 1, types),
						 values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "restart_worker: worker_record_jobs() failed");
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		bool		isnull;
		int			n = DatumGetInt32(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull));
		RwRecord   *rec;

		if (isnull || n < 1 || n > cols->n)
			elog(ERROR, "restart_worker: worker_record_jobs() returned job %d of %d", n, cols->n);
		rec = &records[cols->record[n - 1]];
		rec->outcome = record_outcome(SPI_getvalue(tup, SPI_tuptable->tupdesc, 2));
		rec->next_at = 0;
		rec->recorded = true;
	}
}

/*
 * The recording of many requests, in one transaction; see rw_record_all().
 */
static void
record_batch_run(RwRecord *records, int n)
{
	RecordColumns cols;
	int			k;

	memset(&record_counts, 0, sizeof(record_counts));
	for (k = 0; k < n; k++)
		records[k].recorded = false;
	rw_xact_begin("restart_worker: record agents' answers");
	if (!rw_extension_exists())
	{
		for (k = 0; k < n; k++)
			records[k].outcome = RW_OUTCOME_DONE;
		rw_xact_end();
		return;
	}
	rw_after_claim_work();
	record_batch_columns(records, n, &cols);
	if (cols.n > 0)
		record_batch_jobs(records, &cols);
	for (k = 0; k < n; k++)
	{
		RwRecord   *rec = &records[k];

		if (rec->recorded)
			continue;
		rec->outcome = record_each(rec->first, rec->second, rec->accepted_at, true,
								   &rec->next_at);
	}
	rw_xact_end();
}

/*
 * Run record_batch_run() and count what it did.  Returns false, having
 * logged the error and rolled back, if it failed.
 */
static bool
record_batch_try(RwRecord *records, int n)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool done = true;

	PG_TRY();
	{
		record_batch_run(records, n);
		rw_after_claim_done(true);
		record_count_committed();
	}
	PG_CATCH();
	{
		ErrorData  *edata = rw_xact_abort(cxt);

		ereport(LOG,
				(errmsg("restart_worker: recording %d answers at once failed, recording them one by one: %s",
						n, edata->message)));
		FreeErrorData(edata);
		done = false;
	}
	PG_END_TRY();
	return done;
}

/*
 * Record the answers of many requests and say, in each record, what to do
 * next, as rw_record() does for one: in one transaction, or, if that
 * fails, in one transaction each.
 */
void
rw_record_all(RwRecord *records, int n)
{
	int			k;

	if (n > 1 && record_batch_try(records, n))
		return;
	for (k = 0; k < n; k++)
		records[k].outcome = rw_record(records[k].first, records[k].second,
									   records[k].accepted_at, &records[k].next_at);
}
