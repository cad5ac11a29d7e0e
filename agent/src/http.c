/*-------------------------------------------------------------------------
 *
 * http.c
 *	  libmicrohttpd glue: listening socket, routing, body collection and
 *	  the three endpoints.
 *
 * Routing is decided on the first call of the access handler; bodies are
 * collected up to max_body bytes (never more is buffered) and the request
 * is handled once complete: verify the signature (verify.c), parse and
 * validate (request.c), then submit or look up the job (jobs.c).  Each
 * request is logged in one line when its answer is queued.
 *
 * libmicrohttpd's connection timeout only measures idle time, so a client
 * trickling a byte now and then could hold a connection and its thread
 * forever.  A watchdog thread therefore gives every phase of a connection
 * (receiving a request, sending an answer, waiting for the next request)
 * at most connection_timeout seconds in all, and shuts down the socket of
 * a connection that overstays; only the agent's own work on a complete
 * request (a long poll) is exempt.  A chunked body over max_body is
 * discarded for at most HTTP_DISCARD_MAX more bytes, then the connection
 * is closed.
 *
 *-------------------------------------------------------------------------
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <microhttpd.h>

#include "agent.h"

#define HTTP_DISCARD_MAX (64 * 1024)
#define HTTP_WATCHDOG_TICK_MSEC 200
#define HTTP_DRAIN_MSEC 2000

typedef enum http_route
{
	ROUTE_HEALTHZ,
	ROUTE_RESTARTS,
	ROUTE_JOB,
	ROUTE_NOT_FOUND,
	ROUTE_BAD_METHOD
} http_route;

typedef struct http_req
{
	const char *method;
	const char *url;
	http_route	route;
	char	   *body;
	size_t		len;
	size_t		received;		/* body bytes received, kept or not */
	bool		too_large;
	bool		nomem;			/* no memory for the body: it is discarded */
} http_req;

/* A connection as the watchdog sees it (MHD's socket context). */
typedef struct http_conn
{
	struct http_conn *prev;
	struct http_conn *next;
	int			fd;
	bool		busy;			/* the agent is working on a whole request */
	bool		answering;		/* ... or has not yet sent all of its answer */
	bool		drained;		/* http_drain() waits for that answer */
	bool		cut;			/* the watchdog has shut it down */
	int64_t		since;			/* start of the current phase (monotonic ms) */
} http_conn;

typedef struct http_header_count
{
	int			id;
	int			ts;
	int			sig;
} http_header_count;

static struct MHD_Daemon *http_daemon;
static const agent_config *http_cfg;
static char *http_tls_cert;
static char *http_tls_key;
static size_t http_tls_key_len;

static pthread_mutex_t http_conn_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t http_conn_cond = PTHREAD_COND_INITIALIZER;
static pthread_cond_t http_drain_cond;	/* on CLOCK_MONOTONIC, see http_start() */
static bool http_draining;		/* http_stop() waits for answers */
static http_conn *http_conns;
static bool http_watchdog_running;
static bool http_watchdog_stop;
static pthread_t http_watchdog_tid;

/*
 * Return the watchdog's record of a connection (NULL if it has none).
 */
static http_conn *
http_conn_of(struct MHD_Connection *c)
{
	const union MHD_ConnectionInfo *ci =
		MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);

	return ci ? (http_conn *) ci->socket_context : NULL;
}

/*
 * Mark a connection busy (the agent works on a complete request: no
 * deadline) or not (its answer is queued: a new phase with a fresh
 * deadline starts now).  Either way it is answering a request.
 */
static void
http_conn_set_busy(struct MHD_Connection *c, bool busy)
{
	http_conn  *hc = http_conn_of(c);

	if (hc == NULL)
		return;
	pthread_mutex_lock(&http_conn_lock);
	hc->busy = busy;
	hc->answering = true;		/* until http_conn_done() */
	hc->since = util_monotonic_msec();
	pthread_mutex_unlock(&http_conn_lock);
}

/*
 * Mark a connection's request done: its answer sent, or the request
 * abandoned.  A new phase with a fresh deadline starts now.
 */
static void
http_conn_done(struct MHD_Connection *c)
{
	http_conn  *hc = http_conn_of(c);

	if (hc == NULL)
		return;
	pthread_mutex_lock(&http_conn_lock);
	hc->busy = false;
	hc->answering = false;
	hc->since = util_monotonic_msec();
	if (http_draining && hc->drained)
	{
		hc->drained = false;
		pthread_cond_broadcast(&http_drain_cond);
	}
	pthread_mutex_unlock(&http_conn_lock);
}

