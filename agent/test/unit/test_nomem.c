/*
 * Unit tests of the agent when memory runs out: a real job table, journal,
 * HTTP server (on a unix socket) and step programs, with one allocation
 * made to fail at a time.
 *
 * The test is linked with --wrap for malloc, calloc, realloc and strdup
 * (see the Makefile), so that every allocation the agent's own code makes
 * goes through the wrappers below: also jansson's, which the agent routes
 * through util.c (util_json_init()); OpenSSL is given the same allocator
 * (CRYPTO_set_mem_functions()).  Once armed with n, the wrappers let the
 * first n - 1 allocations through and fail the n-th (ENOMEM), in any
 * thread.  A test sweeps n from 1 until a run makes fewer than n
 * allocations: every allocation of the run has then failed once, and
 * whatever failed, the answer must be true (a clear failure, never a
 * wrong success).
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "agent.h"

/* A sweep that has not ended after this many runs is a failure. */
#define NOMEM_MAX_RUNS 2000
#define NOMEM_WAIT_MS 20000

extern void *__real_malloc(size_t size);
extern void *__real_calloc(size_t n, size_t size);
extern void *__real_realloc(void *p, size_t size);
extern char *__real_strdup(const char *s);
extern void *__wrap_malloc(size_t size);
extern void *__wrap_calloc(size_t n, size_t size);
extern void *__wrap_realloc(void *p, size_t size);
extern char *__wrap_strdup(const char *s);

static atomic_int nomem_at;		/* the allocation to fail, 0 for none */
static atomic_int nomem_count;	/* allocations made since armed */

static char dir[64];
static char second[128];		/* written by the step that must never run */
static char envfile[128];		/* where the failing step writes its environment */
static agent_config *cfg;

static bool warm_up_openssl(void);
static int	saved_stderr = -1;

/*
 * Count an allocation if armed, and tell whether it is the one to fail.
 */
static bool
nomem_fail(void)
{
	if (atomic_load(&nomem_at) == 0)
		return false;
	if (atomic_fetch_add(&nomem_count, 1) + 1 != atomic_load(&nomem_at))
		return false;
	errno = ENOMEM;
	return true;
}

void *
__wrap_malloc(size_t size)
{
	return nomem_fail() ? NULL : __real_malloc(size);
}

void *
__wrap_calloc(size_t n, size_t size)
{
	return nomem_fail() ? NULL : __real_calloc(n, size);
}

void *
__wrap_realloc(void *p, size_t size)
{
	return nomem_fail() ? NULL : __real_realloc(p, size);
}

char *
__wrap_strdup(const char *s)
{
	return nomem_fail() ? NULL : __real_strdup(s);
}

/* OpenSSL's allocation functions: the same, failing as armed. */
static void *
nomem_crypto_malloc(size_t size, const char *file, int line)
{
	(void) file;
	(void) line;
	return __wrap_malloc(size);
}

static void *
nomem_crypto_realloc(void *p, size_t size, const char *file, int line)
{
	(void) file;
	(void) line;
	return __wrap_realloc(p, size);
}

static void
nomem_crypto_free(void *p, const char *file, int line)
{
	(void) file;
	(void) line;
	free(p);
}

/* Fail the n-th allocation from now on. */
static void
nomem_arm(int n)
{
	atomic_store(&nomem_count, 0);
	atomic_store(&nomem_at, n);
}

/* Stop failing allocations; returns how many were made since armed. */
static int
nomem_disarm(void)
{
	atomic_store(&nomem_at, 0);
	return atomic_load(&nomem_count);
}

/*
 * Send the agent's log lines (stderr) to a file while it works, and back
 * to the test's stderr for cmocka's messages.
 */
static void
quiet(bool on)
{
	char		path[128];
	int			fd;

	fflush(stderr);
	if (on)
	{
		snprintf(path, sizeof(path), "%s/agent.log", dir);
		fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
		if (fd >= 0)
		{
			dup2(fd, STDERR_FILENO);
			close(fd);
		}
	}
	else
		dup2(saved_stderr, STDERR_FILENO);
}

/* Make the n-th request id of the test. */
static void
make_id(char *id, int n)
{
	static int	serial;

	snprintf(id, UUID_TEXT_LEN + 1, "0000%04x-0000-4000-8000-%012x", (unsigned) n, (unsigned) ++serial);
}

/*
 * Run a job of service with the fail_at-th allocation failing (0: none),
 * in this thread (POST ?wait), and return its state once it has ended (a
 * new reference; NULL if it was not accepted) after disarming.  *res gets
 * what the submission answered, *made the allocations of the run.
 */
static json_t *
run_job(const char *service, int fail_at, jobs_submit_result *res, int *made)
{
	restart_request req;
	json_t	   *report = NULL;

	memset(&req, 0, sizeof(req));
	make_id(req.request_id, fail_at);
	snprintf(req.service, sizeof(req.service), "%s", service);
	snprintf(req.requested_at, sizeof(req.requested_at), "2026-11-26T05:00:00Z");
	nomem_arm(fail_at);
	*res = jobs_submit(&req, NOMEM_WAIT_MS, &report);
	*made = nomem_disarm();
	json_decref(report);
	report = NULL;
	if (!jobs_lookup(req.request_id, NOMEM_WAIT_MS, &report))
		return NULL;
	return report;
}

/*
 * Tell whether the object of a job whose first step ran holds that step
 * and its output: the "==> step 1" line that starts it, unless the output
 * is marked truncated (memory for it may have run out: the tail then
 * keeps fewer bytes, and says so).
 */
static bool
job_is_whole(json_t *job_obj)
{
	const char *output = json_string_value(json_object_get(job_obj, "output"));

	return json_array_size(json_object_get(job_obj, "steps")) == 1 && output != NULL &&
		(strstr(output, "==> step 1: ") != NULL || json_is_true(json_object_get(job_obj, "output_truncated")));
}

/*
 * Check the environment that the failing step of the last runs recorded
 * (a line each, "A=... PATH=... LANG=... ID=... SVC=..."): every variable
 * there, the configured one, PATH, LANG and the two the agent adds,
 * never one left out.  Writes what is wrong into bad (empty if nothing),
 * and empties the record.
 */
