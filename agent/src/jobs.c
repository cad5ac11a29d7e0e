/*-------------------------------------------------------------------------
 *
 * jobs.c
 *	  The job table: idempotent submission, limits, the runner threads,
 *	  long-poll waits and retention.
 *
 * All jobs known to the agent (running and retained finished ones) are in
 * one list protected by jobs_lock.  A job is journaled before its runner
 * thread starts, and its final state is journaled before it becomes
 * visible, so what a client saw is what survives a crash.  At most one job
 * per service runs at a time and at most max_jobs overall.
 *
 * Journal writes (each one or more fsyncs) are done without jobs_lock, so
 * that concurrent requests share the journal's directory flushes (see
 * journal.c).  A new job is first reserved in the list under the lock,
 * marked journaling: a request or lookup of its id, or a request of its
 * service, waits until its accept record is on disk (or the write failed
 * and the reservation is gone), so an id is accepted at most once and
 * nobody learns of a job that is not yet durable.  Only the accept record
 * and the final state are journaled: after a crash a running job is
 * reported failed whatever its steps did, so the end of a step needs no
 * record of its own.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"

#define JOBS_RETRY_FIRST_MSEC 100
#define JOBS_RETRY_MAX_MSEC 5000
#define JOBS_RETRY_WHEN_STOPPING 3

static pthread_mutex_t jobs_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t jobs_cond;
static const agent_config *jobs_cfg;
static job *jobs_head;
static int	jobs_running;
static bool jobs_stopping;

/*
 * Name of a job status as used in the protocol.
 */
const char *
job_status_name(job_status st)
{
	switch (st)
	{
		case JOB_RUNNING:
			return "running";
		case JOB_COMPLETED:
			return "completed";
		case JOB_FAILED:
			return "failed";
	}
	return "failed";
}

/*
 * Allocate an empty job with an output tail of the given size.
 */
job *
job_alloc(size_t output_tail)
{
	job		   *j = calloc(1, sizeof(job));

	if (j == NULL)
		return NULL;
	if (!tail_init(&j->output, output_tail))
	{
		free(j);
		return NULL;
	}
	j->exit_code = -1;
	return j;
}

/*
 * Free a job and everything it owns.
 */
void
job_free(job *j)
{
	if (j == NULL)
		return;
	for (int i = 0; i < j->nsteps; i++)
		json_decref(j->steps[i].argv);
	free(j->steps);
	free(j->error);
	tail_free(&j->output);
	free(j);
}

/*
 * Find a job by request id; caller holds jobs_lock.
 */
static job *
jobs_find(const char *id)
{
	for (job *j = jobs_head; j; j = j->next)
		if (strcmp(j->id, id) == 0)
			return j;
	return NULL;
}

/*
 * Append a job at the end of the list (oldest first); caller holds the
 * lock.
 */
static void
jobs_append(job *j)
{
	job		  **p = &jobs_head;

	while (*p)
		p = &(*p)->next;
	j->next = NULL;
	*p = j;
}

/*
 * Render a job as its journal record (caller frees; NULL when out of
 * memory); caller holds the lock.  The status is passed explicitly
 * because the final state is written before it is made visible.
 */
static char *
jobs_render(const job *j, job_status status)
{
	json_t	   *obj = report_job(j, status);
	char	   *text = obj ? json_dumps(obj, JSON_COMPACT) : NULL;

	json_decref(obj);
	return text;
}

/*
 * Render a job and write it to the journal; caller holds the lock (only
 * at start-up and on rare failure paths: the journal write is slow).
 */
static bool
jobs_journal(const job *j, job_status status)
{
	char	   *text = jobs_render(j, status);
	bool		ok = text != NULL && journal_write(j->id, text);

	if (!ok)
		log_msg("ERROR: job %s: its state could not be journaled", j->id);
	free(text);
	return ok;
}

/*
 * Tell whether the agent is shutting down.
 */
static bool
jobs_is_stopping(void)
{
	bool		stopping;

	pthread_mutex_lock(&jobs_lock);
	stopping = jobs_stopping;
	pthread_mutex_unlock(&jobs_lock);
	return stopping;
}

/*
 * Write a runner's record of its job until it is on disk, retrying with a
 * growing pause (a full disk may be freed); called without the lock, by
 * the job's runner, the only writer of a running job's record.  Gives up
 * only when the agent is shutting down: the record on disk then still says
 * "running", which the next start reports as failed.
 */
