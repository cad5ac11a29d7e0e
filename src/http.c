/*-------------------------------------------------------------------------
 *
 * http.c
 *		Calls to agents with libcurl's multi interface, driven by the
 *		worker's wait event set.
 *
 * libcurl tells us which sockets it wants watched (CURLMOPT_SOCKETFUNCTION)
 * and when it wants to be called back (CURLMOPT_TIMERFUNCTION); the worker
 * waits on those sockets together with its latch and the postmaster, so
 * that wake-ups, SIGTERM and SIGHUP are noticed at once even while calls
 * are in flight.  No redirects, http and https only, TLS verified, answers
 * bounded in size, connections per agent and in total bounded.
 *
 * Here too is libcurl's judgement of an agent's URL, which the worker
 * makes before each call and register_agent() before it takes the URL
 * (restart_worker.curl_url_usable(), in any backend).
 *
 * Nothing here may throw an error from inside a libcurl callback: the
 * callbacks only use malloc and plain C.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>
#include <sys/stat.h>
#include <time.h>

#include "common/hashfn.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "restart_worker.h"

#define HTTP_MAX_SOCKETS 1024
#define HTTP_MAX_IDLE_EASY 512	/* the most calls in flight (dispatch.c) */

typedef struct HttpSocket
{
	curl_socket_t fd;
	int			what;			/* CURL_POLL_IN, _OUT or _INOUT; 0 once libcurl
								 * let go of it (parked) */
	int			pos;			/* its event in the worker's wait event set,
								 * or -1 if not added yet */
	bool		changed;		/* what changed since it was added */
	ino_t		ino;			/* the socket's inode: tells it from a later
								 * socket given the same number */
} HttpSocket;

static CURLM *http_multi = NULL;
static HttpSocket http_sockets[HTTP_MAX_SOCKETS];
static int	http_nsockets = 0;	/* watched and parked */
static int	http_set_used = 0;	/* events added since the set was built */
static bool http_set_stale = true;	/* the wait event set is stale */
static int64 http_timer_at = 0;	/* on http_monotonic_us(); 0 = no timer */
static List *http_failed_starts = NIL;	/* calls that could not start */
static CURL *http_idle_easy[HTTP_MAX_IDLE_EASY];	/* transfers to reuse */
static int	http_n_idle_easy = 0;
static int	http_per_agent = 0;	/* the connection limits given to libcurl */
static long http_total = 0;

/*
 * The inode of socket fd, or 0 if it cannot be read.
 */
static ino_t
http_socket_ino(curl_socket_t fd)
{
	struct stat st;

	return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

/*
 * The sockets libcurl watches now (parked ones left out), for status().
 */
static int
http_count_watched(void)
{
	int			n = 0;
	int			i;

	for (i = 0; i < http_nsockets; i++)
		n += (http_sockets[i].what != 0);
	return n;
}

/*
 * Forget every parked socket; the wait event set must then be built anew,
 * as it may still watch them.
 */
static void
http_drop_parked(void)
{
	int			i = 0;

	while (i < http_nsockets)
	{
		if (http_sockets[i].what == 0)
			http_sockets[i] = http_sockets[--http_nsockets];
		else
			i++;
	}
	http_set_stale = true;
}

/*
 * The entry of socket fd, watched or parked, or NULL.
 */
static HttpSocket *
http_find_socket(curl_socket_t fd)
{
	int			i;

	for (i = 0; i < http_nsockets; i++)
		if (http_sockets[i].fd == fd)
			return &http_sockets[i];
	return NULL;
}

/*
 * libcurl's socket callback: remember which sockets to watch and for what.
 * Before it next waits, the worker adds new sockets to its wait event set
 * and changes the events of the others (rw_http_update_sockets).
 *
 * A wait event set cannot drop an event, and libcurl lets go of a socket
 * at the end of every call whose connection it keeps alive: building the
 * set anew each time added every socket again (about eight epoll_ctl a
 * call in a burst, more with more connections).  Such a socket is parked
 * instead: it stays in the set with the
 * events it had (no epoll_ctl on it: libcurl may have closed it already),
 * and when libcurl wants it again for the next call, its event is changed
 * back.  Its inode tells whether it is still the same socket; if libcurl
 * closed it and a new socket got its number, the new one is added (the
 * kernel dropped the closed one from the set).  A parked socket that
 * becomes ready (the agent closed an idle connection) makes the worker
 * build the set anew without the parked ones; see rw_http_socket_event().
 */
static int
http_socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
	HttpSocket *sock = http_find_socket(fd);

	if (what == CURL_POLL_REMOVE)
	{
		if (sock)
			sock->what = 0;
	}
	else if (sock && sock->what != 0)
	{
		sock->changed |= (sock->what != what);
		sock->what = what;
	}
	else if (sock)
	{
		ino_t		ino = http_socket_ino(fd);

		if (sock->pos >= 0 && (ino == 0 || ino != sock->ino))
			sock->pos = -1;		/* another socket: its event is gone */
		sock->ino = ino;
		sock->what = what;
		sock->changed = true;
	}
	else
	{
		if (http_nsockets == HTTP_MAX_SOCKETS)
			http_drop_parked();
		if (http_nsockets < HTTP_MAX_SOCKETS)
		{
			sock = &http_sockets[http_nsockets++];
			sock->fd = fd;
			sock->what = what;
			sock->pos = -1;
			sock->changed = false;
			sock->ino = http_socket_ino(fd);
		}
	}
	rw_status_set_sockets(http_count_watched());
	return 0;
}