static void
check_env(int fail_at, char *bad, size_t size)
{
	FILE	   *f = fopen(envfile, "r");
	char		line[1024];

	bad[0] = '\0';
	while (f != NULL && bad[0] == '\0' && fgets(line, sizeof(line), f) != NULL)
	{
		char		a[64] = "";
		char		path[512] = "";
		char		lang[64] = "";
		char		id[64] = "";
		char		svc[64] = "";

		if (sscanf(line, "A=%63s PATH=%511s LANG=%63s ID=%63s SVC=%63s", a, path, lang, id, svc) != 5 ||
			strcmp(a, "configured") != 0 || path[0] != '/' || strcmp(lang, "C.UTF-8") != 0 ||
			strlen(id) != UUID_TEXT_LEN || strcmp(svc, "exits") != 0)
			snprintf(bad, size, "allocation %d failed: a step ran with a variable left out: %s",
					 fail_at, line);
	}
	if (f != NULL)
		fclose(f);
	unlink(envfile);
}

/*
 * Check what became of a job whose first step fails, its second never to
 * run; write what is wrong into bad (empty if nothing).  Refused (nothing
 * accepted, nothing ran) and failed with a reason are both right answers.
 */
static void
check_failed_job(jobs_submit_result res, json_t *job_obj, int fail_at, char *bad, size_t size)
{
	char	   *text = job_obj ? json_dumps(job_obj, JSON_COMPACT) : NULL;
	const char *status = json_string_value(json_object_get(job_obj, "status"));
	const char *error = json_string_value(json_object_get(job_obj, "error"));

	check_env(fail_at, bad, size);
	if (bad[0] != '\0')
		;
	else if (access(second, F_OK) == 0)
		snprintf(bad, size, "allocation %d failed: the step after the failed one ran; job %s",
				 fail_at, text ? text : "(none)");
	else if (res == JOBS_INTERNAL_ERROR && job_obj != NULL)
		snprintf(bad, size, "allocation %d failed: refused, yet the job is known: %s", fail_at, text);
	else if (res == JOBS_ACCEPTED &&
			 (status == NULL || strcmp(status, "failed") != 0 || error == NULL || error[0] == '\0'))
		snprintf(bad, size, "allocation %d failed: the job did not fail with a reason: %s",
				 fail_at, text ? text : "(none)");
	else if (res == JOBS_ACCEPTED && !job_is_whole(job_obj))
		snprintf(bad, size, "allocation %d failed: the job's state lost its output or steps: %s",
				 fail_at, text);
	else if (res != JOBS_ACCEPTED && res != JOBS_INTERNAL_ERROR)
		snprintf(bad, size, "allocation %d failed: submission answered %d", fail_at, (int) res);
	free(text);
}

/*
 * Sweep the allocations of a job of service, whose first step fails, and
 * check each outcome; fail the test with the first wrong one.  A run with
 * no failure first checks the job itself, and that the sweep fails
 * allocations at all.
 */
static void
sweep_failed_job(const char *service)
{
	char		bad[8192] = "";
	jobs_submit_result res;
	json_t	   *job_obj;
	int			made = 0;
	int			n;

	unlink(second);
	quiet(true);
	job_obj = run_job(service, 0, &res, &made);
	check_failed_job(res, job_obj, 0, bad, sizeof(bad));
	json_decref(job_obj);
	if (bad[0] == '\0' && res != JOBS_ACCEPTED)
		snprintf(bad, sizeof(bad), "with no allocation failing, the job was refused (%d)", (int) res);
	for (n = 1; bad[0] == '\0' && n <= NOMEM_MAX_RUNS; n++)
	{
		job_obj = run_job(service, n, &res, &made);
		check_failed_job(res, job_obj, n, bad, sizeof(bad));
		json_decref(job_obj);
		if (made < n)
			break;
	}
	quiet(false);
	if (bad[0] != '\0')
		fail_msg("%s (service %s; the agent's log is in %s/agent.log)", bad, service, dir);
	if (n > NOMEM_MAX_RUNS)
		fail_msg("a job of %s still made allocations after %d runs", service, NOMEM_MAX_RUNS);
	if (n < 10)
		fail_msg("a job of %s made only %d allocations: are they wrapped?", service, n - 1);
}

/*
 * A step that exits non-zero fails its job, whichever allocation fails
 * (the copy of its error text included), and the next step never runs.
 */
/*
 * Sign with allocation fail_at failing, then with none failing, in a child
 * process (so that each starts without the HMAC template, which the first
 * signature of a process makes).  The child exits 0 if the first signature
 * failed and the second worked, 1 if the second failed too, 2 if fewer
 * than fail_at allocations were made (none failed), 3 if the first worked.
 */
static int
verify_template_child(const verify_secret *secret, int fail_at)
{
	pid_t		pid = fork();
	int			status;

	if (pid == 0)
	{
		char		sig[256];
		bool		first;
		bool		second;
		int			made;

		nomem_arm(fail_at);
		first = verify_sign(secret, "id-1", "1", (const unsigned char *) "{}", 2, sig, sizeof(sig));
		made = nomem_disarm();
		second = verify_sign(secret, "id-2", "2", (const unsigned char *) "{}", 2, sig, sizeof(sig));
		_exit(!second ? 1 : made < fail_at ? 2 : first ? 3 : 0);
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
		return -1;
	return WEXITSTATUS(status);
}

/*
 * The signature check's HMAC template, made by the first request that
 * needs it: when memory runs out while it is being made, that request is
 * refused and the next one makes it (made once for good, a failure left
 * every later request refused until the agent restarted).  Each
 * allocation of a first signature fails once, in a process of its own.
 * Runs without setup(): no thread of the agent's is running to fork.
 */
static void
test_verify_template_retried(void **state)
{
	verify_secret secret;
	const char *reason;
	int			refused = 0;
	int			n;

	(void) state;
	assert_true(verify_parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &secret, &reason));
	assert_true(warm_up_openssl());
	for (n = 1; n <= NOMEM_MAX_RUNS; n++)
	{
		int			rc = verify_template_child(&secret, n);

		if (rc == 2)
			break;
		if (rc != 0 && rc != 3)
			fail_msg("with allocation %d failing, the next signature failed too (%d)", n, rc);
		refused += rc == 0;
	}
	assert_true(n <= NOMEM_MAX_RUNS);
	assert_true(refused > 0);
}

