/*-------------------------------------------------------------------------
 *
 * job.c
 *		Read the job object of an agent's answer in C, for the common case.
 *
 * Nearly every answer the worker records is a well-formed job object (a
 * 202 or 200 to a POST, a 200 to a long-poll).  Judging it in SQL
 * (worker_record() in src/sql/50_worker.sql: jsonb, PL/pgSQL checks in
 * exception blocks) cost about three times the row update itself, and the
 * worker records one or two answers per request.  So the fields the row
 * takes are read here with PostgreSQL's own JSON parser and date/time
 * decoder, both of which report bad input instead of raising an error,
 * and checked as worker_record() checks them; src/record.c then records
 * them with worker_record_job().  An answer that is not such an object, or
 * that this code is not sure of, goes to worker_record() as before: this
 * is only a faster path to the same outcome.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "utils/datetime.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

/* The top-level fields of a job object the row takes. */
typedef enum JobField
{
	JOB_OTHER = 0,
	JOB_REQUEST_ID,
	JOB_STATUS,
	JOB_STARTED_AT,
	JOB_FINISHED_AT,
	JOB_EXIT_CODE,
	JOB_OUTPUT,
	JOB_ERROR
} JobField;

/* What the parser's callbacks collect. */
typedef struct JobParse
{
	int			depth;			/* nesting of the value being parsed */
	bool		top_object;		/* the answer is an object */
	bool		bad;			/* a field of ours has the wrong type */
	JobField	field;			/* the top-level field being parsed */
	char	   *text[JOB_ERROR + 1];	/* string or number of each field */
	bool		is_null[JOB_ERROR + 1]; /* JSON null */
} JobParse;

#if PG_VERSION_NUM >= 160000
#define JOB_CALLBACK JsonParseErrorType
#define JOB_CALLBACK_DONE return JSON_SUCCESS
#else
#define JOB_CALLBACK void
#define JOB_CALLBACK_DONE return
#endif

/*
 * Which field of ours a top-level key is.
 */
static JobField
job_field(const char *name)
{
	static const char *const names[] = {
		NULL, "request_id", "status", "started_at", "finished_at",
		"exit_code", "output", "error"
	};

	for (int i = JOB_REQUEST_ID; i <= JOB_ERROR; i++)
		if (strcmp(name, names[i]) == 0)
			return (JobField) i;
	return JOB_OTHER;
}

/*
 * An object or array starts: the answer itself must be an object, and a
 * field of ours must not be either.
 */
static void
job_nested_start(JobParse *p, bool object)
{
	if (p->depth == 0)
		p->top_object = object;
	else if (p->depth == 1 && p->field != JOB_OTHER)
		p->bad = true;
	p->depth++;
}

static JOB_CALLBACK
job_object_start(void *state)
{
	job_nested_start((JobParse *) state, true);
	JOB_CALLBACK_DONE;
}

static JOB_CALLBACK
job_array_start(void *state)
{
	job_nested_start((JobParse *) state, false);
	JOB_CALLBACK_DONE;
}

static JOB_CALLBACK
job_nested_end(void *state)
{
	((JobParse *) state)->depth--;
	JOB_CALLBACK_DONE;
}

/*
 * A key of an object: note which field of ours a top-level one is.  A key
 * given twice counts once, with its last value, as in jsonb.
 */
static JOB_CALLBACK
job_field_start(void *state, char *fname, bool isnull)
{
	JobParse   *p = (JobParse *) state;

	if (p->depth == 1)
		p->field = job_field(fname);
	JOB_CALLBACK_DONE;
}

/*
 * A scalar: keep the value of a top-level field of ours, which must be a
 * number for exit_code and a string for the others (or null).
 */
static JOB_CALLBACK
job_scalar(void *state, char *token, JsonTokenType type)
{
	JobParse   *p = (JobParse *) state;

	if (p->depth == 0)
		p->top_object = false;
	if (p->depth != 1 || p->field == JOB_OTHER)
		JOB_CALLBACK_DONE;
	p->is_null[p->field] = (type == JSON_TOKEN_NULL);
	p->text[p->field] = NULL;
	if (type == (p->field == JOB_EXIT_CODE ? JSON_TOKEN_NUMBER : JSON_TOKEN_STRING))
		p->text[p->field] = token;
	else if (type != JSON_TOKEN_NULL)
		p->bad = true;
	JOB_CALLBACK_DONE;
}

/*
 * Parse body (len bytes, valid in the database encoding) with PostgreSQL's JSON parser,
 * collecting our fields into *p.  Returns false if it is not JSON.
 */
static bool
job_parse_json(char *body, size_t len, JobParse *p)
{
	JsonSemAction sem;
	JsonLexContext *lex;
	JsonParseErrorType rc;

	memset(&sem, 0, sizeof(sem));
	sem.semstate = p;
	sem.object_start = job_object_start;
	sem.object_end = job_nested_end;
	sem.array_start = job_array_start;
	sem.array_end = job_nested_end;
	sem.object_field_start = job_field_start;
	sem.scalar = job_scalar;
#if PG_VERSION_NUM >= 170000
	lex = makeJsonLexContextCstringLen(NULL, body, len, GetDatabaseEncoding(), true);
#else
	lex = makeJsonLexContextCstringLen(body, (int) len, GetDatabaseEncoding(), true);
#endif
	rc = pg_parse_json(lex, &sem);
#if PG_VERSION_NUM >= 170000
	freeJsonLexContext(lex);
#endif
	return rc == JSON_SUCCESS;
}