/*
 * Microseconds on the monotonic clock, the clock of libcurl's own timeouts.
 * On the wall clock, a step forward (NTP, a resumed virtual machine) would
 * make the worker call libcurl back before its timeout: libcurl would then
 * find nothing due and never ask again, and a call to a silent agent would
 * never time out.
 */
static int64
http_monotonic_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/*
 * libcurl's timer callback: remember when libcurl wants to be called back
 * (-1 removes the timer).
 */
static int
http_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
	if (timeout_ms < 0)
		http_timer_at = 0;
	else
		http_timer_at = http_monotonic_us() + (int64) timeout_ms * 1000;
	return 0;
}

/*
 * Write callback: collect the answer, up to restart_worker.max_response_size.
 * A larger answer aborts the transfer.
 */
static size_t
http_write_cb(char *data, size_t size, size_t nmemb, void *userp)
{
	RwCall	   *call = (RwCall *) userp;
	size_t		n = size * nmemb;
	size_t		limit = (size_t) rw_max_response_size * 1024;
	char	   *grown;

	if (call->resp_len + n > limit)
	{
		call->resp_too_big = true;
		return 0;
	}
	grown = realloc(call->resp, call->resp_len + n + 1);
	if (grown == NULL)
		return 0;
	call->resp = grown;
	memcpy(call->resp + call->resp_len, data, n);
	call->resp_len += n;
	call->resp[call->resp_len] = '\0';
	return n;
}

#if LIBCURL_VERSION_NUM >= 0x075000
/*
 * Pre-request callback: libcurl has a connection (made or kept alive) and
 * is about to send the request on it, so from now on the agent may get it
 * (see http_outcome()).  Before libcurl 7.80 there is no such callback,
 * and the request size alone tells whether the request was sent.
 */
static int
http_prereq_cb(void *userp, char *primary_ip, char *local_ip,
			   int primary_port, int local_port)
{
	((RwCall *) userp)->went_out = true;
	return CURL_PREREQFUNC_OK;
}
#endif

/*
 * Run libcurl's global initialisation in this process, once; returns false
 * if libcurl could not initialise.  The worker does so before it makes its
 * multi handle, a backend before it first asks libcurl's URL parser about
 * an agent's URL (register_agent(), see restart_worker_curl_url_usable()).
 * The backend needs it too: libcurl's manual (curl_global_init(3)) asks
 * every program to call curl_global_init() before any other libcurl
 * function, and only curl_easy_init() is documented to call it itself when
 * it has not run; curl_url(3) promises no such thing, so the parser is not
 * relied on to work without it.  A backend is a single thread, so the
 * manual's warning that curl_global_init() is not thread-safe (before
 * libcurl 7.84, and where curl_version_info() lacks
 * CURL_VERSION_THREADSAFE) does not apply.  libcurl counts the calls: once
 * it has initialised, later calls change nothing.
 */
static bool
http_global_init(void)
{
	static bool done = false;

	if (!done && curl_global_init(CURL_GLOBAL_ALL) == CURLE_OK)
		done = true;
	return done;
}

/*
 * Initialise libcurl and the multi handle.  Called once by the worker.
 */