static void
test_step_exit_code(void **state)
{
	(void) state;
	sweep_failed_job("exits");
}

/*
 * The same for a step whose program cannot start.
 */
static void
test_step_cannot_start(void **state)
{
	(void) state;
	sweep_failed_job("missing");
}

/*
 * Send one signed request over the agent's socket (a new connection,
 * closed after the answer) and read the answer: returns its status, 0 if
 * the connection closed without one, and its body as JSON in *answer (a
 * new reference; NULL if it is not JSON).  Allocations fail as armed
 * meanwhile (the client's own are made before and after).
 */
static int
http_call(const char *method, const char *path, const char *id, const char *body,
		  int fail_at, int *made, json_t **answer)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	char		ts[32];
	char		sig[128];
	char		req[4096];
	static char resp[1 << 20];
	size_t		got = 0;
	size_t		len;
	ssize_t		n;
	int			status = 0;
	int			fd;
	char	   *p;

	*answer = NULL;
	snprintf(ts, sizeof(ts), "%lld", (long long) time(NULL));
	assert_true(verify_sign(&cfg->secrets[0], id, ts, (const unsigned char *) body, strlen(body),
							sig, sizeof(sig)));
	len = (size_t) snprintf(req, sizeof(req),
							"%s %s HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n"
							"Content-Type: application/json\r\nContent-Length: %zu\r\n"
							"webhook-id: %s\r\nwebhook-timestamp: %s\r\nwebhook-signature: %s\r\n\r\n%s",
							method, path, strlen(body), id, ts, sig, body);
	assert_true(len < sizeof(req));
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/sock", dir);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(fd >= 0);
	nomem_arm(fail_at);
	if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) == 0 && write(fd, req, len) == (ssize_t) len)
	{
		while (got < sizeof(resp) - 1 && (n = read(fd, resp + got, sizeof(resp) - 1 - got)) > 0)
			got += (size_t) n;
	}
	*made = nomem_disarm();
	close(fd);
	resp[got] = '\0';
	if (sscanf(resp, "HTTP/1.1 %d", &status) != 1)
		return 0;
	if ((p = strstr(resp, "\r\n\r\n")) != NULL)
		*answer = json_loads(p + 4, 0, NULL);
	return status;
}

/*
 * The agent's answer to GET of a finished job, whichever allocation
 * fails: 200 with the whole job object, or 500 (out_of_memory, or
 * internal_error when the signature could not be checked; or the
 * connection closed without an answer), never a 200 with another body or
 * a job object with parts left out, nor any other status (401 for a
 * signature that could not be checked, say).
 */
static void
test_get_job(void **state)
{
	char		bad[8192] = "";
	char		path[128];
	char		id[UUID_TEXT_LEN + 1];
	jobs_submit_result res;
	json_t	   *job_obj;
	int			made = 0;
	int			n;

	(void) state;
	quiet(true);
	job_obj = run_job("exits", 0, &res, &made);
	quiet(false);
	assert_int_equal(res, JOBS_ACCEPTED);
	assert_non_null(job_obj);
	snprintf(id, sizeof(id), "%s", json_string_value(json_object_get(job_obj, "request_id")));
	json_decref(job_obj);
	snprintf(path, sizeof(path), "/v1/restarts/%s", id);
	quiet(true);
	for (n = 0; bad[0] == '\0' && n <= NOMEM_MAX_RUNS; n++)
	{
		json_t	   *answer;
		int			status = http_call("GET", path, id, "", n, &made, &answer);
		const char *error = json_string_value(json_object_get(answer, "error"));
		const char *rid = json_string_value(json_object_get(answer, "request_id"));
		const char *st = json_string_value(json_object_get(answer, "status"));
		char	   *text = answer ? json_dumps(answer, JSON_COMPACT) : NULL;

		if (!(status == 0 ||
			  (status == 500 && error != NULL &&
			   (strcmp(error, "out_of_memory") == 0 || strcmp(error, "internal_error") == 0)) ||
			  (status == 200 && rid != NULL && strcmp(rid, id) == 0 && st != NULL &&
			   strcmp(st, "failed") == 0 && job_is_whole(answer))))
			snprintf(bad, sizeof(bad), "allocation %d failed: GET answered %d %s", n, status,
					 text ? text : "(not JSON)");
		free(text);
		json_decref(answer);
		if (n > 0 && made < n)
			break;
	}
	quiet(false);
	if (bad[0] != '\0')
		fail_msg("%s (the agent's log is in %s/agent.log)", bad, dir);
	if (n < 10 || n > NOMEM_MAX_RUNS)
		fail_msg("GET made %d allocations or more: are they wrapped?", n - 1);
}

/*
 * The agent's answer to POST ?wait of a new job whose first step fails,
 * whichever allocation fails: 202 with the whole job object, failed; 500
 * internal_error, and then nothing ran (the job is unknown); or, when it
 * could not say which, 500 out_of_memory (or the connection closed
 * without an answer), and then the job is unknown or failed.  Never a
 * refusal as if the request were at fault (400 for a body that could not
 * be read, 401 for a signature that could not be computed, 413 for a
 * body that could not be stored), and the second step never runs.
 */
