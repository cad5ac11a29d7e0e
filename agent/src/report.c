/*-------------------------------------------------------------------------
 *
 * report.c
 *	  JSON rendering of job objects and error bodies.
 *
 * The same job object is the API answer and the journal record, so the
 * journal can be read back by journal.c with the same field names.
 *
 *-------------------------------------------------------------------------
 */
#include <stdlib.h>
#include <string.h>

#include "agent.h"

/* A text being rendered by report_text(). */
typedef struct report_buffer
{
	char	   *data;
	size_t		len;
	size_t		cap;
	bool		failed;			/* memory ran out: the text is not whole */
} report_buffer;

/*
 * Append a piece of text, for json_dump_callback(); once an append has
 * failed, every later one fails too, and the buffer says so.
 */
static int
report_append(const char *piece, size_t size, void *arg)
{
	report_buffer *b = arg;

	if (!b->failed && b->len + size + 1 > b->cap)
	{
		size_t		cap = b->cap ? b->cap : 1024;
		char	   *data;

		while (cap < b->len + size + 1)
			cap *= 2;
		if ((data = realloc(b->data, cap)) == NULL)
			b->failed = true;
		else
		{
			b->data = data;
			b->cap = cap;
		}
	}
	if (b->failed)
		return -1;
	memcpy(b->data + b->len, piece, size);
	b->len += size;
	b->data[b->len] = '\0';
	return 0;
}

/*
 * Render a JSON value as compact text (caller frees); NULL when out of
 * memory.  Used instead of json_dumps(), which ignores a failed write of
 * an object's key (jansson 2.14 and earlier): when memory ran out there,
 * it returned a text with the key left out, which is not JSON, or is
 * another object.  Here a failed write of any piece fails the text.
 */
char *
report_text(const json_t *value)
{
	report_buffer b = {0};

	if (value == NULL || json_dump_callback(value, report_append, &b, JSON_COMPACT) != 0 ||
		b.failed || b.data == NULL)
	{
		free(b.data);
		return NULL;
	}
	return b.data;
}

/*
 * Return a JSON time stamp, or null for 0 (meaning "not yet").
 */
static json_t *
report_time(int64_t usec)
{
	char		buf[64];

	if (usec == 0)
		return json_null();
	util_format_time(usec, buf, sizeof(buf));
	return json_string(buf);
}

/*
 * Return an integer, or null when the value is the "none" marker.
 */
static json_t *
report_int_or_null(int value, int none)
{
	return value == none ? json_null() : json_integer(value);
}

/*
 * Render the steps that have been started so far; NULL when out of memory
 * (never a list with steps left out).
 */
static json_t *
report_steps(const job *j)
{
	json_t	   *arr = json_array();

	for (int i = 0; arr != NULL && i < j->nsteps; i++)
	{
		const job_step *s = &j->steps[i];

		if (json_array_append_new(arr, json_pack("{s:O, s:o, s:o, s:b, s:o, s:o}",
												 "argv", s->argv,
												 "exit_code", report_int_or_null(s->exit_code, -1),
												 "signal", report_int_or_null(s->signal, 0),
												 "timed_out", s->timed_out,
												 "started_at", report_time(s->started_at),
												 "finished_at", report_time(s->finished_at))) != 0)
		{
			json_decref(arr);
			arr = NULL;
		}
	}
	return arr;
}

/*
 * Return the error of a job shown with the given status: none while it is
 * shown running (why it failed is told with its end, once that is on
 * disk), and for a failed job whose error text could not be allocated, a
 * fixed text saying so (a failed job always tells that it failed).
 */
static json_t *
report_error_of(const job *j, job_status status)
{
	if (status == JOB_RUNNING)
		return json_null();
	if (j->error != NULL)
		return json_string(j->error);
	if (status == JOB_FAILED)
		return json_string("the reason could not be kept: the agent ran out of memory");
	return json_null();
}

/*
 * Render a job as the protocol's job object, with the given status (the
 * runner renders the final state before it is made visible); NULL when out
 * of memory, never an object with a part left out or emptied (it would be
 * journaled as the job's state, and shown).  The caller holds the job
 * table lock.
 */
json_t *
report_job(const job *j, job_status status)
{
	size_t		outlen = 0;
	char	   *output = tail_to_utf8(&j->output, &outlen);
	json_t	   *obj;

	if (output == NULL)
		return NULL;
	obj = json_pack("{s:s, s:s, s:o, s:s, s:s, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:b, s:o}",
					"request_id", j->id,
					"service", j->service,
					"requested_by", j->has_requested_by ? json_string(j->requested_by) : json_null(),
					"requested_at", j->requested_at,
					"status", job_status_name(status),
					"accepted_at", report_time(j->accepted_at),
					"started_at", report_time(j->started_at),
					"finished_at", report_time(j->finished_at),
					"exit_code", report_int_or_null(j->exit_code, -1),
					"signal", report_int_or_null(j->signal, 0),
					"steps", report_steps(j),
					"output", json_stringn(output, outlen),
					"output_truncated", j->output.truncated,
					"error", report_error_of(j, status));
	free(output);
	return obj;
}

/*
 * Render an error body {"error": code, "message": message} as a string
 * (caller frees; NULL when out of memory).  If memory runs out for the
 * valid UTF-8 copy of the message, the message says so instead of being
 * left empty.
 */
char *
report_error(const char *code, const char *message)
{
	size_t		len;
	char	   *clean = tail_sanitize_utf8(message, strlen(message), &len);
	json_t	   *obj = json_pack("{s:s, s:s}", "error", code,
								"message", clean ? clean : "(the agent ran out of memory for the message)");
	char	   *text = report_text(obj);

	json_decref(obj);
	free(clean);
	return text;
}