void
rw_http_init(void)
{
	if (!http_global_init())
		ereport(ERROR, (errmsg("restart_worker: could not initialise libcurl")));
	http_multi = curl_multi_init();
	if (http_multi == NULL)
		ereport(ERROR, (errmsg("restart_worker: could not create a libcurl multi handle")));
	curl_multi_setopt(http_multi, CURLMOPT_SOCKETFUNCTION, http_socket_cb);
	curl_multi_setopt(http_multi, CURLMOPT_TIMERFUNCTION, http_timer_cb);
	curl_multi_setopt(http_multi, CURLMOPT_PIPELINING, (long) CURLPIPE_NOTHING);
	rw_http_configure();
}

/*
 * Apply the connection limits from the settings: on start, on SIGHUP, and
 * as calls end (src/dispatch.c).  The total is never below the calls in
 * flight.  A reload that lowers max_in_flight lets the calls it finds in
 * flight go on (no request is claimed until they are fewer than the new
 * limit), and a total below them would hold their next long-polls in
 * libcurl's queue, where their timeout runs: they timed out waiting for a
 * connection, and were retried, with nothing wrong with the agent.  The
 * total comes down to max_in_flight as those calls end.
 */
void
rw_http_configure(void)
{
	long		total = Max(rw_max_in_flight, rw_dispatch_in_flight());

	if (rw_max_connections_per_agent != http_per_agent)
	{
		curl_multi_setopt(http_multi, CURLMOPT_MAX_HOST_CONNECTIONS,
						  (long) rw_max_connections_per_agent);
		http_per_agent = rw_max_connections_per_agent;
	}
	if (total != http_total)
	{
		curl_multi_setopt(http_multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, total);
		curl_multi_setopt(http_multi, CURLMOPT_MAXCONNECTS, total);
		http_total = total;
	}
}

/*
 * What libcurl makes of an agent's http or https URL: RW_URL_USABLE if its
 * URL parser (curl_url_set()) takes the URL and the port it would connect
 * to is not 0, RW_URL_REFUSED if not, RW_URL_UNKNOWN if libcurl could not
 * say (it ran out of memory, or could not initialise).  libcurl refuses a
 * port above 65535, and a bracketed host that is not an IPv6 address (an
 * IPv4 address, or '::1.2', though PostgreSQL's inet takes that), as a
 * malformed URL; it takes port 0, and then fails to connect to it as to an
 * agent that is down.  A unix: URL is not libcurl's: the worker calls such
 * an agent through an http URL of its own (http_unix_base()), and libcurl
 * refuses the scheme.  The one judgement for the worker, before each call
 * (rw_http_url_usable()), and for register_agent() (through
 * restart_worker.curl_url_usable()), so that an agent registered since 1.11
 * is one the worker can call.  Plain C and libcurl's malloc, no palloc and
 * no ereport: the worker calls it outside any transaction.
 */
RwUrlJudgement
rw_http_url_judge(const char *url)
{
	CURLU	   *u;
	CURLUcode	rc;
	char	   *port = NULL;
	RwUrlJudgement judgement;

	if (!http_global_init() || (u = curl_url()) == NULL)
		return RW_URL_UNKNOWN;
	rc = curl_url_set(u, CURLUPART_URL, url, 0);
	if (rc == CURLUE_OK)
		rc = curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT);
	if (rc == CURLUE_OK)
		judgement = strcmp(port, "0") != 0 ? RW_URL_USABLE : RW_URL_REFUSED;
	else if (rc == CURLUE_OUT_OF_MEMORY)
		judgement = RW_URL_UNKNOWN;
	else
		judgement = RW_URL_REFUSED;
	curl_free(port);
	curl_url_cleanup(u);
	return judgement;
}

/*
 * Whether the worker can call an agent at url (rw_http_url_judge()).
 * register_agent() refuses a port outside 1-65535 since 1.9, and any URL
 * libcurl refuses since 1.11, but an agent registered before keeps its
 * row.  Such a call fails before it is set up, as one whose URL is not
 * usable (RW_CALL_URL), instead of failing to connect to port 0, as to an
 * agent that is down, until the request's attempts ran out, or as an
 * invalid answer.  A unix: URL is usable.  If libcurl cannot say (out of
 * memory) the call goes ahead, and fails or not on its own.  The last URL
 * found usable is remembered, so that the calls of a burst to one agent
 * parse it once.
 */
bool
rw_http_url_usable(const char *url)
{
	static char *last_usable = NULL;	/* malloc'd */
	RwUrlJudgement judgement;

	if (strncmp(url, "unix:", 5) == 0 ||
		(last_usable != NULL && strcmp(url, last_usable) == 0))
		return true;
	judgement = rw_http_url_judge(url);
	if (judgement == RW_URL_USABLE)
	{
		free(last_usable);
		last_usable = strdup(url);
	}
	return judgement != RW_URL_REFUSED;
}