static void
test_post_job(void **state)
{
	char		bad[8192] = "";
	int			made = 0;
	int			n;

	(void) state;
	unlink(second);
	quiet(true);
	for (n = 0; bad[0] == '\0' && n <= NOMEM_MAX_RUNS; n++)
	{
		char		id[UUID_TEXT_LEN + 1];
		char		body[512];
		json_t	   *answer;
		json_t	   *job_obj = NULL;
		int			status;
		const char *error;
		const char *rid;
		const char *st;
		char	   *text;
		char	   *job_text;
		bool		known;

		make_id(id, n);
		snprintf(body, sizeof(body),
				 "{\"request_id\":\"%s\",\"service\":\"exits\",\"requested_by\":null,"
				 "\"requested_at\":\"2026-11-26T05:00:00Z\"}", id);
		status = http_call("POST", "/v1/restarts?wait=20", id, body, n, &made, &answer);
		error = json_string_value(json_object_get(answer, "error"));
		rid = json_string_value(json_object_get(answer, "request_id"));
		st = json_string_value(json_object_get(answer, "status"));
		known = jobs_lookup(id, NOMEM_WAIT_MS, &job_obj);
		text = answer ? json_dumps(answer, JSON_COMPACT) : NULL;
		job_text = job_obj ? json_dumps(job_obj, JSON_COMPACT) : NULL;
		check_env(n, bad, sizeof(bad));
		if (bad[0] != '\0')
			;
		else if (access(second, F_OK) == 0)
			snprintf(bad, sizeof(bad), "allocation %d failed: the step after the failed one ran", n);
		else if (status == 202 && rid != NULL && strcmp(rid, id) == 0 && st != NULL &&
				 strcmp(st, "failed") == 0 && job_is_whole(answer))
			;
		else if (status == 500 && error != NULL && strcmp(error, "internal_error") == 0)
		{
			if (known)
				snprintf(bad, sizeof(bad), "allocation %d failed: 500 internal_error, yet the job is known: %s",
						 n, job_text);
		}
		else if (status == 0 || (status == 500 && error != NULL && strcmp(error, "out_of_memory") == 0))
		{
			if (known && !(strcmp(json_string_value(json_object_get(job_obj, "status")), "failed") == 0 &&
						   job_is_whole(job_obj)))
				snprintf(bad, sizeof(bad), "allocation %d failed: answered %d, and the job is %s", n, status,
						 job_text);
		}
		else
			snprintf(bad, sizeof(bad), "allocation %d failed: POST answered %d %s", n, status,
					 text ? text : "(not JSON)");
		free(text);
		free(job_text);
		json_decref(answer);
		json_decref(job_obj);
		if (n > 0 && made < n)
			break;
	}
	quiet(false);
	if (bad[0] != '\0')
		fail_msg("%s (the agent's log is in %s/agent.log)", bad, dir);
	if (n < 10 || n > NOMEM_MAX_RUNS)
		fail_msg("POST made %d allocations or more: are they wrapped?", n - 1);
}

/* Remove one file or directory of the test's tree, for nftw. */
static int
remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void) st;
	(void) flag;
	(void) ftw;
	return remove(path);
}

#define ID_DONE "00000000-0000-4000-8000-0000000000d1"
#define ID_FAILED "00000000-0000-4000-8000-0000000000f1"
#define ID_MARKER "00000000-0000-4000-8000-0000000000e1"

/*
 * Render the record of a finished job of one step, accepted and ended on
 * day (YYYY-MM-DD), into buf (2048 bytes).
 */
static void
make_record_on(char *buf, const char *day, const char *id, const char *status, int code,
			   const char *error)
{
	snprintf(buf, 2048,
			 "{\"request_id\":\"%s\",\"service\":\"exits\",\"requested_by\":null,"
			 "\"requested_at\":\"%sT05:00:00Z\",\"status\":\"%s\","
			 "\"accepted_at\":\"%sT05:00:01.000000Z\",\"started_at\":\"%sT05:00:01.000000Z\","
			 "\"finished_at\":\"%sT05:00:02.000000Z\",\"exit_code\":%d,\"signal\":null,"
			 "\"steps\":[{\"argv\":[\"/bin/sh\"],\"exit_code\":%d,\"signal\":null,\"timed_out\":false,"
			 "\"started_at\":\"%sT05:00:01.000000Z\",\"finished_at\":\"%sT05:00:02.000000Z\"}],"
			 "\"output\":\"==> step 1: /bin/sh\\nhello\\n\",\"output_truncated\":false,\"error\":%s}",
			 id, day, status, day, day, day, code, code, day, day, error);
}

/* Render the record of a finished job of one step (a buffer of 2048). */
static void
make_record(char *buf, const char *id, const char *status, int code, const char *error)
{
	make_record_on(buf, "2026-11-26", id, status, code, error);
}

/*
 * Check jobs loaded from a journal holding the records of make_states():
 * write what is wrong into bad (empty if nothing).  A job's output may
 * be cut if marked truncated (memory for it ran out), nothing else may
 * differ.  With legacy, only the completed job is expected.
 */
static void
check_loaded(job **jobs, int n, bool legacy, int fail_at, char *bad, size_t size)
{
	int			seen = 0;

	bad[0] = '\0';
	for (int i = 0; i < n && bad[0] == '\0'; i++)
	{
		job		   *j = jobs[i];
		size_t		len;
		char	   *output = tail_to_utf8(&j->output, &len);
		bool		output_ok = output != NULL &&
			(strcmp(output, "==> step 1: /bin/sh\nhello\n") == 0 || j->output.truncated);
		bool		ok;

		if (strcmp(j->id, ID_DONE) == 0)
			ok = !j->unreadable && j->status == JOB_COMPLETED && j->error == NULL &&
				j->nsteps == 1 && output_ok;
		else if (strcmp(j->id, ID_FAILED) == 0)
			ok = !j->unreadable && j->status == JOB_FAILED && j->error != NULL &&
				strcmp(j->error, "step 1 exited with code 3") == 0 && j->nsteps == 1 && output_ok;
		else
			ok = strcmp(j->id, ID_MARKER) == 0 && j->unreadable && j->status == JOB_FAILED;
		if (!ok)
			snprintf(bad, size, "allocation %d failed: job %s loaded %s, %s, error %s, %d step(s), output \"%s\"",
					 fail_at, j->id, j->unreadable ? "unreadable" : "readable", job_status_name(j->status),
					 j->error ? j->error : "(none)", j->nsteps, output ? output : "?");
		seen++;
		free(output);
	}
	if (bad[0] == '\0' && seen != (legacy ? 1 : 3))
		snprintf(bad, size, "allocation %d failed: %d job(s) loaded", fail_at, seen);
}

