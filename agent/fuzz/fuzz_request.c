/*
 * libFuzzer target for request.c, util.c, tail.c and the journal reader:
 * the body parser, the wait and path parsers, the UTF-8 sanitizer, and
 * rebuilding a job from a (possibly corrupt) journal record.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

/* Rebuild a job from JSON text and render it again; the rendering must
 * round-trip. */
static void
fuzz_journal(const char *text, size_t len)
{
	json_t	   *obj = json_loadb(text, len, 0, NULL);
	bool		nomem;
	job		   *j;

	if (obj == NULL)
		return;
	j = journal_job_from_json(obj, 256, &nomem);
	if (j != NULL)
	{
		json_t	   *again = report_job(j, j->status);
		job		   *k;

		if (again == NULL)
			abort();
		k = journal_job_from_json(again, 256, &nomem);
		if (k == NULL || strcmp(k->id, j->id) != 0)
			abort();
		job_free(k);
		json_decref(again);
		job_free(j);
	}
	json_decref(obj);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	restart_request req;
	char		err[256];
	char	   *s = malloc(size + 1);
	char		id[UUID_TEXT_LEN + 1];
	bool		is_job;
	int			wait;
	size_t		outlen;
	char	   *clean;
	json_t	   *js;

	memcpy(s, data, size);
	s[size] = '\0';
	if (request_parse_restart((const char *) data, size, &req, err, sizeof(err)) == REQUEST_OK)
	{
		if (!util_is_uuid(req.request_id, strlen(req.request_id)) ||
			!util_is_rfc3339(req.requested_at))
			abort();
	}
	request_parse_wait(s, 30, &wait);
	if (wait < 0 || wait > 30 * 1000)
		abort();
	request_parse_job_path(s, id, &is_job);
	util_is_rfc3339(s);
	clean = tail_sanitize_utf8((const char *) data, size, &outlen);
	js = json_stringn(clean, outlen);
	if (js == NULL)
		abort();			/* the sanitizer must always yield valid UTF-8 */
	json_decref(js);
	free(clean);
	free(report_error("bad_request", s));
	fuzz_journal((const char *) data, size);
	free(s);
	return 0;
}