/*
 * restart_worker.curl_url_usable(p_url text): whether libcurl takes an
 * agent's http or https URL, as the worker judges it before each call
 * (rw_http_url_judge()).  register_agent() asks it through check_url(), so
 * that it refuses (22023) what the worker could not call: with the SQL
 * pattern alone (valid_agent_url(), which the table's CHECK keeps, so that
 * a dump with rows made before 1.11 restores) it took, say,
 * 'http://[10.0.0.5]:8787', and every call to that agent failed at once.
 * False for a unix: URL, which is not libcurl's.  An error if libcurl
 * could not say.
 */
PG_FUNCTION_INFO_V1(restart_worker_curl_url_usable);

Datum
restart_worker_curl_url_usable(PG_FUNCTION_ARGS)
{
	char	   *url = text_to_cstring(PG_GETARG_TEXT_PP(0));
	RwUrlJudgement judgement = rw_http_url_judge(url);

	if (judgement == RW_URL_UNKNOWN)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("restart_worker: libcurl could not parse the agent URL \"%s\"", url),
				 errdetail("libcurl ran out of memory, or could not initialise.")));
	pfree(url);
	PG_RETURN_BOOL(judgement == RW_URL_USABLE);
}

/*
 * How long a long-poll asks the agent to hold the answer, in seconds:
 * restart_worker.follow_wait, but no longer than the request has left
 * before its deadline (rounded up, so that a poll just before the deadline
 * does not turn into a busy loop), and 0 once the deadline has passed: the
 * agent then answers at once, and the answer tells whether the job ended
 * in time.
 */
static int
http_follow_wait(RwCall *call)
{
	TimestampTz now = GetCurrentTimestamp();
	int64		left;

	if (call->deadline <= now)
		return 0;
	left = (call->deadline - now + USECS_PER_SEC - 1) / USECS_PER_SEC;
	return (int) Min(left, (int64) rw_follow_wait);
}

/*
 * Append the base URL of a call to an agent on the unix socket at path: a
 * host name of its own, made from the path, because libcurl counts
 * connections per host name and port (CURLMOPT_MAX_HOST_CONNECTIONS): with
 * one name for every such agent, they shared max_connections_per_agent.
 * Nothing resolves the name; the connection goes to the socket.
 */
static void
http_unix_base(StringInfo url, const char *path)
{
	uint64		h = hash_bytes_extended((const unsigned char *) path, strlen(path), 0);

	appendStringInfo(url, "http://unix-%016llx.localhost", (unsigned long long) h);
}

/*
 * Build the URL of a call: the agent's base URL (see http_unix_base() for
 * an agent on a unix socket) and the path of the POST or the long-poll.
 * The POST asks the agent to hold its answer for up to HTTP_POST_WAIT_MS
 * while the job runs (docs/protocol.md), so that the answer to a quick
 * job is its end: one call, and one transaction to record it, instead of
 * a POST and a long-poll; unless src/dispatch.c says not to (call->
 * post_wait), when the connections to the agent are needed for other
 * POSTs.  An agent older than that parameter ignores it.
 */
#define HTTP_POST_WAIT_MS 20

static char *
http_call_url(RwCall *call, int wait)
{
	StringInfoData url;
	const char *base = call->url;
	int			len;

	initStringInfo(&url);
	if (strncmp(base, "unix:", 5) == 0)
		http_unix_base(&url, base + 5);
	else
	{
		len = strlen(base);
		while (len > 0 && base[len - 1] == '/')
			len--;
		appendBinaryStringInfo(&url, base, len);
	}
	appendStringInfoString(&url, "/v1/restarts");
	if (call->following)
		appendStringInfo(&url, "/%s?wait=%d", call->id, wait);
	else if (call->post_wait)
		appendStringInfo(&url, "?wait=%d.%03d",
						 HTTP_POST_WAIT_MS / 1000, HTTP_POST_WAIT_MS % 1000);
	return url.data;
}

/*
 * The signed headers of a call: webhook-id is the request id, for the POST
 * and for the long-poll alike, so the signature binds the request.
 */