/*
 * Load the journal of state dir with the fail_at-th allocation failing,
 * as the agent does at start, and check what it loaded (a failed load is
 * a right answer: the agent refuses to start).  Returns the allocations
 * made, and in *failed whether the load failed.
 */
static int
load_and_check(const char *state_dir, bool legacy, int fail_at, bool *failed, char *bad, size_t size)
{
	char		err[256];
	job		  **jobs;
	int			made;
	int			n;

	bad[0] = '\0';
	if (!journal_open(state_dir, err, sizeof(err)))
	{
		snprintf(bad, size, "cannot open the journal: %s", err);
		return 0;
	}
	nomem_arm(fail_at);
	n = journal_load(&jobs, 4096);
	made = nomem_disarm();
	*failed = n < 0;
	if (n >= 0)
	{
		check_loaded(jobs, n, legacy, fail_at, bad, size);
		for (int i = 0; i < n; i++)
			job_free(jobs[i]);
		free(jobs);
	}
	journal_close();
	return made;
}

/*
 * Write a state directory under the test's directory: a journal holding a
 * completed job, a failed one and the marker of a record found unreadable
 * earlier; or, with legacy, the previous version's jobs/ directory holding
 * the completed job's record file.
 */
static void
make_state(const char *state_dir, bool legacy)
{
	char		err[256];
	char		path[256];
	char		record[2048];
	job		  **jobs;
	FILE	   *f;
	bool		ok;

	assert_int_equal(mkdir(state_dir, 0700), 0);
	make_record(record, ID_DONE, "completed", 0, "null");
	if (legacy)
	{
		snprintf(path, sizeof(path), "%s/jobs", state_dir);
		assert_int_equal(mkdir(path, 0700), 0);
		snprintf(path, sizeof(path), "%s/jobs/%s.json", state_dir, ID_DONE);
		assert_non_null(f = fopen(path, "w"));
		fputs(record, f);
		fclose(f);
		return;
	}
	quiet(true);
	ok = journal_open(state_dir, err, sizeof(err)) && journal_load(&jobs, 4096) == 0;
	if (ok)
		free(jobs);
	ok = ok && journal_write(ID_DONE, record);
	make_record(record, ID_FAILED, "failed", 3, "\"step 1 exited with code 3\"");
	ok = ok && journal_write(ID_FAILED, record) &&
		journal_write(ID_MARKER, "{\"request_id\":\"" ID_MARKER "\",\"unreadable\":true}");
	journal_close();
	quiet(false);
	assert_true(ok);
}

/* Stop the job table and the HTTP server, once. */
static void
stop_agent(void)
{
	static bool stopped;

	if (stopped)
		return;
	stopped = true;
	quiet(true);
	jobs_shutdown();
	http_stop();
	jobs_cleanup();
	quiet(false);
}

/*
 * Runs last.  Every record the sweeps journaled reads back, as after a
 * restart: the final state of each job, whole (its step and output), not
 * one rendered with a part emptied, nor one turned unreadable by a text
 * rendered with a part missing.
 */
static void
test_journal_reads_back(void **state)
{
	char		path[128];
	char		err[256];
	job		  **jobs;
	int			n;

	(void) state;
	stop_agent();
	snprintf(path, sizeof(path), "%s/state", dir);
	quiet(true);
	assert_true(journal_open(path, err, sizeof(err)));
	n = journal_load(&jobs, 4096);
	quiet(false);
	assert_true(n > 100);
	for (int i = 0; i < n; i++)
	{
		json_t	   *job_obj = report_job(jobs[i], jobs[i]->status);

		if (jobs[i]->unreadable || jobs[i]->status != JOB_FAILED || !job_is_whole(job_obj))
		{
			char	   *text = report_text(job_obj);

			fail_msg("job %s read back %s: %s (the agent's log is in %s/agent.log)", jobs[i]->id,
					 jobs[i]->unreadable ? "unreadable" : job_status_name(jobs[i]->status),
					 text ? text : "", dir);
		}
		json_decref(job_obj);
		job_free(jobs[i]);
	}
	free(jobs);
	journal_close();
}


/*
 * Runs after the agent has stopped.  Loading a journal, as the agent does
 * at start, whichever allocation fails: the load fails (the agent refuses
 * to start, and a restart loads it whole), or it loads every job as it
 * was written.  A record that memory ran short for is never taken for a
 * damaged one: cut off as a torn tail, or kept (and compacted) as
 * unreadable, it would be lost for good.  The same for the import of the
 * previous version's record files.
 */
static void
test_journal_load(void **state)
{
	char		bad[4096] = "";
	char		state_dir[128];
	bool		failed;
	int			made;
	int			n;

	(void) state;
	stop_agent();
	snprintf(state_dir, sizeof(state_dir), "%s/loaded", dir);
	make_state(state_dir, false);
	quiet(true);
	for (n = 0; bad[0] == '\0' && n <= NOMEM_MAX_RUNS; n++)
	{
		made = load_and_check(state_dir, false, n, &failed, bad, sizeof(bad));
		if (bad[0] == '\0' && failed && n == 0)
			snprintf(bad, sizeof(bad), "with no allocation failing, the load failed");
		if (n > 0 && made < n)
			break;
	}
	quiet(false);
	if (bad[0] != '\0')
		fail_msg("%s (the agent's log is in %s/agent.log)", bad, dir);
	if (n < 10 || n > NOMEM_MAX_RUNS)
		fail_msg("a load made %d allocations or more: are they wrapped?", n - 1);

	for (n = 0; bad[0] == '\0' && n <= NOMEM_MAX_RUNS; n++)
	{
		snprintf(state_dir, sizeof(state_dir), "%s/legacy%d", dir, n);
		make_state(state_dir, true);
		quiet(true);
		made = load_and_check(state_dir, true, n, &failed, bad, sizeof(bad));
		if (bad[0] == '\0' && failed)
		{
			/* the next start imports the records whole */
			load_and_check(state_dir, true, 0, &failed, bad, sizeof(bad));
			if (bad[0] == '\0' && failed)
				snprintf(bad, sizeof(bad), "allocation %d failed: the import failed, and then a load with none failing",
						 n);
		}
		quiet(false);
		if (n > 0 && made < n)
			break;
	}
	if (bad[0] != '\0')
		fail_msg("import of the previous version's records: %s (the agent's log is in %s/agent.log)", bad, dir);
	if (n < 10 || n > NOMEM_MAX_RUNS)
		fail_msg("an import made %d allocations or more: are they wrapped?", n - 1);
}