static bool
jobs_write_retry(const char *id, const char *text)
{
	int			pause = JOBS_RETRY_FIRST_MSEC;
	int			after_stop = 0;

	while (text == NULL || !journal_write(id, text))
	{
		if (jobs_is_stopping() && ++after_stop > JOBS_RETRY_WHEN_STOPPING)
		{
			log_msg("ERROR: job %s: giving up journaling its final state (shutting down)", id);
			return false;
		}
		log_msg("ERROR: job %s: cannot journal its final state, retrying in %d ms", id, pause);
		usleep((useconds_t) pause * 1000);
		pause = pause * 2 > JOBS_RETRY_MAX_MSEC ? JOBS_RETRY_MAX_MSEC : pause * 2;
	}
	return true;
}

/*
 * Drop finished jobs older than the retention period, then the oldest
 * finished jobs beyond the retained count, from memory and disk.  Caller
 * holds the lock.
 */
static void
jobs_prune(void)
{
	int64_t		cutoff = util_now_usec() - (int64_t) jobs_cfg->retention_days * 86400 * 1000000;
	int			finished = 0;
	job		  **p;

	for (job *j = jobs_head; j; j = j->next)
		finished += (j->status != JOB_RUNNING);
	p = &jobs_head;
	while (*p)
	{
		job		   *j = *p;

		if (j->status != JOB_RUNNING &&
			(j->finished_at < cutoff || finished > jobs_cfg->retention_max_jobs))
		{
			*p = j->next;
			finished--;
			journal_remove(j->id);
			log_msg("job %s: pruned from the journal", j->id);
			job_free(j);
			continue;
		}
		p = &j->next;
	}
}

/*
 * Order jobs by acceptance time, for qsort.
 */
static int
jobs_cmp_accepted(const void *a, const void *b)
{
	const job  *ja = *(job *const *) a;
	const job  *jb = *(job *const *) b;

	return (ja->accepted_at > jb->accepted_at) - (ja->accepted_at < jb->accepted_at);
}

/*
 * Mark a job found running at start-up as failed: its agent died, and it
 * must never run again.
 */
static void
jobs_fail_interrupted(job *j)
{
	j->status = JOB_FAILED;
	j->finished_at = util_now_usec();
	free(j->error);
	j->error = strdup("agent restarted during the job");
	jobs_journal(j, JOB_FAILED);
	log_msg("job %s: failed (agent restarted during the job)", j->id);
}

/*
 * Open the journal, load its jobs (failing those left running), and prune.
 */
bool
jobs_init(const agent_config *cfg, char *errbuf, size_t errsize)
{
	pthread_condattr_t attr;
	job		  **jobs;
	int			n;

	jobs_cfg = cfg;
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&jobs_cond, &attr);
	pthread_condattr_destroy(&attr);
	if (!journal_open(cfg->state_dir, errbuf, errsize))
		return false;
	if ((n = journal_load(&jobs, cfg->output_tail)) < 0)
	{
		snprintf(errbuf, errsize, "cannot read the journal in \"%s/jobs\"", cfg->state_dir);
		return false;
	}
	if (n > 0)
		qsort(jobs, n, sizeof(job *), jobs_cmp_accepted);
	pthread_mutex_lock(&jobs_lock);
	for (int i = 0; i < n; i++)
	{
		if (jobs[i]->status == JOB_RUNNING)
			jobs_fail_interrupted(jobs[i]);
		jobs_append(jobs[i]);
	}
	jobs_prune();
	pthread_mutex_unlock(&jobs_lock);
	free(jobs);
	log_msg("journal: %d job records loaded from %s/jobs", n, cfg->state_dir);
	return true;
}

/*
 * Output callback of spawn_run(): append to the job's bounded tail.
 */
static void
jobs_output(void *arg, const char *data, size_t len)
{
	job		   *j = arg;

	pthread_mutex_lock(&jobs_lock);
	tail_append(&j->output, data, len);
	pthread_mutex_unlock(&jobs_lock);
}

/*
 * Describe why a step failed, or return NULL if it succeeded.  The text
 * becomes the job's error.
 */