/*
 * MHD's connection notifier: track each connection from its start (before
 * any byte is read, so the TLS handshake and the headers count too) until
 * MHD is about to close its socket.
 */
static void
http_notify_connection(void *cls, struct MHD_Connection *c, void **socket_context,
					   enum MHD_ConnectionNotificationCode toe)
{
	http_conn  *hc = *socket_context;
	const union MHD_ConnectionInfo *ci;

	(void) cls;
	pthread_mutex_lock(&http_conn_lock);
	if (toe == MHD_CONNECTION_NOTIFY_STARTED &&
		(ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD)) != NULL &&
		(hc = calloc(1, sizeof(http_conn))) != NULL)
	{
		hc->fd = ci->connect_fd;
		hc->since = util_monotonic_msec();
		hc->next = http_conns;
		if (http_conns)
			http_conns->prev = hc;
		http_conns = hc;
		*socket_context = hc;
	}
	else if (toe == MHD_CONNECTION_NOTIFY_CLOSED && hc != NULL)
	{
		if (hc->prev)
			hc->prev->next = hc->next;
		else
			http_conns = hc->next;
		if (hc->next)
			hc->next->prev = hc->prev;
		free(hc);
		*socket_context = NULL;
	}
	pthread_mutex_unlock(&http_conn_lock);
}

/*
 * Shut down the sockets of connections whose current phase has lasted
 * longer than connection_timeout; caller holds http_conn_lock.  The
 * connection's own thread then sees the end of the stream and MHD closes
 * it (the descriptor cannot be reused meanwhile: MHD notifies the close,
 * which takes the lock, before it closes the descriptor).
 */
static void
http_watchdog_scan(void)
{
	int64_t		limit = (int64_t) http_cfg->connection_timeout * 1000;
	int64_t		now = util_monotonic_msec();

	for (http_conn *hc = http_conns; hc; hc = hc->next)
	{
		if (hc->busy || hc->cut || now - hc->since < limit)
			continue;
		hc->cut = true;
		shutdown(hc->fd, SHUT_RDWR);
		log_msg("connection closed: no complete request or answer within connection_timeout (%d s)",
				http_cfg->connection_timeout);
	}
}

/*
 * Watchdog thread: scan the connections a few times a second until
 * http_stop().
 */
static void *
http_watchdog_main(void *arg)
{
	(void) arg;
	pthread_mutex_lock(&http_conn_lock);
	while (!http_watchdog_stop)
	{
		struct timespec ts;

		http_watchdog_scan();
		util_deadline(&ts, CLOCK_REALTIME, HTTP_WATCHDOG_TICK_MSEC);
		pthread_cond_timedwait(&http_conn_cond, &http_conn_lock, &ts);
	}
	pthread_mutex_unlock(&http_conn_lock);
	return NULL;
}

/*
 * The answer given instead of one that could not be rendered for want of
 * memory (it needs none).  Its error is not internal_error, which tells a
 * client that nothing ran: the request may have taken effect (a job
 * accepted, say), and the client is to ask again.
 */
static const char http_nomem_body[] =
"{\"error\":\"out_of_memory\",\"message\":\"the agent ran out of memory for its answer; the request may have taken effect: send it again\"}";

/*
 * Queue a JSON answer (text is malloc'ed and handed to MHD) and write the
 * request's log line.  Without text (it could not be rendered: memory ran
 * out), the answer is 500 out_of_memory whatever status was meant.
 */