#define ID_OLD1 "00000000-0000-4000-8000-0000000000a1"
#define ID_OLD2 "00000000-0000-4000-8000-0000000000a2"
#define ID_OLD3 "00000000-0000-4000-8000-0000000000a3"
#define ID_PAD "00000000-0000-4000-8000-0000000000b1"
#define PAD_BYTES (4400 * 1024)

static const char *const old_ids[] = {ID_OLD1, ID_OLD2, ID_OLD3};

/*
 * Write a state directory whose journal holds three jobs that ended in
 * 2020, past any retention.
 */
static void
make_old_state(const char *state_dir)
{
	char		err[256];
	char		record[2048];
	job		  **jobs;
	bool		ok;

	assert_int_equal(mkdir(state_dir, 0700), 0);
	ok = journal_open(state_dir, err, sizeof(err)) && journal_load(&jobs, 4096) == 0;
	if (ok)
		free(jobs);
	for (int i = 0; ok && i < 3; i++)
	{
		make_record_on(record, "2020-01-01", old_ids[i], "completed", 0, "null");
		ok = journal_write(old_ids[i], record);
	}
	journal_close();
	assert_true(ok);
}

/*
 * Write a record of PAD_BYTES into the open journal: past its compaction
 * threshold (4 MiB), so that the flush of that record begins a compaction
 * at run time.  It is not a job (it loads as an unreadable record).
 */
static bool
write_padding(void)
{
	const char *head = "{\"request_id\":\"" ID_PAD "\",\"padding\":\"";
	size_t		hlen = strlen(head);
	char	   *text = malloc(hlen + PAD_BYTES + 3);
	bool		ok;

	if (text == NULL)
		return false;
	memcpy(text, head, hlen);
	memset(text + hlen, 'x', PAD_BYTES);
	memcpy(text + hlen + PAD_BYTES, "\"}", 3);
	ok = journal_write(ID_PAD, text);
	free(text);
	return ok;
}

/*
 * Check the journal of state_dir after a run of test_prune_keeps_job():
 * every job of old_ids that the agent no longer knew (known[i] false) must
 * be gone from it.  Writes what is wrong into bad (empty if nothing).
 */
static void
check_pruned(const char *state_dir, const bool *known, int fail_at, char *bad, size_t size)
{
	char		err[256];
	job		  **jobs;
	int			n;

	bad[0] = '\0';
	if (!journal_open(state_dir, err, sizeof(err)) || (n = journal_load(&jobs, 4096)) < 0)
	{
		snprintf(bad, size, "allocation %d failed: the journal cannot be read back: %s", fail_at, err);
		journal_close();
		return;
	}
	for (int i = 0; i < n; i++)
	{
		for (int k = 0; k < 3 && bad[0] == '\0'; k++)
			if (strcmp(jobs[i]->id, old_ids[k]) == 0 && !known[k])
				snprintf(bad, size, "allocation %d failed: job %s was pruned from memory, "
						 "yet a compaction after the prune kept it in the journal", fail_at, old_ids[k]);
		job_free(jobs[i]);
	}
	free(jobs);
	journal_close();
}

/*
 * Run the job table on state_dir (a journal of make_old_state()) with the
 * fail_at-th allocation failing while it starts, as the agent does at
 * start (retention prunes the three jobs then, as after every job's end),
 * then, with nothing failing, note which jobs it still knows, make a
 * compaction run (write_padding()) and stop it.  Returns the allocations
 * made; *started tells whether it started.
 */
static int
prune_run(agent_config *c, int fail_at, bool *started, bool *known, char *bad, size_t size)
{
	char		err[256];
	int			made;

	bad[0] = '\0';
	nomem_arm(fail_at);
	*started = jobs_init(c, err, sizeof(err));
	made = nomem_disarm();
	for (int i = 0; i < 3; i++)
	{
		json_t	   *report = NULL;

		known[i] = *started && jobs_lookup(old_ids[i], 0, &report);
		json_decref(report);
	}
	if (*started && !write_padding())
		snprintf(bad, size, "allocation %d failed: the padding record could not be written", fail_at);
	jobs_cleanup();				/* waits for the compaction */
	return made;
}

/*
 * Runs after the agent has stopped.  Retention when memory runs out: a
 * job is dropped from memory only once its removal from the journal is
 * queued; if it cannot be (memory), the job is kept, and the next prune
 * tries again.  Dropped from memory alone, it stayed in the journal
 * through every compaction.  Three jobs past retention are pruned at
 * start, each allocation failing in turn; whatever failed, a job the agent
 * no longer knows is gone from the journal once a compaction has run, and
 * with nothing failing all three are.  Some run must have kept a job (an
 * allocation of the prune failed).
 */
static void
test_prune_keeps_job(void **state)
{
	char		bad[4096] = "";
	char		state_dir[128];
	agent_config c = *cfg;
	int			kept_runs = 0;
	int			n;

	(void) state;
	stop_agent();
	c.retention_days = 1;
	c.retention_max_jobs = 1;
	c.retention_min_age = 0;
	c.state_dir = state_dir;
	for (n = 0; bad[0] == '\0' && n <= NOMEM_MAX_RUNS; n++)
	{
		bool		known[3];
		bool		started;
		int			made;

		snprintf(state_dir, sizeof(state_dir), "%s/pruned%d", dir, n);
		quiet(true);
		make_old_state(state_dir);
		made = prune_run(&c, n, &started, known, bad, sizeof(bad));
		if (bad[0] == '\0' && started)
			check_pruned(state_dir, known, n, bad, sizeof(bad));
		quiet(false);
		if (bad[0] == '\0' && n == 0 && (!started || known[0] || known[1] || known[2]))
			snprintf(bad, sizeof(bad), "with no allocation failing, the jobs were not all pruned at start");
		kept_runs += started && (known[0] || known[1] || known[2]);
		if (n > 0 && made < n)
			break;
	}
	if (bad[0] != '\0')
		fail_msg("%s (the agent's log is in %s/agent.log)", bad, dir);
	if (n < 10 || n > NOMEM_MAX_RUNS)
		fail_msg("a start made %d allocations or more: are they wrapped?", n - 1);
	if (kept_runs == 0)
		fail_msg("no start kept a job past retention: no allocation of the prune failed");
}