static struct curl_slist *
http_call_headers(RwCall *call, const char *body)
{
	struct curl_slist *h = NULL;
	char		ts[32];
	char		sig[RW_SIGNATURE_LEN];
	char		line[RW_SIGNATURE_LEN + 64];

	snprintf(ts, sizeof(ts), "%lld", (long long) time(NULL));
	if (!restart_worker_sign(call->key, call->keylen, call->id, ts,
							 body, strlen(body), sig, sizeof(sig)))
		return NULL;
	snprintf(line, sizeof(line), "webhook-id: %s", call->id);
	h = curl_slist_append(h, line);
	snprintf(line, sizeof(line), "webhook-timestamp: %s", ts);
	h = curl_slist_append(h, line);
	snprintf(line, sizeof(line), "webhook-signature: %s", sig);
	h = curl_slist_append(h, line);
	h = curl_slist_append(h, "Accept: application/json");
	h = curl_slist_append(h, "Expect:");
	if (!call->following)
		h = curl_slist_append(h, "Content-Type: application/json");
	return h;
}

/*
 * The total time allowed for a call: the request timeout, plus a
 * long-poll's wait (which respects the deadline, see http_follow_wait());
 * a POST (whose wait is short, and within the request timeout) never runs
 * past the request's deadline.
 */
static long
http_call_timeout_ms(RwCall *call, int wait)
{
	long		ms = rw_request_timeout;
	long		left;

	/* A long-poll gets its wait on top; its wait respects the deadline. */
	if (call->following)
		return ms + (long) wait * 1000;
	left = (long) ((call->deadline - GetCurrentTimestamp()) / 1000);
	if (left < ms)
		ms = left;
	return ms < 1 ? 1 : ms;
}

/*
 * Set the transport options of a call: where, how long, which protocols,
 * TLS verification.
 */
static void
http_set_transport(CURL *easy, RwCall *call, const char *url, long timeout_ms)
{
	curl_easy_setopt(easy, CURLOPT_URL, url);
	if (strncmp(call->url, "unix:", 5) == 0)
		curl_easy_setopt(easy, CURLOPT_UNIX_SOCKET_PATH, call->url + 5);
#if LIBCURL_VERSION_NUM >= 0x075500
	curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
#else
	curl_easy_setopt(easy, CURLOPT_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L);
	/* Never through a proxy named in the postmaster's environment. */
	curl_easy_setopt(easy, CURLOPT_PROXY, "");
	curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
#if LIBCURL_VERSION_NUM >= 0x075700
	/*
	 * A call that times out while its host name is being resolved leaves the
	 * resolver's thread behind instead of waiting for it: waiting blocked the
	 * whole loop, every other call and the signals with it, until the lookup
	 * gave up (9 s in curl_multi_perform() with a DNS server that never
	 * answers and the resolver's default 5 s timeout, 2 attempts).
	 */
	curl_easy_setopt(easy, CURLOPT_QUICK_EXIT, 1L);
#endif
	curl_easy_setopt(easy, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS, (long) rw_connect_timeout);
	curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, timeout_ms);
	curl_easy_setopt(easy, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(easy, CURLOPT_SSL_VERIFYHOST, 2L);
	if (rw_ca_file && rw_ca_file[0] != '\0')
		curl_easy_setopt(easy, CURLOPT_CAINFO, rw_ca_file);
	curl_easy_setopt(easy, CURLOPT_USERAGENT, "restart_worker/1.0");
}

/*
 * Report a call as finished without an answer, for a reason found before
 * it could start.  rw_http_next_done() returns it.
 */
void
rw_http_fail(RwCall *call, RwCallKind kind, const char *why)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	strlcpy(call->error, why, sizeof(call->error));
	call->http_status = 0;
	call->kind = kind;
	call->sent = false;
	http_failed_starts = lappend(http_failed_starts, call);
	MemoryContextSwitchTo(old);
}

/*
 * A transfer for a new call: one a finished call left, with its options
 * reset to libcurl's defaults, or a new one.  Making and freeing a
 * transfer for every call was a good part of libcurl's share of the
 * worker's time in a burst; a reset one keeps only buffers and caches,
 * never a setting of the call before (every option is set again by
 * rw_http_start()).
 */
static CURL *
http_easy_get(void)
{
	CURL	   *easy;

	if (http_n_idle_easy == 0)
		return curl_easy_init();
	easy = http_idle_easy[--http_n_idle_easy];
	curl_easy_reset(easy);
	return easy;
}

/*
 * Keep the transfer of a finished call for the next call, up to as many as
 * may be in flight at once.
 */