static enum MHD_Result
http_send(struct MHD_Connection *c, const http_req *r, unsigned int status,
		  char *text, const char *allow, const char *detail)
{
	const union MHD_ConnectionInfo *ci =
		MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
	const char *id = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "webhook-id");
	struct MHD_Response *resp;
	char		host[NI_MAXHOST] = "local";
	char		safe_id[80];
	char		safe_url[80];
	char		safe_method[24];
	char		safe_detail[300];
	enum MHD_Result ret;

	if (ci && ci->client_addr && ci->client_addr->sa_family != AF_UNIX)
		getnameinfo(ci->client_addr,
					ci->client_addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in),
					host, sizeof(host), NULL, 0, NI_NUMERICHOST);
	log_sanitize(id ? id : "-", id ? strlen(id) : 1, safe_id, sizeof(safe_id));
	log_sanitize(r->url, strlen(r->url), safe_url, sizeof(safe_url));
	log_sanitize(r->method, strlen(r->method), safe_method, sizeof(safe_method));
	log_sanitize(detail ? detail : "", detail ? strlen(detail) : 0, safe_detail, sizeof(safe_detail));
	if (text == NULL)
	{
		log_msg("request %s %s from %s id=%s: 500 out of memory for the answer (%u %s)",
				safe_method, safe_url, host, safe_id, status, safe_detail);
		status = 500;
		allow = NULL;
		resp = MHD_create_response_from_buffer(strlen(http_nomem_body), (void *) http_nomem_body,
											   MHD_RESPMEM_PERSISTENT);
	}
	else
	{
		log_msg("request %s %s from %s id=%s: %u %s", safe_method, safe_url, host, safe_id,
				status, safe_detail);
		resp = MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
	}
	if (resp == NULL)
	{
		free(text);
		return MHD_NO;
	}
	MHD_add_response_header(resp, "Content-Type", "application/json");
	MHD_add_response_header(resp, "Cache-Control", "no-store");
	if (allow)
		MHD_add_response_header(resp, "Allow", allow);
	ret = MHD_queue_response(c, status, resp);
	MHD_destroy_response(resp);
	http_conn_set_busy(c, false);
	return ret;
}

/*
 * Answer with an error body {"error": code, "message": message}.
 */
static enum MHD_Result
http_error(struct MHD_Connection *c, const http_req *r, unsigned int status,
		   const char *code, const char *message)
{
	char		detail[300];

	snprintf(detail, sizeof(detail), "%s (%s)", code, message);
	return http_send(c, r, status, report_error(code, message), NULL, detail);
}

/*
 * Answer with a job object (takes the reference; NULL if it could not be
 * rendered, which http_send() answers with 500 out_of_memory).
 */
static enum MHD_Result
http_job(struct MHD_Connection *c, const http_req *r, unsigned int status,
		 json_t *report, const char *what)
{
	char	   *text = report_text(report);
	const char *id = json_string_value(json_object_get(report, "request_id"));
	const char *st = json_string_value(json_object_get(report, "status"));
	char		detail[200];

	snprintf(detail, sizeof(detail), "%s job %s (%s)", what, id ? id : "?", st ? st : "?");
	json_decref(report);
	return http_send(c, r, status, text, NULL, detail);
}

/*
 * Decide which endpoint a method and path address.
 */
static http_route
http_route_of(const char *url, const char *method, const char **allow)
{
	char		id[UUID_TEXT_LEN + 1];
	bool		is_job;
	bool		get = strcmp(method, "GET") == 0;

	request_parse_job_path(url, id, &is_job);
	if (strcmp(url, "/healthz") == 0)
	{
		*allow = "GET";
		return get ? ROUTE_HEALTHZ : ROUTE_BAD_METHOD;
	}
	if (strcmp(url, "/v1/restarts") == 0)
	{
		*allow = "POST";
		return strcmp(method, "POST") == 0 ? ROUTE_RESTARTS : ROUTE_BAD_METHOD;
	}
	if (is_job)
	{
		*allow = "GET";
		return get ? ROUTE_JOB : ROUTE_BAD_METHOD;
	}
	return ROUTE_NOT_FOUND;
}

/*
 * Count the authentication headers, so that duplicated ones (which could
 * make verification ambiguous) are refused.
 */
static enum MHD_Result
http_count_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
	http_header_count *n = cls;

	(void) kind;
	(void) value;
	if (strcasecmp(key, "webhook-id") == 0)
		n->id++;
	else if (strcasecmp(key, "webhook-timestamp") == 0)
		n->ts++;
	else if (strcasecmp(key, "webhook-signature") == 0)
		n->sig++;
	return MHD_YES;
}

/*
 * Verify the request's Standard Webhooks signature over its body.
 * Returns true if it is valid; otherwise the 401 answer has been queued
 * and *ret holds MHD's result.
 */