#define ID_LEFT "00000000-0000-4000-8000-0000000000c1"
#define LEFT_ERROR "agent restarted during the job"

/*
 * Write a state directory whose journal holds a finished job and one left
 * running by an agent that died (its accept record only).
 */
static void
make_left_running_state(const char *state_dir)
{
	char		err[256];
	char		record[2048];
	job		  **jobs;
	bool		ok;

	assert_int_equal(mkdir(state_dir, 0700), 0);
	ok = journal_open(state_dir, err, sizeof(err)) && journal_load(&jobs, 4096) == 0;
	if (ok)
		free(jobs);
	make_record(record, ID_DONE, "completed", 0, "null");
	ok = ok && journal_write(ID_DONE, record);
	snprintf(record, sizeof(record),
			 "{\"request_id\":\"%s\",\"service\":\"exits\",\"requested_by\":null,"
			 "\"requested_at\":\"2026-11-26T06:00:00Z\",\"status\":\"running\","
			 "\"accepted_at\":\"2026-11-26T06:00:01.000000Z\",\"started_at\":\"2026-11-26T06:00:01.000000Z\","
			 "\"finished_at\":null,\"exit_code\":null,\"signal\":null,\"steps\":[],"
			 "\"output\":\"\",\"output_truncated\":false,\"error\":null}", ID_LEFT);
	ok = ok && journal_write(ID_LEFT, record);
	journal_close();
	assert_true(ok);
}

/*
 * Start the job table on c (its state_dir from make_left_running_state())
 * with the fail_at-th allocation failing (0: none), as the agent does at
 * start, and stop it again.  Returns the allocations made; *started tells
 * whether it started, *reported receives, if it did, the job left running
 * as the agent then reported it (a new reference), errbuf why it did not.
 */
static int
left_running_start(agent_config *c, int fail_at, bool *started, json_t **reported,
				   char *errbuf, size_t errsize)
{
	int			made;

	errbuf[0] = '\0';
	*reported = NULL;
	nomem_arm(fail_at);
	*started = jobs_init(c, errbuf, errsize);
	made = nomem_disarm();
	if (*started && !jobs_lookup(ID_LEFT, 0, reported))
		*reported = NULL;
	jobs_cleanup();
	return made;
}

/*
 * Read back the record of the job left running in the journal of
 * state_dir, as its last record says (a new reference; NULL if none or if
 * the journal cannot be read).
 */
static json_t *
left_running_on_disk(const char *state_dir)
{
	char		err[256];
	job		  **jobs;
	json_t	   *obj = NULL;
	int			n;

	if (!journal_open(state_dir, err, sizeof(err)))
		return NULL;
	n = journal_load(&jobs, 4096);
	for (int i = 0; i < n; i++)
	{
		if (strcmp(jobs[i]->id, ID_LEFT) == 0)
			obj = report_job(jobs[i], jobs[i]->status);
		job_free(jobs[i]);
	}
	if (n >= 0)
		free(jobs);
	journal_close();
	return obj;
}

/*
 * Tell whether a job object is the job left running, failed with the
 * error of an interrupted job.
 */
static bool
is_left_failed(json_t *obj)
{
	const char *status = json_string_value(json_object_get(obj, "status"));
	const char *error = json_string_value(json_object_get(obj, "error"));

	return status != NULL && strcmp(status, "failed") == 0 && error != NULL &&
		strcmp(error, LEFT_ERROR) == 0 && json_is_string(json_object_get(obj, "finished_at"));
}

/*
 * Check one start of test_interrupted_job_journaled(): write what is wrong
 * into bad (empty if nothing).
 */
static void
check_left_running(const char *state_dir, int fail_at, bool started, json_t *reported,
				   const char *why, char *bad, size_t size)
{
	json_t	   *disk = left_running_on_disk(state_dir);
	char	   *rtext = reported ? json_dumps(reported, JSON_COMPACT) : NULL;
	char	   *dtext = disk ? json_dumps(disk, JSON_COMPACT) : NULL;

	bad[0] = '\0';
	if (started && !is_left_failed(reported))
		snprintf(bad, size, "allocation %d failed: the agent started, the job left running is %s",
				 fail_at, rtext ? rtext : "unknown");
	else if (started && !(is_left_failed(disk) &&
						   json_equal(json_object_get(disk, "finished_at"),
									  json_object_get(reported, "finished_at"))))
		snprintf(bad, size, "allocation %d failed: the agent reported the job left running as %s, "
				 "but its journal says %s", fail_at, rtext, dtext ? dtext : "nothing");
	else if (!started && why[0] == '\0')
		snprintf(bad, size, "allocation %d failed: the agent did not start, and says not why", fail_at);
	free(rtext);
	free(dtext);
	json_decref(disk);
}

/*
 * Runs after the agent has stopped.  A job left running by an agent that
 * died is failed at the next start ("agent restarted during the job"), and
 * that is journaled before it is reported: whichever allocation fails
 * while the agent starts, either it does not start (and says why; the
 * next start, with nothing failing, fails the job), or it reports the job
 * failed and its journal says the same, with the same end.  Reported
 * failed while the journal still said running, the job would end anew at
 * the next start.
 */
