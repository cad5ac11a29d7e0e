/*-------------------------------------------------------------------------
 *
 * encoding.c
 *		An agent's answer, UTF-8, into the database encoding.
 *
 * The agent answers in JSON, which is UTF-8 (docs/protocol.md); a job's
 * output is whatever its steps printed, made valid UTF-8 by the agent.
 * The worker reads and stores an answer as text of the database, so in a
 * database whose encoding is neither UTF8 nor SQL_ASCII each answer is
 * converted when its call ends, before anything reads it: a character the
 * database encoding cannot hold becomes '?', and an answer that is not
 * UTF-8 is dropped (the call then counts as an invalid answer).  Taken as
 * it came, such an answer was stored garbled (LATIN1), or judged invalid
 * although the steps had run (EUC_JP: the request failed).
 *
 * In a UTF8 database the answer is checked where it is read (src/job.c,
 * src/record.c); in a SQL_ASCII one it is stored as it came.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/memutils.h"

#include "restart_worker.h"

/* Whether answers are converted, and the conversion from UTF-8 if so. */
static bool encoding_convert = false;
#if PG_VERSION_NUM >= 140000
static FmgrInfo encoding_proc;
static bool encoding_have_proc = false;
#endif

/*
 * Look up the conversion from UTF-8 to the database encoding, once, at the
 * worker's start (it takes a transaction: the conversion is in the
 * catalog).  Without one, a character that is not ASCII becomes '?'.
 */
void
rw_encoding_init(void)
{
	int			db_encoding = GetDatabaseEncoding();

	encoding_convert = db_encoding != PG_UTF8 && db_encoding != PG_SQL_ASCII;
	if (!encoding_convert)
		return;
#if PG_VERSION_NUM >= 140000
	{
		Oid			proc;

		StartTransactionCommand();
		proc = FindDefaultConversionProc(PG_UTF8, db_encoding);
		if (OidIsValid(proc))
		{
			fmgr_info_cxt(proc, &encoding_proc, TopMemoryContext);
			encoding_have_proc = true;
		}
		CommitTransactionCommand();
	}
#endif
}

/*
 * Convert the valid UTF-8 of src (len bytes) to the database encoding at
 * dst, as far as the conversion goes without an error; returns how many
 * bytes of src it took.  The conversion functions take a noError argument
 * since PostgreSQL 14; before, only ASCII is taken.
 */
static int
encoding_convert_prefix(const char *src, int len, char *dst)
{
	int			done = 0;

#if PG_VERSION_NUM >= 140000
	if (encoding_have_proc)
		return DatumGetInt32(FunctionCall6(&encoding_proc,
										   Int32GetDatum(PG_UTF8),
										   Int32GetDatum(GetDatabaseEncoding()),
										   CStringGetDatum(src),
										   CStringGetDatum(dst),
										   Int32GetDatum(len),
										   BoolGetDatum(true)));
#endif
	while (done < len && IS_HIGHBIT_SET(src[done]) == 0)
	{
		dst[done] = src[done];
		done++;
	}
	dst[done] = '\0';
	return done;
}

/*
 * Convert the UTF-8 of src (len bytes, known valid) to the database
 * encoding, each character it cannot hold as '?'.  Returns the converted
 * text, malloc'd and NUL-terminated, or NULL if memory ran out.
 */
static char *
encoding_convert_text(const char *src, int len)
{
	char	   *out = malloc((size_t) len * MAX_CONVERSION_GROWTH + 1);
	char	   *dst = out;

	if (out == NULL)
		return NULL;
	*dst = '\0';
	while (len > 0)
	{
		int			done = encoding_convert_prefix(src, len, dst);

		dst += strlen(dst);
		src += done;
		len -= done;
		if (len > 0)
		{
			int			skip = pg_utf_mblen((const unsigned char *) src);

			*dst++ = '?';
			*dst = '\0';
			src += skip;
			len -= skip;
		}
	}
	return out;
}

/*
 * Put the body of an answer into the database encoding (see the head of
 * this file).  Runs outside any transaction, when the call ends.
 */
void
rw_encoding_answer(RwCall *call)
{
	char	   *converted;

	if (!encoding_convert || call->resp == NULL || call->resp_len == 0)
		return;
	if (call->resp_len > (size_t) (MaxAllocSize / MAX_CONVERSION_GROWTH) ||
		pg_encoding_verifymbstr(PG_UTF8, call->resp, (int) call->resp_len) !=
		(int) call->resp_len)
		converted = NULL;		/* not UTF-8: no answer to read */
	else if ((converted = encoding_convert_text(call->resp, (int) call->resp_len)) == NULL)
	{
		/* Outside a transaction: a new worker takes the calls over, same ids. */
		ereport(FATAL,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	}
	free(call->resp);
	call->resp = converted;
	call->resp_len = converted ? strlen(converted) : 0;
}