static char *
jobs_step_error(int n, const config_step *step, const spawn_result *res)
{
	char		buf[512];

	if (res->spawn_errno != 0)
		snprintf(buf, sizeof(buf), "step %d could not start %s: %s", n, step->argv[0],
				 strerror(res->spawn_errno));
	else if (res->interrupted)
		snprintf(buf, sizeof(buf), "step %d interrupted: the agent was stopped during the job", n);
	else if (res->timed_out)
		snprintf(buf, sizeof(buf), "step %d timed out after %d s", n, step->timeout);
	else if (res->signal != 0)
		snprintf(buf, sizeof(buf), "step %d was killed by signal %d (SIG%s)", n, res->signal,
				 sigabbrev_np(res->signal) ? sigabbrev_np(res->signal) : "?");
	else if (res->exit_code != 0)
		snprintf(buf, sizeof(buf), "step %d exited with code %d", n, res->exit_code);
	else
		return NULL;
	return strdup(buf);
}

/*
 * Record the start of step idx: its argv, start time, and a header line
 * in the output.
 */
static void
jobs_step_begin(job *j, const config_step *step, int idx)
{
	char		head[512];
	size_t		len;

	len = (size_t) snprintf(head, sizeof(head), "==> step %d: %s\n", idx + 1, step->argv[0]);
	pthread_mutex_lock(&jobs_lock);
	j->steps[idx].argv = json_incref(step->argv_json);
	j->steps[idx].started_at = util_now_usec();
	j->steps[idx].exit_code = -1;
	j->nsteps = idx + 1;
	tail_append(&j->output, head, len < sizeof(head) ? len : sizeof(head) - 1);
	pthread_mutex_unlock(&jobs_lock);
	log_msg("job %s: step %d/%d started: %s", j->id, idx + 1, j->svc->nsteps, step->argv[0]);
}

/*
 * Record the end of step idx in memory; returns false if the step failed
 * (the job's error is then set).  Nothing is journaled here: the final
 * state is, by jobs_finish(), and a crash before it fails the job anyway.
 */
static bool
jobs_step_end(job *j, const config_step *step, int idx, const spawn_result *res)
{
	char	   *err = jobs_step_error(idx + 1, step, res);

	pthread_mutex_lock(&jobs_lock);
	j->steps[idx].finished_at = util_now_usec();
	j->steps[idx].exit_code = res->exit_code;
	j->steps[idx].signal = res->signal;
	j->steps[idx].timed_out = res->timed_out;
	j->exit_code = res->exit_code;
	j->signal = res->signal;
	j->error = err;
	pthread_mutex_unlock(&jobs_lock);
	if (err)
		log_msg("job %s: step %d/%d failed: %s", j->id, idx + 1, j->svc->nsteps, err);
	else
		log_msg("job %s: step %d/%d finished with exit code 0", j->id, idx + 1, j->svc->nsteps);
	return err == NULL;
}

/*
 * Journal the final state (retrying until it is on disk), then make it
 * visible, wake long-poll waiters and prune old jobs.  Until then clients
 * see the job running.
 */
static void
jobs_finish(job *j, job_status final)
{
	int64_t		finished_at = util_now_usec();
	char	   *text;

	pthread_mutex_lock(&jobs_lock);
	j->finished_at = finished_at;
	text = jobs_render(j, final);
	j->finished_at = 0;
	pthread_mutex_unlock(&jobs_lock);
	jobs_write_retry(j->id, text);
	free(text);
	pthread_mutex_lock(&jobs_lock);
	j->finished_at = finished_at;
	j->status = final;
	log_msg("job %s: %s%s%s", j->id, job_status_name(final),
			j->error ? ": " : "", j->error ? j->error : "");
	jobs_running--;
	pthread_cond_broadcast(&jobs_cond);
	jobs_prune();
	pthread_mutex_unlock(&jobs_lock);
}

/*
 * Check, before step idx starts, that the agent is not shutting down; if
 * it is, the job fails without starting the step.
 */
static bool
jobs_may_start_step(job *j, int idx)
{
	char		buf[128];
	bool		stopping;

	pthread_mutex_lock(&jobs_lock);
	stopping = jobs_stopping;
	if (stopping)
	{
		snprintf(buf, sizeof(buf),
				 "interrupted before step %d: the agent was stopped during the job", idx + 1);
		free(j->error);
		j->error = strdup(buf);
	}
	pthread_mutex_unlock(&jobs_lock);
	if (stopping)
		log_msg("job %s: %s", j->id, j->error ? j->error : "interrupted");
	return !stopping;
}

/*
 * Runner thread: run the service's steps in order, stopping at the first
 * failure.
 */
