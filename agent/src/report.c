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
 * Render the steps that have been started so far.
 */
static json_t *
report_steps(const job *j)
{
	json_t	   *arr = json_array();

	for (int i = 0; i < j->nsteps; i++)
	{
		const job_step *s = &j->steps[i];

		json_array_append_new(arr, json_pack("{s:O, s:o, s:o, s:b, s:o, s:o}",
											 "argv", s->argv,
											 "exit_code", report_int_or_null(s->exit_code, -1),
											 "signal", report_int_or_null(s->signal, 0),
											 "timed_out", s->timed_out,
											 "started_at", report_time(s->started_at),
											 "finished_at", report_time(s->finished_at)));
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
 * runner renders the final state before it is made visible).  The caller
 * holds the job table lock.
 */
json_t *
report_job(const job *j, job_status status)
{
	size_t		outlen = 0;
	char	   *output = tail_to_utf8(&j->output, &outlen);
	json_t	   *obj;

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
					"output", output ? json_stringn(output, outlen) : json_string(""),
					"output_truncated", j->output.truncated,
					"error", report_error_of(j, status));
	free(output);
	return obj;
}

/*
 * Render an error body {"error": code, "message": message} as a string
 * (caller frees).
 */
char *
report_error(const char *code, const char *message)
{
	size_t		len;
	char	   *clean = tail_sanitize_utf8(message, strlen(message), &len);
	json_t	   *obj = json_pack("{s:s, s:s}", "error", code,
								"message", clean ? clean : "");
	char	   *text = obj ? json_dumps(obj, JSON_COMPACT) : NULL;

	json_decref(obj);
	free(clean);
	return text;
}
