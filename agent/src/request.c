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
 * requested_by and requested_at; other keys are ignored.  A body that is
 * not one is REQUEST_BAD, with a human-readable reason left in errbuf; if
 * memory runs out while the JSON is read, the body is not judged
 * (REQUEST_NOMEM): it may well be valid.
 */
request_parse_result
request_parse_restart(const char *body, size_t len, restart_request *req,
					  char *errbuf, size_t errsize)
{
	unsigned	failures = util_json_failures();
	json_error_t jerr;
	json_t	   *obj;
	bool		ok;

	memset(req, 0, sizeof(*req));
	obj = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);

	/*
	 * jansson reports some of its allocation failures as syntax errors,
	 * and ignores others (a string's bytes are then left out of it): the
	 * result of a read during which an allocation failed is not used.
	 */
	if (util_json_failures() != failures)
	{
		json_decref(obj);
		return REQUEST_NOMEM;
	}
	if (obj == NULL)
	{
		snprintf(errbuf, errsize, "malformed JSON at line %d column %d: %s",
				 jerr.line, jerr.column, jerr.text);
		return REQUEST_BAD;
	}
	ok = request_fill(obj, req, errbuf, errsize);
	json_decref(obj);
	return ok ? REQUEST_OK : REQUEST_BAD;
}

/*
 * Parse the "wait" query value into milliseconds: a non-negative decimal
 * number of seconds, digits with an optional fraction of one to three
 * digits ("30", "0.02"), capped at max_wait seconds.  An absent value means
 * 0.  Returns false for anything else.
 */
bool
request_parse_wait(const char *text, int max_wait, int *wait_ms)
{
	char		whole[16];
	const char *dot;
	int64_t		secs;
	int64_t		frac = 0;
	size_t		nfrac = 0;

	*wait_ms = 0;
	if (text == NULL)
		return true;
	dot = strchr(text, '.');
	if (dot != NULL)
	{
		nfrac = strlen(dot + 1);
		if ((size_t) (dot - text) >= sizeof(whole) || nfrac < 1 || nfrac > 3 ||
			!util_parse_digits(dot + 1, 3, &frac))
			return false;
		memcpy(whole, text, dot - text);
		whole[dot - text] = '\0';
		text = whole;
	}
	if (!util_parse_digits(text, 9, &secs))
		return false;
	while (nfrac++ < 3)
		frac *= 10;
	*wait_ms = secs >= max_wait ? max_wait * 1000 : (int) (secs * 1000 + frac);
	if (*wait_ms > max_wait * 1000)
		*wait_ms = max_wait * 1000;
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