static bool
http_verify(struct MHD_Connection *c, const http_req *r, enum MHD_Result *ret)
{
	http_header_count n = {0, 0, 0};
	verify_result vr;

	MHD_get_connection_values(c, MHD_HEADER_KIND, http_count_header, &n);
	if (n.id > 1 || n.ts > 1 || n.sig > 1)
	{
		*ret = http_error(c, r, 401, "invalid_signature", "duplicated webhook-* header");
		return false;
	}
	vr = verify_request(MHD_lookup_connection_value(c, MHD_HEADER_KIND, "webhook-id"),
						MHD_lookup_connection_value(c, MHD_HEADER_KIND, "webhook-timestamp"),
						MHD_lookup_connection_value(c, MHD_HEADER_KIND, "webhook-signature"),
						(const unsigned char *) r->body, r->len, time(NULL),
						http_cfg->secrets, http_cfg->nsecrets);
	if (vr == VERIFY_NOMEM)
	{
		*ret = http_error(c, r, 500, "internal_error",
						  "the agent ran out of memory while checking the signature; nothing was run, send it again");
		return false;
	}
	if (vr != VERIFY_OK)
	{
		*ret = http_error(c, r, 401, "invalid_signature", verify_result_text(vr));
		return false;
	}
	return true;
}

/*
 * Check the Content-Type of a POST: absent or application/json (with
 * optional parameters).
 */
static bool
http_json_content_type(struct MHD_Connection *c)
{
	const char *ct = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type");

	return ct == NULL || (strncasecmp(ct, "application/json", 16) == 0 &&
						  (ct[16] == '\0' || ct[16] == ';' || ct[16] == ' '));
}

/* The "wait" arguments of a request's query string, as http_wait_arg() sees them. */
typedef struct http_wait_args
{
	int			n;				/* how many */
	bool		bare;			/* one has no value ("?wait") */
	const char *value;			/* the last one's */
} http_wait_args;

/*
 * MHD's callback for each query argument: note those named "wait".
 */
static enum MHD_Result
http_wait_arg(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
	http_wait_args *a = cls;

	(void) kind;
	if (key != NULL && strcmp(key, "wait") == 0)
	{
		a->n++;
		a->bare |= value == NULL;
		a->value = value;
	}
	return MHD_YES;
}

/*
 * The "wait" query value of a request, in milliseconds; false if it is
 * malformed, has no value, or is given more than once.
 */
static bool
http_wait(struct MHD_Connection *c, int *wait_ms)
{
	http_wait_args a = {0};

	*wait_ms = 0;
	MHD_get_connection_values(c, MHD_GET_ARGUMENT_KIND, http_wait_arg, &a);
	if (a.n > 1 || a.bare)
		return false;
	return request_parse_wait(a.value, http_cfg->max_wait, wait_ms);
}

/*
 * POST /v1/restarts[?wait=S]: verify, parse, then submit the job, and
 * with wait, answer once it has finished or S seconds have passed.
 */
static enum MHD_Result
http_post_restart(struct MHD_Connection *c, const http_req *r)
{
	restart_request req;
	char		err[256];
	enum MHD_Result ret;
	json_t	   *report;
	int			wait_ms;
	jobs_submit_result res;

	if (!http_verify(c, r, &ret))
		return ret;
	if (!http_json_content_type(c))
		return http_error(c, r, 400, "bad_request", "Content-Type must be application/json");
	switch (request_parse_restart(r->body ? r->body : "", r->len, &req, err, sizeof(err)))
	{
		case REQUEST_OK:
			break;
		case REQUEST_BAD:
			return http_error(c, r, 400, "bad_request", err);
		case REQUEST_NOMEM:
			return http_error(c, r, 500, "internal_error",
							  "the agent ran out of memory while reading the body; nothing was run, send it again");
	}
	if (strcmp(req.request_id, MHD_lookup_connection_value(c, MHD_HEADER_KIND, "webhook-id")) != 0)
		return http_error(c, r, 400, "bad_request", "request_id must equal the webhook-id header");
	if (!http_wait(c, &wait_ms))
		return http_error(c, r, 400, "bad_request", "wait must be a non-negative number of seconds");
	res = jobs_submit(&req, wait_ms, &report);
	switch (res)
	{
		case JOBS_ACCEPTED:
			return http_job(c, r, 202, report, "accepted");
		case JOBS_EXISTS:
			return http_job(c, r, 200, report, "replayed");
		case JOBS_CONFLICT:
			return http_error(c, r, 422, "id_conflict",
							  "this request_id was already used with a different service, requested_by or requested_at");
		case JOBS_UNKNOWN_SERVICE:
			return http_error(c, r, 404, "unknown_service", "no such service is configured on this agent");
		case JOBS_SERVICE_BUSY:
			return http_error(c, r, 409, "service_busy", "a job of this service is still running");
		case JOBS_TOO_MANY:
			return http_error(c, r, 429, "too_many_jobs", "too many jobs are running on this agent");
		case JOBS_INTERNAL_ERROR:
			break;
	}
	json_decref(report);
	return http_error(c, r, 500, "internal_error",
					  "the job could not be journaled or the agent is shutting down");
}