static void *
jobs_runner(void *arg)
{
	job		   *j = arg;
	const config_service *svc = j->svc;
	bool		ok = true;

	log_msg("job %s: running service %s (%d steps)", j->id, svc->name, svc->nsteps);
	for (int i = 0; i < svc->nsteps && ok; i++)
	{
		spawn_result res;

		if (!jobs_may_start_step(j, i))
		{
			ok = false;
			break;
		}
		jobs_step_begin(j, &svc->steps[i], i);
		spawn_run(&svc->steps[i], j->id, svc->name, jobs_cfg->kill_grace,
				  jobs_output, j, &res);
		ok = jobs_step_end(j, &svc->steps[i], i, &res);
	}
	jobs_finish(j, ok ? JOB_COMPLETED : JOB_FAILED);
	return NULL;
}

/*
 * Check whether a request repeats the fields a job was created with.  A
 * stand-in for an unreadable journal record matches any request of its
 * id: its fields are unknown, and what matters is that it never runs
 * again.
 */
static bool
jobs_same_request(const job *j, const restart_request *req)
{
	if (j->unreadable)
		return true;
	return strcmp(j->service, req->service) == 0 &&
		strcmp(j->requested_at, req->requested_at) == 0 &&
		j->has_requested_by == req->has_requested_by &&
		(!j->has_requested_by || strcmp(j->requested_by, req->requested_by) == 0);
}

/*
 * Tell whether a job of the service is running; caller holds the lock.
 */
static bool
jobs_service_busy(const char *service)
{
	for (job *j = jobs_head; j; j = j->next)
		if (j->status == JOB_RUNNING && strcmp(j->service, service) == 0)
			return true;
	return false;
}

/*
 * Tell whether a request must wait before it is decided: a job of its id,
 * or a running job of its service, is reserved but not yet journaled.
 * Caller holds the lock.
 */
static bool
jobs_must_wait(const restart_request *req)
{
	for (job *j = jobs_head; j; j = j->next)
		if (j->journaling &&
			(strcmp(j->id, req->request_id) == 0 || strcmp(j->service, req->service) == 0))
			return true;
	return false;
}

/*
 * Reserve a job for a new request: add it to the list, running and marked
 * journaling, so that its id, its service and a max_jobs slot are taken
 * while its accept record is written without the lock.  Caller holds the
 * lock.  Returns NULL when out of memory.
 */
static job *
jobs_reserve(const restart_request *req, const config_service *svc)
{
	job		   *j = job_alloc(jobs_cfg->output_tail);

	if (j == NULL || (j->steps = calloc(svc->nsteps, sizeof(job_step))) == NULL)
	{
		job_free(j);
		return NULL;
	}
	memcpy(j->id, req->request_id, sizeof(j->id));
	memcpy(j->service, req->service, sizeof(j->service));
	j->has_requested_by = req->has_requested_by;
	memcpy(j->requested_by, req->requested_by, sizeof(j->requested_by));
	memcpy(j->requested_at, req->requested_at, sizeof(j->requested_at));
	j->svc = svc;
	j->status = JOB_RUNNING;
	j->accepted_at = j->started_at = util_now_usec();
	j->journaling = true;
	jobs_append(j);
	jobs_running++;
	return j;
}

/*
 * Remove a reserved job whose accept record could not be written; caller
 * holds the lock.  Nothing of it ran.
 */
static void
jobs_unreserve(job *j)
{
	job		  **p = &jobs_head;

	while (*p != j)
		p = &(*p)->next;
	*p = j->next;
	jobs_running--;
	job_free(j);
}

/*
 * Start the runner thread of a job whose accept record is on disk; caller
 * holds the lock.  If no thread can be started the job fails at once.
 */
static void
jobs_start(job *j)
{
	pthread_attr_t attr;
	pthread_t	tid;

	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&tid, &attr, jobs_runner, j) != 0)
	{
		j->error = strdup("agent could not start a runner thread");
		j->finished_at = util_now_usec();
		jobs_journal(j, JOB_FAILED);
		j->status = JOB_FAILED;
		jobs_running--;
	}
	pthread_attr_destroy(&attr);
}

/*
 * Create, journal and start a job for a new request; called with the lock
 * held, which it releases while the accept record is written (the job is
 * reserved meanwhile, see jobs_reserve) and holds again on return.
 * Returns NULL if the journal write failed (nothing runs then).
 */