static void
http_easy_put(CURL *easy)
{
	if (http_n_idle_easy < HTTP_MAX_IDLE_EASY)
		http_idle_easy[http_n_idle_easy++] = easy;
	else
		curl_easy_cleanup(easy);
}

/*
 * Release the transfer of a call (not the call itself).
 */
static void
http_release(RwCall *call)
{
	if (call->easy)
	{
		curl_multi_remove_handle(http_multi, (CURL *) call->easy);
		http_easy_put((CURL *) call->easy);
		call->easy = NULL;
	}
	if (call->headers)
	{
		curl_slist_free_all((struct curl_slist *) call->headers);
		call->headers = NULL;
	}
}

/*
 * Start a call: the POST of the request or, when following a running job,
 * the long-poll.  Returns false if it could not start; the call is then
 * reported as done, without an answer, by rw_http_next_done().
 */
bool
rw_http_start(RwCall *call)
{
	CURL	   *easy;
	char	   *url;
	int			wait;
	const char *body = call->following ? "" : call->body;

	if (call->resp)
		free(call->resp);
	call->resp = NULL;
	call->resp_len = 0;
	call->resp_too_big = false;
	call->http_status = 0;
	call->kind = RW_CALL_ANSWER;
	call->sent = false;
	call->went_out = false;
	call->error[0] = '\0';

	easy = http_easy_get();
	call->headers = easy ? http_call_headers(call, body) : NULL;
	if (easy == NULL || call->headers == NULL)
	{
		if (easy)
			http_easy_put(easy);
		rw_http_fail(call, RW_CALL_PREPARE, "could not prepare the call");
		return false;
	}
	wait = call->following ? http_follow_wait(call) : 0;
	url = http_call_url(call, wait);
	http_set_transport(easy, call, url, http_call_timeout_ms(call, wait));
	pfree(url);
	curl_easy_setopt(easy, CURLOPT_HTTPHEADER, (struct curl_slist *) call->headers);
	if (!call->following)
	{
		curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE, (long) strlen(call->body));
		curl_easy_setopt(easy, CURLOPT_POSTFIELDS, call->body);
	}
	curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, http_write_cb);
	curl_easy_setopt(easy, CURLOPT_WRITEDATA, call);
#if LIBCURL_VERSION_NUM >= 0x075000
	curl_easy_setopt(easy, CURLOPT_PREREQFUNCTION, http_prereq_cb);
	curl_easy_setopt(easy, CURLOPT_PREREQDATA, call);
#endif
	curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, call->error);
	curl_easy_setopt(easy, CURLOPT_PRIVATE, call);
	call->easy = easy;
	if (curl_multi_add_handle(http_multi, easy) != CURLM_OK)
	{
		http_release(call);
		rw_http_fail(call, RW_CALL_PREPARE, "could not prepare the call");
		return false;
	}
	RW_COUNT(calls);
	return true;
}

/*
 * Abandon a call in flight, e.g. when the extension was dropped.
 */
void
rw_http_abort(RwCall *call)
{
	http_release(call);
	http_failed_starts = list_delete_ptr(http_failed_starts, call);
}

/*
 * Milliseconds until libcurl wants to be called back, or -1 if never.
 */
long
rw_http_timeout(void)
{
	int64		now;

	if (http_failed_starts != NIL)
		return 0;
	if (http_timer_at == 0)
		return -1;
	now = http_monotonic_us();
	if (http_timer_at <= now)
		return 0;
	return (long) ((http_timer_at - now + 999) / 1000);
}

/*
 * Whether the worker's wait event set must be built anew: a parked socket
 * became ready, or parked sockets were forgotten to make room.
 */
bool
rw_http_wait_set_stale(void)
{
	return http_set_stale;
}

/*
 * The most sockets libcurl may have watched at once: the room a wait event
 * set needs for them.
 */
int
rw_http_max_sockets(void)
{
	return HTTP_MAX_SOCKETS;
}

/*
 * The wait events a socket is watched for.
 */
static uint32
http_socket_events(const HttpSocket *sock)
{
	uint32		ev = 0;

	if (sock->what & CURL_POLL_IN)
		ev |= WL_SOCKET_READABLE;
	if (sock->what & CURL_POLL_OUT)
		ev |= WL_SOCKET_WRITEABLE;
	return ev;
}

/*
 * Add the sockets libcurl wants watched to a new wait event set; parked
 * sockets are forgotten (libcurl says when it wants one again).
 */