/*
 * GET /v1/restarts/{id}[?wait=S]: verify, then report the job, after a
 * long poll when asked.
 */
static enum MHD_Result
http_get_job(struct MHD_Connection *c, const char *url, const http_req *r)
{
	char		id[UUID_TEXT_LEN + 1];
	bool		is_job;
	int			wait_ms;
	enum MHD_Result ret;
	json_t	   *report;

	if (!http_verify(c, r, &ret))
		return ret;
	if (!request_parse_job_path(url, id, &is_job))
		return http_error(c, r, 400, "bad_request", "the job id must be a lowercase UUID");
	if (strcmp(id, MHD_lookup_connection_value(c, MHD_HEADER_KIND, "webhook-id")) != 0)
		return http_error(c, r, 400, "bad_request", "the webhook-id header must equal the job id in the path");
	if (!http_wait(c, &wait_ms))
		return http_error(c, r, 400, "bad_request", "wait must be a non-negative number of seconds");
	if (!jobs_lookup(id, wait_ms, &report))
		return http_error(c, r, 404, "unknown_job", "the agent has no record of this request id");
	return http_job(c, r, 200, report, "status of");
}

/*
 * GET /healthz: liveness and version, no authentication.
 */
static enum MHD_Result
http_healthz(struct MHD_Connection *c, const http_req *r)
{
	json_t	   *obj = json_pack("{s:s, s:s}", "status", "ok", "version", AGENT_VERSION);
	char	   *text = report_text(obj);

	json_decref(obj);
	return http_send(c, r, 200, text, NULL, "healthz");
}

/*
 * Refuse a GET that carries a body, before verifying anything: the
 * signature does not cover the method, so a captured signed POST must not
 * be replayable as a GET of its job.
 */
static enum MHD_Result
http_get_with_body(struct MHD_Connection *c, const http_req *r)
{
	return http_error(c, r, 400, "bad_request", "a GET must have an empty body");
}

/*
 * First call for a request: route it, answer at once what needs no body,
 * and refuse a declared Content-Length over the limit.
 */