static job *
jobs_create(const restart_request *req, const config_service *svc)
{
	job		   *j = jobs_reserve(req, svc);
	char	   *text;
	bool		ok;

	if (j == NULL)
		return NULL;
	text = jobs_render(j, JOB_RUNNING);
	pthread_mutex_unlock(&jobs_lock);
	ok = text != NULL && journal_write(j->id, text);
	free(text);
	pthread_mutex_lock(&jobs_lock);
	j->journaling = false;
	pthread_cond_broadcast(&jobs_cond);
	if (!ok)
	{
		log_msg("ERROR: job %s: its state could not be journaled", j->id);
		jobs_unreserve(j);
		return NULL;
	}
	jobs_start(j);
	return j;
}

/*
 * Handle a verified, parsed restart request: answer an existing id from
 * the table (idempotency), or check the service and the limits and start
 * a new job.  A request that depends on a job still being journaled (same
 * id or same service) waits for that first.  *report receives the job
 * object when there is one.
 */
jobs_submit_result
jobs_submit(const restart_request *req, json_t **report)
{
	jobs_submit_result res;
	const config_service *svc;
	job		   *j;

	*report = NULL;
	pthread_mutex_lock(&jobs_lock);
	while (jobs_must_wait(req))
		pthread_cond_wait(&jobs_cond, &jobs_lock);
	if ((j = jobs_find(req->request_id)) != NULL)
		res = jobs_same_request(j, req) ? JOBS_EXISTS : JOBS_CONFLICT;
	else if (jobs_stopping)
		res = JOBS_INTERNAL_ERROR;
	else if ((svc = config_find_service(jobs_cfg, req->service)) == NULL)
		res = JOBS_UNKNOWN_SERVICE;
	else if (jobs_service_busy(req->service))
		res = JOBS_SERVICE_BUSY;
	else if (jobs_running >= jobs_cfg->max_jobs)
		res = JOBS_TOO_MANY;
	else if ((j = jobs_create(req, svc)) == NULL)
		res = JOBS_INTERNAL_ERROR;
	else
	{
		res = JOBS_ACCEPTED;
		log_msg("job %s: accepted for service %s", j->id, j->service);
	}
	if (j != NULL && res != JOBS_CONFLICT)
		*report = report_job(j, j->status);
	pthread_mutex_unlock(&jobs_lock);
	return res;
}

/*
 * Return the job object of id in *report, after waiting up to
 * wait_seconds for it to finish (long poll).  Returns false if the agent
 * has no record of the id.  A job still being journaled is waited for
 * first (it may yet be refused).
 */
bool
jobs_lookup(const char *id, int wait_seconds, json_t **report)
{
	struct timespec deadline;
	job		   *j;

	clock_gettime(CLOCK_MONOTONIC, &deadline);
	deadline.tv_sec += wait_seconds;
	*report = NULL;
	pthread_mutex_lock(&jobs_lock);
	while ((j = jobs_find(id)) != NULL && j->journaling)
		pthread_cond_wait(&jobs_cond, &jobs_lock);
	if (j != NULL && j->status == JOB_RUNNING && wait_seconds > 0 && !jobs_stopping)
		log_msg("job %s: a long poll waits up to %d s for it to finish", id, wait_seconds);
	while (j != NULL && j->status == JOB_RUNNING && wait_seconds > 0 && !jobs_stopping)
	{
		int			rc = pthread_cond_timedwait(&jobs_cond, &jobs_lock, &deadline);

		j = jobs_find(id);
		if (rc == ETIMEDOUT)
			break;
	}
	if (j != NULL)
		*report = report_job(j, j->status);
	pthread_mutex_unlock(&jobs_lock);
	return j != NULL;
}

/*
 * Stop for shutdown: refuse new jobs, wake long polls, interrupt running
 * steps and wait until every runner has journaled its final state.
 */
void
jobs_shutdown(void)
{
	pthread_mutex_lock(&jobs_lock);
	jobs_stopping = true;
	pthread_cond_broadcast(&jobs_cond);
	if (jobs_running > 0)
		log_msg("stopping %d running job(s)", jobs_running);
	spawn_request_stop();
	while (jobs_running > 0)
		pthread_cond_wait(&jobs_cond, &jobs_lock);
	pthread_mutex_unlock(&jobs_lock);
}

/*
 * Free the job table and close the journal, after jobs_shutdown().
 */
void
jobs_cleanup(void)
{
	pthread_mutex_lock(&jobs_lock);
	while (jobs_head)
	{
		job		   *j = jobs_head;

		jobs_head = j->next;
		job_free(j);
	}
	pthread_mutex_unlock(&jobs_lock);
	journal_close();
}