void
rw_http_add_sockets(WaitEventSet *set)
{
	int			i;

	http_drop_parked();
	for (i = 0; i < http_nsockets; i++)
	{
		http_sockets[i].pos = AddWaitEventToSet(set, http_socket_events(&http_sockets[i]),
												http_sockets[i].fd, NULL, NULL);
		http_sockets[i].changed = false;
	}
	http_set_used = http_nsockets;
	http_set_stale = false;
}

/*
 * Bring the wait event set up to date with libcurl's sockets: add the new
 * ones, change the events of those whose wish changed.  Returns false,
 * having changed nothing, if the set has no room for the new ones (the
 * events of sockets closed since it was built still take theirs): the
 * caller then builds it anew.
 */
bool
rw_http_update_sockets(WaitEventSet *set)
{
	int			added = 0;
	int			i;

	for (i = 0; i < http_nsockets; i++)
		added += (http_sockets[i].what != 0 && http_sockets[i].pos < 0);
	if (http_set_used + added > HTTP_MAX_SOCKETS)
		return false;
	for (i = 0; i < http_nsockets; i++)
	{
		HttpSocket *sock = &http_sockets[i];

		if (sock->what == 0)
			continue;
		if (sock->pos < 0)
		{
			sock->pos = AddWaitEventToSet(set, http_socket_events(sock), sock->fd,
										  NULL, NULL);
			http_set_used++;
		}
		else if (sock->changed)
			ModifyWaitEvent(set, sock->pos, http_socket_events(sock), NULL);
		sock->changed = false;
	}
	return true;
}

/*
 * A watched socket is ready: let libcurl move its transfers on.
 */
void
rw_http_socket_event(pgsocket fd, uint32 events)
{
	HttpSocket *sock = http_find_socket(fd);
	int			mask = 0;
	int			running;

	if (sock == NULL || sock->what == 0)
	{
		/* parked, and ready: build the set without it before waiting again */
		http_set_stale = true;
		return;
	}
	if (events & WL_SOCKET_READABLE)
		mask |= CURL_CSELECT_IN;
	if (events & WL_SOCKET_WRITEABLE)
		mask |= CURL_CSELECT_OUT;
	curl_multi_socket_action(http_multi, fd, mask, &running);
}

/*
 * libcurl's timer expired (or is due): let it handle timeouts and
 * start queued transfers.
 */
void
rw_http_timer_event(void)
{
	int			running;

	if (http_timer_at != 0 && http_timer_at <= http_monotonic_us())
	{
		http_timer_at = 0;
		curl_multi_socket_action(http_multi, CURL_SOCKET_TIMEOUT, 0, &running);
	}
}

/*
 * The name of a kind of outcome, as src/sql/50_worker.sql knows it.
 */
const char *
rw_http_kind_name(RwCallKind kind)
{
	switch (kind)
	{
		case RW_CALL_ANSWER:
			return "answer";
		case RW_CALL_CONNECT:
			return "connect";
		case RW_CALL_TIMEOUT:
			return "timeout";
		case RW_CALL_NETWORK:
			return "network";
		case RW_CALL_PREPARE:
			return "prepare";
		case RW_CALL_TLS:
			return "tls";
		case RW_CALL_TOO_LARGE:
			return "too_large";
		case RW_CALL_PROTOCOL:
			return "protocol";
		case RW_CALL_UNREGISTERED:
			return "unregistered";
		case RW_CALL_URL:
			return "url";
	}
	return "protocol";
}

/*
 * Sort a transfer that ended without an answer by what may help: only a
 * failure to connect, a timeout or a lost connection may succeed later;
 * TLS failures, oversized and malformed answers will not, nor an agent's
 * URL that libcurl refuses (one registered before 1.9 may have a port
 * above 65535): that one is told apart, so that the request's error says
 * what to do.
 */
static RwCallKind
http_classify(CURLcode rc, bool too_big)
{
	if (too_big)
		return RW_CALL_TOO_LARGE;
	switch (rc)
	{
		case CURLE_URL_MALFORMAT:
			return RW_CALL_URL;
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_RESOLVE_PROXY:
		case CURLE_COULDNT_CONNECT:

			/*
			 * A TLS handshake cut short (an agent restarting, or at its
			 * connection limit) sent no request either: retried like a
			 * refused connection.  Certificate problems are RW_CALL_TLS.
			 */
		case CURLE_SSL_CONNECT_ERROR:
			return RW_CALL_CONNECT;
		case CURLE_OPERATION_TIMEDOUT:
			return RW_CALL_TIMEOUT;
		case CURLE_SEND_ERROR:
		case CURLE_RECV_ERROR:
		case CURLE_GOT_NOTHING:
		case CURLE_PARTIAL_FILE:
			return RW_CALL_NETWORK;
		case CURLE_PEER_FAILED_VERIFICATION:
		case CURLE_SSL_CERTPROBLEM:
		case CURLE_SSL_CIPHER:
		case CURLE_SSL_CACERT_BADFILE:
		case CURLE_SSL_ISSUER_ERROR:
		case CURLE_SSL_CRL_BADFILE:
		case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
		case CURLE_SSL_INVALIDCERTSTATUS:
		case CURLE_USE_SSL_FAILED:
			return RW_CALL_TLS;
		default:
			return RW_CALL_PROTOCOL;
	}
}