static enum MHD_Result
http_begin(struct MHD_Connection *c, const char *url, const char *method, http_req *r)
{
	const char *allow = NULL;
	const char *cl;
	size_t		zeros;

	r->method = method;
	r->url = url;
	r->route = http_route_of(url, method, &allow);
	if (r->route == ROUTE_HEALTHZ)
		return http_healthz(c, r);
	if (r->route == ROUTE_NOT_FOUND)
		return http_error(c, r, 404, "not_found", "no such endpoint");
	if (r->route == ROUTE_BAD_METHOD)
	{
		char		msg[64];

		snprintf(msg, sizeof(msg), "this endpoint only accepts %s", allow);
		return http_send(c, r, 405, report_error("method_not_allowed", msg), allow,
						 "method_not_allowed");
	}
	cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
	/* its digits without leading zeros: "000" is a length of 0, not a large one */
	if (cl != NULL && (zeros = strspn(cl, "0")) > 0)
		cl += cl[zeros] == '\0' ? zeros - 1 : zeros;
	/* a GET's body is refused before it is read: a length, or any chunked one */
	if (r->route == ROUTE_JOB &&
		((cl != NULL && strcmp(cl, "0") != 0) ||
		 MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Transfer-Encoding") != NULL))
		return http_get_with_body(c, r);
	if (cl != NULL && (strlen(cl) > 9 || atol(cl) > http_cfg->max_body))
		return http_error(c, r, 413, "payload_too_large", "the body is larger than the agent accepts");
	return MHD_YES;
}

/*
 * Append a chunk of body, keeping at most max_body bytes; anything beyond
 * only sets too_large.  Returns false once more than HTTP_DISCARD_MAX
 * bytes beyond max_body arrived: the connection is then closed at once
 * (libmicrohttpd cannot queue an answer in the middle of a body).
 */
static bool
http_collect(http_req *r, const char *data, size_t size)
{
	r->received += size;
	if (r->received > (size_t) http_cfg->max_body + HTTP_DISCARD_MAX)
		return false;
	if (r->too_large || r->received > (size_t) http_cfg->max_body)
	{
		r->too_large = true;
		return true;
	}
	if (r->nomem || (r->body == NULL && (r->body = malloc(http_cfg->max_body + 1)) == NULL))
	{
		r->nomem = true;
		return true;
	}
	memcpy(r->body + r->len, data, size);
	r->len += size;
	r->body[r->len] = '\0';
	return true;
}

/*
 * Log and close a connection whose body went too far over max_body.
 */
static enum MHD_Result
http_close_oversized(const http_req *r)
{
	char		safe_url[80];

	log_sanitize(r->url, strlen(r->url), safe_url, sizeof(safe_url));
	log_msg("request %s %s: connection closed: body over max_body (%d bytes)",
			r->route == ROUTE_RESTARTS ? "POST" : "GET", safe_url, http_cfg->max_body);
	return MHD_NO;
}

/*
 * libmicrohttpd's access handler: called once with the headers, then with
 * each body chunk, then once more with no data when the request is
 * complete.
 */
static enum MHD_Result
http_access(void *cls, struct MHD_Connection *c, const char *url,
			const char *method, const char *version, const char *upload_data,
			size_t *upload_data_size, void **con_cls)
{
	http_req   *r = *con_cls;

	(void) cls;
	(void) version;
	if (r == NULL)
	{
		if ((r = calloc(1, sizeof(http_req))) == NULL)
			return MHD_NO;
		*con_cls = r;
		return http_begin(c, url, method, r);
	}
	if (*upload_data_size > 0)
	{
		bool		keep = http_collect(r, upload_data, *upload_data_size);

		*upload_data_size = 0;
		return keep ? MHD_YES : http_close_oversized(r);
	}
	http_conn_set_busy(c, true);
	/* a GET with a body is refused as such, however large the body */
	if (r->route != ROUTE_RESTARTS && (r->received > 0 || r->too_large))
		return http_get_with_body(c, r);
	if (r->too_large)
		return http_error(c, r, 413, "payload_too_large", "the body is larger than the agent accepts");
	if (r->nomem)
		return http_error(c, r, 500, "internal_error",
						  "the agent ran out of memory for the body; nothing was run, send it again");
	if (r->route == ROUTE_RESTARTS)
		return http_post_restart(c, r);
	return http_get_job(c, url, r);
}

/*
 * Free a request's state once MHD is done with it.
 */
static void
http_completed(void *cls, struct MHD_Connection *c, void **con_cls,
			   enum MHD_RequestTerminationCode toe)
{
	http_req   *r = *con_cls;

	(void) cls;
	(void) toe;
	if (r != NULL)
	{
		free(r->body);
		free(r);
	}
	*con_cls = NULL;
	http_conn_done(c);
}

/*
 * Route libmicrohttpd's own error messages to our log, sanitised (they may
 * quote what a client sent).
 */
static void http_mhd_log(void *cls, const char *fmt, va_list ap)
			__attribute__((format(printf, 2, 0)));

static void
http_mhd_log(void *cls, const char *fmt, va_list ap)
{
	char		line[512];
	char		safe[512];
	size_t		len;

	(void) cls;
	vsnprintf(line, sizeof(line), fmt, ap);
	len = strlen(line);
	while (len > 0 && line[len - 1] == '\n')
		line[--len] = '\0';
	log_sanitize(line, len, safe, sizeof(safe));
	log_msg("libmicrohttpd: %s", safe);
}

/*
 * Whether a process listens on the unix socket at sun: a connection is
 * taken, or would be but for a full backlog.  Another agent (with another
 * state_dir, so its lock did not stop this one) must not lose its socket to
 * this one.  The connection is non-blocking, so a stopped listener cannot
 * hold the start.
 */
static bool
http_unix_socket_live(const struct sockaddr_un *sun)
{
	int			fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	bool		live;

	if (fd < 0)
		return false;
	live = connect(fd, (const struct sockaddr *) sun, sizeof(*sun)) == 0 || errno == EAGAIN;
	close(fd);
	return live;
}

/*
 * Create, bind and listen on the configured unix socket, replacing a stale
 * socket file (one nobody listens on), and apply socket_mode.
 */
static int
http_listen_unix(const agent_config *cfg, char *errbuf, size_t errsize)
{
	struct sockaddr_un sun = {.sun_family = AF_UNIX};
	struct stat st;
	int			fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", cfg->listen_unix);
	if (lstat(cfg->listen_unix, &st) == 0 && S_ISSOCK(st.st_mode))
	{
		if (http_unix_socket_live(&sun))
		{
			snprintf(errbuf, errsize, "cannot listen on unix socket \"%s\": another process listens on it",
					 cfg->listen_unix);
			if (fd >= 0)
				close(fd);
			return -1;
		}
		unlink(cfg->listen_unix);
	}
	if (fd < 0 || bind(fd, (struct sockaddr *) &sun, sizeof(sun)) != 0 ||
		chmod(cfg->listen_unix, cfg->socket_mode) != 0 || listen(fd, 64) != 0)
	{
		snprintf(errbuf, errsize, "cannot listen on unix socket \"%s\": %s",
				 cfg->listen_unix, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	log_msg("listening on unix:%s", cfg->listen_unix);
	return fd;
}

/*
 * Log the address a TCP socket is bound to (the port may have been
 * chosen by the kernel when 0 was configured).
 */
static void
http_log_bound(int fd, bool tls)
{
	struct sockaddr_storage ss;
	socklen_t	len = sizeof(ss);
	char		host[NI_MAXHOST];
	char		port[NI_MAXSERV];

	if (getsockname(fd, (struct sockaddr *) &ss, &len) == 0 &&
		getnameinfo((struct sockaddr *) &ss, len, host, sizeof(host), port, sizeof(port),
					NI_NUMERICHOST | NI_NUMERICSERV) == 0)
		log_msg("listening on %s%s%s:%s%s", ss.ss_family == AF_INET6 ? "[" : "", host,
				ss.ss_family == AF_INET6 ? "]" : "", port, tls ? " (TLS)" : "");
}

/*
 * Create, bind and listen on the configured TCP address.
 */
static int
http_listen_tcp(const agent_config *cfg, char *errbuf, size_t errsize)
{
	struct addrinfo hints = {.ai_flags = AI_PASSIVE | AI_NUMERICSERV, .ai_socktype = SOCK_STREAM};
	struct addrinfo *res;
	char		port[16];
	int			fd = -1;
	int			one = 1;
	int			rc;

	snprintf(port, sizeof(port), "%d", cfg->listen_port);
	rc = getaddrinfo(cfg->listen_host[0] && strcmp(cfg->listen_host, "*") != 0 ? cfg->listen_host : NULL,
					 port, &hints, &res);
	if (rc != 0)
	{
		snprintf(errbuf, errsize, "cannot resolve \"%s\": %s", cfg->listen, gai_strerror(rc));
		return -1;
	}
	for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next)
	{
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
		if (fd < 0)
			continue;
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 64) != 0)
		{
			snprintf(errbuf, errsize, "cannot listen on %s: %s", cfg->listen, strerror(errno));
			close(fd);
			fd = -1;
		}
	}
	freeaddrinfo(res);
	if (fd >= 0)
		http_log_bound(fd, cfg->tls_cert != NULL);
	return fd;
}

/*
 * Read a whole (small) file into a NUL-terminated buffer, for the TLS
 * certificate and key.
 */
static char *
http_read_file(const char *path, size_t *lenp, char *errbuf, size_t errsize)
{
	FILE	   *f = fopen(path, "re");
	char	   *buf = malloc(1024 * 1024);
	size_t		len = 0;

	if (f == NULL || buf == NULL)
	{
		snprintf(errbuf, errsize, "cannot read \"%s\": %s", path, strerror(errno));
		if (f)
			fclose(f);
		free(buf);
		return NULL;
	}
	len = fread(buf, 1, 1024 * 1024 - 1, f);
	fclose(f);
	buf[len] = '\0';
	*lenp = len;
	return buf;
}

/*
 * Load the TLS certificate and key, after checking that this
 * libmicrohttpd was built with TLS.
 */
static bool
http_load_tls(const agent_config *cfg, char *errbuf, size_t errsize)
{
	size_t		len;

	if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES)
	{
		snprintf(errbuf, errsize, "tls_cert is set but this libmicrohttpd has no TLS support");
		return false;
	}
	http_tls_cert = http_read_file(cfg->tls_cert, &len, errbuf, errsize);
	if (http_tls_cert == NULL)
		return false;
	http_tls_key = http_read_file(cfg->tls_key, &http_tls_key_len, errbuf, errsize);
	return http_tls_key != NULL;
}