static void
test_interrupted_job_journaled(void **state)
{
	char		bad[4096] = "";
	char		why[512];
	char		state_dir[128];
	agent_config c = *cfg;
	int			refused = 0;
	int			n;

	(void) state;
	stop_agent();
	c.state_dir = state_dir;
	for (n = 0; bad[0] == '\0' && n <= NOMEM_MAX_RUNS; n++)
	{
		json_t	   *reported;
		bool		started;
		int			made;

		snprintf(state_dir, sizeof(state_dir), "%s/left%d", dir, n);
		quiet(true);
		make_left_running_state(state_dir);
		made = left_running_start(&c, n, &started, &reported, why, sizeof(why));
		check_left_running(state_dir, n, started, reported, why, bad, sizeof(bad));
		json_decref(reported);
		if (bad[0] == '\0' && !started)
		{
			refused++;
			left_running_start(&c, 0, &started, &reported, why, sizeof(why));
			check_left_running(state_dir, n, started, reported, why, bad, sizeof(bad));
			if (bad[0] == '\0' && !started)
				snprintf(bad, sizeof(bad), "allocation %d failed: the next start, with none failing, "
						 "did not start either: %s", n, why);
			json_decref(reported);
		}
		quiet(false);
		if (bad[0] == '\0' && n == 0 && !started)
			snprintf(bad, sizeof(bad), "with no allocation failing, the agent did not start: %s", why);
		if (n > 0 && made < n)
			break;
	}
	if (bad[0] != '\0')
		fail_msg("%s (the agent's log is in %s/agent.log)", bad, dir);
	if (n < 10 || n > NOMEM_MAX_RUNS)
		fail_msg("a start made %d allocations or more: are they wrapped?", n - 1);
	if (refused == 0)
		fail_msg("no start was refused: did no allocation fail?");
}

/*
 * Write the configuration and the secrets, and start the job table on a
 * state directory of a temporary directory (on tmpfs if there is one: the
 * sweeps journal hundreds of jobs), and the HTTP server on a unix socket
 * in it.
 */
/*
 * Have OpenSSL set up what it does once per process and never again, with
 * nothing failing: its providers, and the HMAC and SHA-256 methods the
 * signature check fetches.
 */
static bool
warm_up_openssl(void)
{
	EVP_MAC    *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
	EVP_MD	   *md = EVP_MD_fetch(NULL, "SHA256", NULL);
	bool		ok = mac != NULL && md != NULL;

	EVP_MAC_free(mac);
	EVP_MD_free(md);
	return ok;
}

static int
setup(void **state)
{
	char		path[128];
	char		err[1024] = "";
	FILE	   *f;

	(void) state;
	saved_stderr = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
	snprintf(dir, sizeof(dir), "%s/test_nomem.XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
	if (saved_stderr < 0 || mkdtemp(dir) == NULL)
		return -1;
	snprintf(second, sizeof(second), "%s/second", dir);
	snprintf(envfile, sizeof(envfile), "%s/env", dir);
	snprintf(path, sizeof(path), "%s/state", dir);
	if (mkdir(path, 0700) != 0)
		return -1;
	snprintf(path, sizeof(path), "%s/secrets", dir);
	if ((f = fopen(path, "w")) == NULL)
		return -1;
	fputs("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n", f);
	fchmod(fileno(f), 0600);
	fclose(f);
	snprintf(path, sizeof(path), "%s/agent.conf", dir);
	if ((f = fopen(path, "w")) == NULL)
		return -1;
	fprintf(f,
			"listen = \"unix:%s/sock\";\n"
			"secrets_file = \"secrets\";\n"
			"state_dir = \"%s/state\";\n"
			"limits = { retention_max_jobs = 100000; };\n"
			"services = {\n"
			"  exits = ( { argv = [\"/bin/sh\", \"-c\", \"echo \\\"A=$A PATH=$PATH LANG=$LANG \"\n"
			"                        \"ID=$RESTART_AGENT_REQUEST_ID SVC=$RESTART_AGENT_SERVICE\\\" >> %s; \"\n"
			"                        \"echo failing; exit 3\"]; env = { A = \"configured\"; }; },\n"
			"            { argv = [\"/bin/sh\", \"-c\", \"echo ran >> %s\"]; } );\n"
			"  missing = ( { argv = [\"%s/no-such-program\"]; },\n"
			"              { argv = [\"/bin/sh\", \"-c\", \"echo ran >> %s\"]; } );\n"
			"};\n",
			dir, dir, envfile, second, dir, second);
	fclose(f);
	util_json_init();
	quiet(true);
	cfg = config_load(path, err, sizeof(err));

	/*
	 * OpenSSL's one-time set-up (its providers, HMAC and SHA-256) is done
	 * here, before anything fails: it is not retried.  The agent's HMAC
	 * template is made by the first signature of a test.
	 */
	if (cfg == NULL || !warm_up_openssl() ||
		!spawn_init() || !jobs_init(cfg, err, sizeof(err)) || !http_start(cfg, err, sizeof(err)))
	{
		quiet(false);
		fprintf(stderr, "setup: %s\n", err);
		return -1;
	}
	quiet(false);
	return 0;
}

/* Stop the job table and the HTTP server, and remove the temporary directory. */
static int
teardown(void **state)
{
	(void) state;
	stop_agent();
	config_free(cfg);
	return nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

int
main(void)
{
	const struct CMUnitTest first[] = {
		cmocka_unit_test(test_verify_template_retried),
	};
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_step_exit_code),
		cmocka_unit_test(test_step_cannot_start),
		cmocka_unit_test(test_get_job),
		cmocka_unit_test(test_post_job),
		cmocka_unit_test(test_journal_reads_back),
		cmocka_unit_test(test_journal_load),
		cmocka_unit_test(test_prune_keeps_job),
		cmocka_unit_test(test_interrupted_job_journaled),
	};

	if (!CRYPTO_set_mem_functions(nomem_crypto_malloc, nomem_crypto_realloc, nomem_crypto_free))
	{
		fprintf(stderr, "OpenSSL allocated before its allocator could be set\n");
		return 1;
	}
	if (cmocka_run_group_tests_name("nomem: the HMAC template", first, NULL, NULL) != 0)
		return 1;
	return cmocka_run_group_tests_name("nomem", tests, setup, teardown);
}