/*
 * Fill in the outcome of a finished transfer: the HTTP status, or the kind
 * of failure, and whether any of the request was sent (if not, the agent
 * certainly did not get it).  A request that went out on a kept-alive
 * connection which then closed without an answer is sent again by libcurl
 * on a new connection; if that one cannot be made, libcurl reports a
 * failure to connect, and the request size of the last try, none.  But the
 * agent may have read the first (and crashed before answering): such a call
 * counts as a lost connection, sent.  And a call that timed out before any
 * request went out (connecting, or in the TLS handshake) is a failure to
 * connect, not a timeout waiting for the agent.
 */
static void
http_outcome(RwCall *call, CURLcode rc)
{
	long		code = 0;
	long		request_size = 0;

	curl_easy_getinfo((CURL *) call->easy, CURLINFO_REQUEST_SIZE, &request_size);
	call->sent = request_size > 0 || call->went_out;
	if (rc == CURLE_OK)
	{
		curl_easy_getinfo((CURL *) call->easy, CURLINFO_RESPONSE_CODE, &code);
		call->http_status = code;
		call->kind = RW_CALL_ANSWER;
		call->error[0] = '\0';
		return;
	}
	call->http_status = 0;
	call->kind = http_classify(rc, call->resp_too_big);
	if (call->kind == RW_CALL_CONNECT && call->went_out)
		call->kind = RW_CALL_NETWORK;
#if LIBCURL_VERSION_NUM >= 0x075000
	else if (call->kind == RW_CALL_TIMEOUT && !call->sent)
		call->kind = RW_CALL_CONNECT;	/* timed out connecting (or in TLS) */
#endif
	if (call->kind == RW_CALL_CONNECT)
		call->sent = false;
	if (call->error[0] == '\0')
		strlcpy(call->error, curl_easy_strerror(rc), sizeof(call->error));
	RW_COUNT(call_errors);
}

/*
 * Log a call that got no usable answer, with the details that are kept out
 * of the request's row: the agent's URL, libcurl's error, the status and
 * the start of the body.
 */
static void
http_log_outcome(RwCall *call)
{
	if (call->kind != RW_CALL_ANSWER)
		ereport(LOG,
				(errmsg("restart_worker: request %s: call to agent %s failed (%s): %s",
						call->id, call->url, rw_http_kind_name(call->kind),
						call->error)));
	else if (call->http_status != 200 && call->http_status != 202)
	{
		char		excerpt[201];
		int			n = (int) Min(call->resp_len, sizeof(excerpt) - 1);
		int			i;

		for (i = 0; i < n; i++)
			excerpt[i] = (call->resp[i] >= 0x20 && call->resp[i] < 0x7f) ? call->resp[i] : '?';
		excerpt[n] = '\0';
		ereport(LOG,
				(errmsg("restart_worker: request %s: agent %s answered HTTP %ld: %s",
						call->id, call->url, call->http_status, excerpt)));
	}
}

/*
 * Return the next finished call, with its outcome filled in and its
 * transfer released, or NULL when there is none.
 */
RwCall *
rw_http_next_done(void)
{
	CURLMsg    *msg;
	int			left;

	if (http_failed_starts != NIL)
	{
		RwCall	   *call = linitial(http_failed_starts);

		http_failed_starts = list_delete_first(http_failed_starts);
		RW_COUNT(call_errors);
		http_log_outcome(call);
		return call;
	}
	while ((msg = curl_multi_info_read(http_multi, &left)) != NULL)
	{
		RwCall	   *call = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &call);
		http_outcome(call, msg->data.result);
		http_release(call);
		http_log_outcome(call);
		if (call->kind == RW_CALL_ANSWER)
			rw_encoding_answer(call);
		return call;
	}
	return NULL;
}