/*
 * Start the HTTP server: one thread per connection (so a long poll only
 * blocks its own connection), with the connection count, per-IP count,
 * idle timeout and per-connection memory all bounded.
 */
bool
http_start(const agent_config *cfg, char *errbuf, size_t errsize)
{
	unsigned int flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
		MHD_USE_AUTO | MHD_USE_ERROR_LOG;
	pthread_condattr_t attr;
	int			fd;

	http_cfg = cfg;
	/*
	 * http_drain() waits on the monotonic clock: a step of the wall clock
	 * must not lengthen a stop.
	 */
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&http_drain_cond, &attr);
	pthread_condattr_destroy(&attr);
	if (cfg->tls_cert != NULL)
	{
		if (!http_load_tls(cfg, errbuf, errsize))
			return false;
		flags |= MHD_USE_TLS;
	}
	fd = cfg->listen_unix ? http_listen_unix(cfg, errbuf, errsize) : http_listen_tcp(cfg, errbuf, errsize);
	if (fd < 0)
		return false;
	http_daemon = MHD_start_daemon(flags, 0, NULL, NULL, http_access, NULL,
								   MHD_OPTION_EXTERNAL_LOGGER, http_mhd_log, NULL,
								   MHD_OPTION_LISTEN_SOCKET, fd,
								   MHD_OPTION_CONNECTION_LIMIT, (unsigned int) cfg->connection_limit,
								   MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned int) cfg->per_ip_connection_limit,
								   MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int) cfg->connection_timeout,
								   MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t) cfg->connection_memory_limit,
								   MHD_OPTION_STRICT_FOR_CLIENT, (int) 1,
								   MHD_OPTION_NOTIFY_COMPLETED, http_completed, NULL,
								   MHD_OPTION_NOTIFY_CONNECTION, http_notify_connection, NULL,
								   /* without TLS, the option list ends here */
								   cfg->tls_cert ? MHD_OPTION_HTTPS_MEM_CERT : MHD_OPTION_END, http_tls_cert,
								   MHD_OPTION_HTTPS_MEM_KEY, http_tls_key,
								   MHD_OPTION_END);
	if (http_daemon == NULL)
	{
		snprintf(errbuf, errsize, "libmicrohttpd could not start on %s", cfg->listen);
		close(fd);
		return false;
	}
	if (pthread_create(&http_watchdog_tid, NULL, http_watchdog_main, NULL) != 0)
	{
		snprintf(errbuf, errsize, "cannot start the connection watchdog thread");
		return false;
	}
	http_watchdog_running = true;
	return true;
}

