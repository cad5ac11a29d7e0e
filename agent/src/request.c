/*-------------------------------------------------------------------------
 *
 * request.c
 *	  Parsing and validation of request bodies, paths and query values.
 *
 * Everything here handles bytes straight from the network, after the
 * signature check but before anything is stored: JSON is parsed by
 * jansson and each field's type, length and syntax is checked.
 *
 *-------------------------------------------------------------------------
 */
#include <stdio.h>
#include <string.h>

#include "agent.h"

#define RESTARTS_PREFIX "/v1/restarts/"

/*
 * Fetch a string member of obj, checking its type, that it holds no NUL
 * byte and that its length is within minlen..maxlen.  Reports the reason
 * in errbuf when it is not.
 */
static const char *
request_string(json_t *obj, const char *key, size_t minlen, size_t maxlen,
			   char *errbuf, size_t errsize)
{
	json_t	   *v = json_object_get(obj, key);
	const char *s;

	if (v == NULL)
	{
		snprintf(errbuf, errsize, "missing field \"%s\"", key);
		return NULL;
	}
	if (!json_is_string(v))
	{
		snprintf(errbuf, errsize, "field \"%s\" must be a string", key);
		return NULL;
	}
	s = json_string_value(v);
	if (strlen(s) != json_string_length(v) ||
		json_string_length(v) < minlen || json_string_length(v) > maxlen)
	{
		snprintf(errbuf, errsize, "field \"%s\" must be %zu..%zu characters",
				 key, minlen, maxlen);
		return NULL;
	}
	return s;
}

/*
 * Validate the requested_by member: a canonical UUID or null.
 */
static bool
request_requested_by(json_t *obj, restart_request *req,
					 char *errbuf, size_t errsize)
{
	json_t	   *v = json_object_get(obj, "requested_by");

	if (v == NULL)
	{
		snprintf(errbuf, errsize, "missing field \"requested_by\"");
		return false;
	}
	if (json_is_null(v))
	{
		req->has_requested_by = false;
		return true;
	}
	if (!json_is_string(v) ||
		!util_is_uuid(json_string_value(v), json_string_length(v)))
	{
		snprintf(errbuf, errsize, "field \"requested_by\" must be a lowercase UUID or null");
		return false;
	}
	req->has_requested_by = true;
	memcpy(req->requested_by, json_string_value(v), UUID_TEXT_LEN + 1);
	return true;
}

/*
 * Validate the members of a parsed restart request object and copy them
 * into req.
 */
static bool
request_fill(json_t *obj, restart_request *req, char *errbuf, size_t errsize)
{
	const char *id;
	const char *service;
	const char *at;

	if (!json_is_object(obj))
	{
		snprintf(errbuf, errsize, "body must be a JSON object");
		return false;
	}
	if ((id = request_string(obj, "request_id", 0, 64, errbuf, errsize)) == NULL)
		return false;
	if (!util_is_uuid(id, strlen(id)))
	{
		snprintf(errbuf, errsize, "field \"request_id\" must be a lowercase UUID");
		return false;
	}
	service = request_string(obj, "service", 1, SERVICE_NAME_MAX, errbuf, errsize);
	if (service == NULL)
		return false;
	at = request_string(obj, "requested_at", 1, REQUESTED_AT_MAX, errbuf, errsize);
	if (at == NULL)
		return false;
	if (!util_is_rfc3339(at))
	{
		snprintf(errbuf, errsize, "field \"requested_at\" must be an RFC 3339 timestamp");
		return false;
	}
	if (!request_requested_by(obj, req, errbuf, errsize))
		return false;
	memcpy(req->request_id, id, UUID_TEXT_LEN + 1);
	snprintf(req->service, sizeof(req->service), "%s", service);
	snprintf(req->requested_at, sizeof(req->requested_at), "%s", at);
	return true;
}

/*
 * Parse the body of POST /v1/restarts into req.  The body must be one JSON
 * object (duplicate keys refused) holding request_id, service,
 * requested_by and requested_at; other keys are ignored.  On failure a
 * human-readable reason is left in errbuf.
 */
bool
request_parse_restart(const char *body, size_t len, restart_request *req,
					  char *errbuf, size_t errsize)
{
	json_error_t jerr;
	json_t	   *obj;
	bool		ok;

	memset(req, 0, sizeof(*req));
	obj = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
	if (obj == NULL)
	{
		snprintf(errbuf, errsize, "malformed JSON at line %d column %d: %s",
				 jerr.line, jerr.column, jerr.text);
		return false;
	}
	ok = request_fill(obj, req, errbuf, errsize);
	json_decref(obj);
	return ok;
}

/*
 * Parse the "wait" query value: a decimal number of seconds, capped at
 * max_wait.  An absent value means 0.  Returns false for anything that is
 * not a plain non-negative integer.
 */
bool
request_parse_wait(const char *text, int max_wait, int *wait)
{
	int64_t		v;

	*wait = 0;
	if (text == NULL)
		return true;
	if (!util_parse_digits(text, 9, &v))
		return false;
	*wait = v > max_wait ? max_wait : (int) v;
	return true;
}

/*
 * Recognise "/v1/restarts/<id>".  *is_job tells whether the path has that
 * prefix; id receives the id when it is a canonical UUID, and is left
 * empty otherwise.
 */
bool
request_parse_job_path(const char *url, char *id, bool *is_job)
{
	size_t		plen = strlen(RESTARTS_PREFIX);

	id[0] = '\0';
	*is_job = strncmp(url, RESTARTS_PREFIX, plen) == 0 && url[plen] != '\0';
	if (!*is_job)
		return false;
	if (!util_is_uuid(url + plen, strlen(url + plen)))
		return false;
	memcpy(id, url + plen, UUID_TEXT_LEN + 1);
	return true;
}