/*
 * Whether s has the one shape of time stamp worker_record() takes, RFC
 * 3339: YYYY-MM-DDTHH:MM:SS, up to nine decimals, then Z or +HH:MM/-HH:MM.
 */
static bool
job_time_shape(const char *s)
{
	const char *pattern = "dddd-dd-ddTdd:dd:dd";
	int			i;

	for (i = 0; pattern[i] != '\0'; i++)
		if (pattern[i] == 'd' ? !isdigit((unsigned char) s[i]) : s[i] != pattern[i])
			return false;
	s += i;
	if (*s == '.')
	{
		for (i = 1; isdigit((unsigned char) s[i]); i++)
			;
		if (i == 1 || i > 10)
			return false;
		s += i;
	}
	if (*s == 'Z')
		return s[1] == '\0';
	return (s[0] == '+' || s[0] == '-') && isdigit((unsigned char) s[1]) &&
		isdigit((unsigned char) s[2]) && s[3] == ':' &&
		isdigit((unsigned char) s[4]) && isdigit((unsigned char) s[5]) && s[6] == '\0';
}

/*
 * A time stamp field: *has false for null or missing, else the time in
 * *out, decoded by PostgreSQL's own date/time code (which reports an
 * impossible date instead of raising an error).  Returns false if it is
 * no time stamp.
 */
static bool
job_time(const JobParse *p, JobField f, bool *has, TimestampTz *out)
{
	char		workbuf[MAXDATELEN + MAXDATEFIELDS];
	char	   *field[MAXDATEFIELDS];
	int			ftype[MAXDATEFIELDS];
	int			nf;
	int			dtype;
	int			tz = 0;
	struct pg_tm tm;
	fsec_t		fsec;
	const char *s = p->text[f];
#if PG_VERSION_NUM >= 160000
	DateTimeErrorExtra extra;
#endif

	*has = false;
	*out = 0;
	if (s == NULL)
		return true;
	*has = true;
	if (!job_time_shape(s) ||
		ParseDateTime(s, workbuf, sizeof(workbuf), field, ftype,
					  MAXDATEFIELDS, &nf) != 0)
		return false;
#if PG_VERSION_NUM >= 160000
	if (DecodeDateTime(field, ftype, nf, &dtype, &tm, &fsec, &tz, &extra) != 0)
		return false;
#else
	if (DecodeDateTime(field, ftype, nf, &dtype, &tm, &fsec, &tz) != 0)
		return false;
#endif
	return dtype == DTK_DATE && tm2timestamp(&tm, fsec, &tz, out) == 0 &&
		IS_VALID_TIMESTAMP(*out);
}

/*
 * The exit code: absent (null or missing) or an integer in int4's range.
 * Anything else (a fraction, an exponent, too many digits) is left to
 * worker_record().
 */
static bool
job_exit_code(const JobParse *p, bool *has, int32 *code)
{
	const char *s = p->text[JOB_EXIT_CODE];
	char	   *end;
	long		v;

	*has = false;
	if (s == NULL)
		return true;
	if (strspn(s + (*s == '-'), "0123456789") != strlen(s + (*s == '-')) ||
		strlen(s) > 11)
		return false;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < PG_INT32_MIN || v > PG_INT32_MAX)
		return false;
	*has = true;
	*code = (int32) v;
	return true;
}

/*
 * Read the job object of request id from an answer body (len bytes, valid
 * in the database encoding) into *job.  Returns false if the body is not a job object
 * worker_record() would take as it is; the caller then leaves the answer
 * to worker_record().
 */
bool
rw_job_read(const char *id, char *body, size_t len, RwJob *job)
{
	JobParse	p;
	const char *status;

	memset(&p, 0, sizeof(p));
	memset(job, 0, sizeof(*job));
	if (!job_parse_json(body, len, &p) || !p.top_object || p.bad)
		return false;
	status = p.text[JOB_STATUS];
	if (p.text[JOB_REQUEST_ID] == NULL || strcmp(p.text[JOB_REQUEST_ID], id) != 0 ||
		status == NULL ||
		(strcmp(status, "running") != 0 && strcmp(status, "completed") != 0 &&
		 strcmp(status, "failed") != 0))
		return false;
	if (!job_time(&p, JOB_STARTED_AT, &job->has_started_at, &job->started_at) ||
		!job_time(&p, JOB_FINISHED_AT, &job->has_finished_at, &job->finished_at) ||
		!job_exit_code(&p, &job->has_exit_code, &job->exit_code))
		return false;
	job->status = status;
	job->output = p.text[JOB_OUTPUT];
	job->error = p.text[JOB_ERROR];
	return true;
}

/*
 * Whether an answer is a job object of request id that still runs: a 202
 * that src/dispatch.c holds until it knows the job's end.  Runs outside
 * any transaction; an error of the parser (say, an answer nested too deep)
 * means no, and the recording of the answer then judges it.
 */
bool
rw_job_running(const char *id, char *body, size_t len)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool running = false;
	RwJob		job;

	if (body == NULL || len == 0 || !pg_verifymbstr(body, len, true))
		return false;
	PG_TRY();
	{
		running = rw_job_read(id, body, len, &job) && strcmp(job.status, "running") == 0;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		running = false;
	}
	PG_END_TRY();
	return running;
}