/*
 * Wait, up to HTTP_DRAIN_MSEC, until the connections that are working on
 * a request or sending its answer have sent it, so that a stop does not cut
 * answers off: after jobs_shutdown() every request is answered at once
 * (long polls return, new jobs are refused).  The agent stops by itself
 * when its journal fails, and the request whose record failed must still
 * get its 500.  Requests that arrive meanwhile are not waited for.
 */
static void
http_drain(void)
{
	struct timespec until;
	bool		waiting = false;

	util_deadline(&until, CLOCK_MONOTONIC, HTTP_DRAIN_MSEC);
	pthread_mutex_lock(&http_conn_lock);
	http_draining = true;
	for (http_conn *hc = http_conns; hc; hc = hc->next)
		hc->drained = hc->answering && !hc->cut;
	for (;;)
	{
		waiting = false;
		for (http_conn *hc = http_conns; hc && !waiting; hc = hc->next)
			waiting = hc->drained;
		if (!waiting ||
			pthread_cond_timedwait(&http_drain_cond, &http_conn_lock, &until) == ETIMEDOUT)
			break;
	}
	pthread_mutex_unlock(&http_conn_lock);
	if (waiting)
		log_msg("stopping with answers still being sent after %d ms", HTTP_DRAIN_MSEC);
}

/*
 * Stop the HTTP server, waiting for the connection threads, and wipe the
 * TLS key from memory.
 */
void
http_stop(void)
{
	if (http_daemon != NULL)
	{
		http_drain();
		MHD_stop_daemon(http_daemon);
	}
	http_daemon = NULL;
	if (http_watchdog_running)
	{
		pthread_mutex_lock(&http_conn_lock);
		http_watchdog_stop = true;
		pthread_cond_signal(&http_conn_cond);
		pthread_mutex_unlock(&http_conn_lock);
		pthread_join(http_watchdog_tid, NULL);
		http_watchdog_running = false;
	}
	if (http_tls_key)
		explicit_bzero(http_tls_key, http_tls_key_len);
	free(http_tls_key);
	free(http_tls_cert);
	http_tls_key = http_tls_cert = NULL;
}
