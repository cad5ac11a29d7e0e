/*-------------------------------------------------------------------------
 *
 * jobs.c
 *	  The job table: idempotent submission, limits, the runner threads,
 *	  long-poll waits and retention.
 *
 * A job is journaled before its runner thread starts, and its final state
 * is journaled before it becomes visible, so what a client saw is what
 * survives a crash.  At most one job per service runs at a time and at
 * most max_jobs overall.
 *
 * All jobs known to the agent (running and retained finished ones) are
 * indexed under jobs_lock so that neither a request nor the end of a job
 * costs time in proportion to the number of jobs or services:
 *
 * - jobs_by_id, a binary search tree (POSIX tsearch; glibc balances it)
 *	 of every job keyed by its request id: O(log n) in the worst case,
 *	 whatever ids clients choose, with no rehash pauses under the lock
 *	 however many jobs are retained;
 * - jobs_busy, the running job of each configured service (indexed like
 *	 the configuration's services array; NULL when the service is free).
 *	 Jobs loaded from the journal have no service (svc == NULL) and are all
 *	 finished once start-up is over, so they never make a service busy;
 * - the finished jobs in a FIFO (jobs_done_head .. jobs_done_tail, linked
 *	 by next) in the order they finished, and their count jobs_done.
 *	 Retention pruning removes jobs from the oldest end only: those past
 *	 retention_days, then the oldest beyond retention_max_jobs that
 *	 finished more than retention_min_age seconds ago.  Running
 *	 jobs are never in it, so never pruned.  (The FIFO is in the order
 *	 jobs became finished, and a job's finished_at is taken just before
 *	 its final state is journaled, so the two orders may differ by the
 *	 time of a journal write, or by a step of the system clock: an expired
 *	 job queued behind one that is not is pruned once that one is.)
 *
 * A running job is in jobs_by_id and jobs_busy, a finished one in
 * jobs_by_id and the FIFO.
 *
 * Long polls wait on one of JOBS_POLL_CONDS condition variables chosen by
 * a hash of their job's id, and the end of a job wakes only that one: with
 * one shared condition variable every job end would wake every long poll
 * (the restart_worker keeps dozens in flight).  There are many more of
 * them than long polls usually wait (up to 64 connections of a worker),
 * so that the end of a job seldom wakes a long poll of another job.
 * Waits for a journaling job, and for the end of the runners at shutdown,
 * use jobs_cond.
 *
 * A job runs in a runner thread, or, when its POST waits for its end
 * (?wait), first in that request's own thread: until the job is over or
 * the wait has passed, after which what remains of it (a step still
 * running, the next steps, writing its end) is handed to a runner
 * (jobs_run_here()).  Quick jobs thus never change threads, which
 * spares a busy agent two thread switches a job.  When no runner thread
 * can be started (the agent's threads or processes are at their limit),
 * the job goes on to its end in the thread of its request, whose answer
 * waits meanwhile: a job is never failed for want of a thread, nor its
 * end kept from the journal's rules below.  Runner threads are kept
 * for the next job: a runner whose job ended waits up to
 * JOBS_RUNNER_IDLE_SEC for another one (handed over through jobs_handoff)
 * before it exits, so that a busy agent does not create, and tear down
 * with its stack, a thread per job.
 *
 * Journal writes (each waits for an fdatasync) are done without jobs_lock,
 * so that concurrent requests share the journal's flushes (group commit,
 * see journal.c).  A new job is first reserved (indexed) under the lock,
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
#include <search.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"

#define JOBS_RETRY_FIRST_MSEC 100
#define JOBS_RETRY_MAX_MSEC 5000
#define JOBS_RETRY_WHEN_STOPPING 3
#define JOBS_POLL_CONDS 1024
#define JOBS_RUNNER_IDLE_SEC 60

/* How far jobs_write_final() got. */
typedef enum jobs_final
{
	JOBS_FINAL_DURABLE,			/* the final record is on disk */
	JOBS_FINAL_ABANDONED,		/* given up: the agent is shutting down */
	JOBS_FINAL_LATER			/* not yet: the caller's time ran out */
} jobs_final;

static pthread_mutex_t jobs_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t jobs_cond;
static pthread_cond_t jobs_poll_conds[JOBS_POLL_CONDS];
static pthread_cond_t jobs_runner_cond;	/* idle runners wait here */
static job *jobs_handoff_head;	/* jobs waiting for an idle runner, by next */
static job *jobs_handoff_tail;
static int	jobs_handoff_n;
static int	jobs_idle_runners;
static const agent_config *jobs_cfg;
static void *jobs_by_id;		/* tsearch tree of every job's id */
static job **jobs_busy;			/* running job of each service, or NULL */
static job *jobs_done_head;		/* finished jobs, oldest first */
static job *jobs_done_tail;
static int	jobs_done;			/* length of that FIFO */
static int	jobs_running;
static bool jobs_stopping;
static bool jobs_runners_done;	/* stopping, and every runner has ended */

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
 * Compare two request ids, for the tsearch tree (its keys are the id
 * arrays of the jobs, so a lookup needs no job, only an id).
 */
static int
jobs_cmp_id(const void *a, const void *b)
{
	return strcmp((const char *) a, (const char *) b);
}

/*
 * Return the job whose id array is the given tree key.
 */
static job *
jobs_of_key(const void *key)
{
	return (job *) ((const char *) key - offsetof(job, id));
}

/*
 * Find a job by request id; caller holds jobs_lock.
 */
static job *
jobs_find(const char *id)
{
	void	  **node = tfind(id, &jobs_by_id, jobs_cmp_id);

	return node ? jobs_of_key(*node) : NULL;
}

/*
 * Add a job to the id index; caller holds the lock.  Returns false when
 * out of memory or when a job of that id is already there (the index is
 * then unchanged).
 */
static bool
jobs_index(job *j)
{
	void	  **node = tsearch(j->id, &jobs_by_id, jobs_cmp_id);

	return node != NULL && *node == (void *) j->id;
}

/*
 * Remove a job from the id index; caller holds the lock.
 */
static void
jobs_unindex(job *j)
{
	tdelete(j->id, &jobs_by_id, jobs_cmp_id);
}

/*
 * Return the slot of jobs_busy that holds the running job of a service.
 */
static job **
jobs_busy_slot(const config_service *svc)
{
	return &jobs_busy[svc - jobs_cfg->services];
}

/*
 * Return the condition variable on which long polls of a job id wait (an
 * FNV-1a hash of the id picks it).
 */
static pthread_cond_t *
jobs_poll_cond(const char *id)
{
	uint32_t	h = 2166136261u;

	for (const char *p = id; *p; p++)
		h = (h ^ (unsigned char) *p) * 16777619u;
	return &jobs_poll_conds[h % JOBS_POLL_CONDS];
}

/*
 * Append a finished job at the newest end of the finished FIFO; caller
 * holds the lock.
 */
static void
jobs_done_push(job *j)
{
	j->next = NULL;
	if (jobs_done_tail)
		jobs_done_tail->next = j;
	else
		jobs_done_head = j;
	jobs_done_tail = j;
	jobs_done++;
}

/*
 * Remove and return the oldest job of the finished FIFO (NULL if it is
 * empty); caller holds the lock.
 */
static job *
jobs_done_pop(void)
{
	job		   *j = jobs_done_head;

	if (j == NULL)
		return NULL;
	jobs_done_head = j->next;
	if (jobs_done_head == NULL)
		jobs_done_tail = NULL;
	j->next = NULL;
	jobs_done--;
	return j;
}

/*
 * File a job that has just finished (its status set): its service is free
 * again, and it joins the finished FIFO.  Caller holds the lock.
 */
static void
jobs_retire(job *j)
{
	if (j->svc != NULL && *jobs_busy_slot(j->svc) == j)
		*jobs_busy_slot(j->svc) = NULL;
	jobs_done_push(j);
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
	char	   *text = report_text(obj);

	json_decref(obj);
	return text;
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
 * Write the final record of a job (its state as status, ended at
 * finished_at) until it is on disk, rendering it anew at each try (memory
 * may have run short) and retrying with a growing pause (a full disk may
 * be freed); called without the lock, by the thread running the job, the
 * only writer of a running job's record.  Gives up only when the agent is
 * shutting down (JOBS_FINAL_ABANDONED): the record on disk then still says
 * "running", which the next start reports as failed.  A retry that would
 * come after the monotonic time until is left to the caller
 * (JOBS_FINAL_LATER): a request's thread hands the job to a runner then.
 */
static jobs_final
jobs_write_final(job *j, job_status status, int64_t finished_at, int64_t until)
{
	int			pause = JOBS_RETRY_FIRST_MSEC;
	int			after_stop = 0;

	for (;;)
	{
		char	   *text;
		bool		ok;

		pthread_mutex_lock(&jobs_lock);
		j->finished_at = finished_at;
		text = jobs_render(j, status);
		j->finished_at = 0;
		pthread_mutex_unlock(&jobs_lock);
		ok = text != NULL && journal_write(j->id, text);
		free(text);
		if (ok)
			return JOBS_FINAL_DURABLE;
		if (jobs_is_stopping() && ++after_stop > JOBS_RETRY_WHEN_STOPPING)
		{
			log_msg("ERROR: job %s: giving up journaling its final state (shutting down)", j->id);
			return JOBS_FINAL_ABANDONED;
		}
		log_msg("ERROR: job %s: cannot journal its final state, retrying in %d ms", j->id, pause);
		if (util_monotonic_msec() + pause >= until)
			return JOBS_FINAL_LATER;
		usleep((useconds_t) pause * 1000);
		pause = pause * 2 > JOBS_RETRY_MAX_MSEC ? JOBS_RETRY_MAX_MSEC : pause * 2;
	}
}

/*
 * Drop the oldest finished jobs, from memory and disk, while they are
 * older than the retention period, or more than the retained count and
 * finished longer than retention_min_age ago: a job younger than that is
 * kept whatever the count, so that a replayed request (its signature is
 * valid for up to ten minutes after the job was accepted) or a client's
 * retry of a request id it is still following finds the job instead of
 * starting it again.  Only the oldest end of the finished FIFO is looked
 * at, so a call costs nothing more than the jobs it drops.  A job that
 * long polls still wait for stops the pruning until they are done (the
 * last of them prunes again): they must be able to read it.  So does a
 * job whose removal from the journal cannot be queued (memory ran out):
 * dropped from memory only, its record would be kept by every compaction
 * (and the job loaded again at every start); it is kept, in memory and
 * the journal alike, and the next prune tries again.  Caller holds the
 * lock.
 */
static void
jobs_prune(void)
{
	int64_t		now = util_now_usec();
	int64_t		cutoff = now - (int64_t) jobs_cfg->retention_days * 86400 * 1000000;
	int64_t		young = now - (int64_t) jobs_cfg->retention_min_age * 1000000;

	while (jobs_done_head != NULL && jobs_done_head->waiters == 0 &&
		   (jobs_done_head->finished_at < cutoff ||
			(jobs_done > jobs_cfg->retention_max_jobs &&
			 jobs_done_head->finished_at < young)))
	{
		job		   *j = jobs_done_head;

		if (!journal_remove(j->id))
		{
			log_msg("ERROR: job %s: out of memory to prune it from the journal; kept until the next prune",
					j->id);
			return;
		}
		jobs_done_pop();
		jobs_unindex(j);
		log_msg("job %s: pruned from the journal", j->id);
		job_free(j);
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
 * Order jobs by finishing time, then acceptance time, for qsort: the
 * order of the finished FIFO at start-up.
 */
static int
jobs_cmp_finished(const void *a, const void *b)
{
	const job  *ja = *(job *const *) a;
	const job  *jb = *(job *const *) b;

	if (ja->finished_at != jb->finished_at)
		return (ja->finished_at > jb->finished_at) - (ja->finished_at < jb->finished_at);
	return jobs_cmp_accepted(a, b);
}

/*
 * Mark a job found running at start-up as failed, and journal that: its
 * agent died, and it must never run again.  The failed state is on disk
 * before any client can see it, as every final state is: if it cannot be
 * written (memory, a full disk), the job would be answered failed while
 * the journal still said running, and the next start would end it anew.
 * Returns false then, with why in errbuf: the agent refuses to start, and
 * the next start tries again.  Caller holds the lock (only at start-up:
 * the journal write is slow).
 */
static bool
jobs_fail_interrupted(job *j, char *errbuf, size_t errsize)
{
	char	   *text = NULL;
	bool		ok;
	int			err = ENOMEM;

	j->status = JOB_FAILED;
	j->finished_at = util_now_usec();
	free(j->error);
	j->error = strdup("agent restarted during the job");
	ok = j->error != NULL && (text = jobs_render(j, JOB_FAILED)) != NULL &&
		journal_write(j->id, text);
	if (!ok && text != NULL)
		err = errno;
	free(text);
	if (!ok)
	{
		log_msg("ERROR: job %s: its state could not be journaled", j->id);
		snprintf(errbuf, errsize,
				 "job %s was running when the agent stopped, and its end (failed: agent restarted during the job) "
				 "cannot be journaled: %s", j->id, strerror(err));
		return false;
	}
	log_msg("job %s: failed (agent restarted during the job)", j->id);
	return true;
}

/*
 * Index the jobs loaded from the journal, oldest accepted first, failing
 * those left running; then file them all, in the order they finished, in
 * the finished FIFO.  A second record of one id (which the journal's file
 * names rule out) is dropped, so the oldest wins.  Caller holds the lock.
 * Returns false, with why in errbuf, when out of memory or when a job left
 * running cannot be journaled as failed (the jobs not yet indexed are
 * freed).
 */
static bool
jobs_adopt(job **jobs, int n, char *errbuf, size_t errsize)
{
	int			kept = 0;

	if (n > 0)
		qsort(jobs, n, sizeof(job *), jobs_cmp_accepted);
	for (int i = 0; i < n; i++)
	{
		if (jobs[i]->status == JOB_RUNNING && !jobs_fail_interrupted(jobs[i], errbuf, errsize))
		{
			while (i < n)
				job_free(jobs[i++]);
			return false;
		}
		if (jobs_index(jobs[i]))
			jobs[kept++] = jobs[i];
		else if (jobs_find(jobs[i]->id) != NULL)
		{
			log_msg("ERROR: journal: job %s loaded twice; the second record is ignored", jobs[i]->id);
			job_free(jobs[i]);
		}
		else
		{
			snprintf(errbuf, errsize, "out of memory while loading the journal");
			while (i < n)
				job_free(jobs[i++]);
			return false;
		}
	}
	if (kept > 0)
		qsort(jobs, kept, sizeof(job *), jobs_cmp_finished);
	for (int i = 0; i < kept; i++)
		jobs_done_push(jobs[i]);
	return true;
}

/*
 * Open the journal, load its jobs (failing those left running), and prune.
 * Returns false, with why in errbuf, if the agent must not start.
 */
bool
jobs_init(const agent_config *cfg, char *errbuf, size_t errsize)
{
	pthread_condattr_t attr;
	job		  **jobs;
	int			n;
	bool		ok;

	jobs_cfg = cfg;
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&jobs_cond, &attr);
	pthread_cond_init(&jobs_runner_cond, &attr);
	for (int i = 0; i < JOBS_POLL_CONDS; i++)
		pthread_cond_init(&jobs_poll_conds[i], &attr);
	pthread_condattr_destroy(&attr);
	if ((jobs_busy = calloc(cfg->nservices, sizeof(job *))) == NULL)
	{
		snprintf(errbuf, errsize, "out of memory");
		return false;
	}
	if (!journal_open(cfg->state_dir, errbuf, errsize))
		return false;
	if ((n = journal_load(&jobs, cfg->output_tail)) < 0)
	{
		snprintf(errbuf, errsize, "cannot read the journal in \"%s\"", cfg->state_dir);
		return false;
	}
	pthread_mutex_lock(&jobs_lock);
	ok = jobs_adopt(jobs, n, errbuf, errsize);
	if (ok)
		jobs_prune();
	pthread_mutex_unlock(&jobs_lock);
	free(jobs);
	if (!ok)
		return false;
	log_msg("journal: %d job records loaded from %s", n, cfg->state_dir);
	return true;
}

/*
 * Output callback of spawn_continue(): append to the job's bounded tail.
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
 * Tell whether a step failed, and if so describe why in buf.  Whether it
 * failed is decided here, from the step's result alone: the copy of the
 * text that becomes the job's error needs memory, and a step must not be
 * taken for a success because that copy could not be made.
 */
static bool
jobs_step_failed(int n, const config_step *step, const spawn_result *res,
				 char *buf, size_t size)
{
	if (res->spawn_errno != 0)
		snprintf(buf, size, "step %d could not start %s: %s", n, step->argv[0],
				 strerror(res->spawn_errno));
	else if (res->interrupted)
		snprintf(buf, size, "step %d interrupted: the agent was stopped during the job", n);
	else if (res->timed_out)
		snprintf(buf, size, "step %d timed out after %d s", n, step->timeout);
	else if (res->signal != 0)
		snprintf(buf, size, "step %d was killed by signal %d (SIG%s)", n, res->signal,
				 sigabbrev_np(res->signal) ? sigabbrev_np(res->signal) : "?");
	else if (res->exit_code != 0)
		snprintf(buf, size, "step %d exited with code %d", n, res->exit_code);
	else
		return false;
	return true;
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
 * Record the end of step idx in memory; if the step failed, the job is
 * marked failed, which stops it, and its error set.  The error is a copy
 * made valid UTF-8 (a long program name may have been cut in the middle
 * of a character, and it goes into JSON); if memory runs out for it, the
 * job fails all the same, without the text (see report_job()).  Nothing is
 * journaled here: the final state is, by jobs_finish(), and a crash before
 * it fails the job anyway.
 */
static void
jobs_step_end(job *j, const config_step *step, int idx, const spawn_result *res)
{
	char		buf[512];
	size_t		len;
	bool		failed = jobs_step_failed(idx + 1, step, res, buf, sizeof(buf));
	char	   *err = failed ? tail_sanitize_utf8(buf, strlen(buf), &len) : NULL;

	pthread_mutex_lock(&jobs_lock);
	j->steps[idx].finished_at = util_now_usec();
	j->steps[idx].exit_code = res->exit_code;
	j->steps[idx].signal = res->signal;
	j->steps[idx].timed_out = res->timed_out;
	j->exit_code = res->exit_code;
	j->signal = res->signal;
	j->failed = failed;
	free(j->error);
	j->error = err;
	pthread_mutex_unlock(&jobs_lock);
	if (failed)
		log_msg("job %s: step %d/%d failed: %s%s", j->id, idx + 1, j->svc->nsteps,
				err ? err : buf, err ? "" : " (out of memory for the job's error)");
	else
		log_msg("job %s: step %d/%d finished with exit code 0", j->id, idx + 1, j->svc->nsteps);
}

/*
 * Journal the final state (retrying until it is on disk), then make it
 * visible, wake long-poll waiters and prune old jobs.  Until then clients
 * see the job running; if the agent gave the write up while shutting
 * down, they go on seeing it running (the next start reports it failed):
 * a final state is shown only once it is on disk.  Returns false, having
 * changed nothing, if a retry would come after the monotonic time until
 * (see jobs_write_final()).
 */
static bool
jobs_finish(job *j, job_status final, int64_t until)
{
	int64_t		finished_at = util_now_usec();
	jobs_final	written = jobs_write_final(j, final, finished_at, until);
	bool		durable = written == JOBS_FINAL_DURABLE;

	if (written == JOBS_FINAL_LATER)
		return false;
	pthread_mutex_lock(&jobs_lock);
	jobs_running--;
	if (durable)
	{
		j->finished_at = finished_at;
		j->status = final;
		log_msg("job %s: %s%s%s", j->id, job_status_name(final),
				j->error ? ": " : "", j->error ? j->error : "");
		jobs_retire(j);
		pthread_cond_broadcast(jobs_poll_cond(j->id));
		jobs_prune();
	}
	pthread_cond_broadcast(&jobs_cond);
	pthread_mutex_unlock(&jobs_lock);
	return true;
}

/*
 * Check, before step idx starts, that the agent is not shutting down; if
 * it is, the job fails without starting the step (also if memory runs out
 * for its error text).
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
		j->failed = true;
		free(j->error);
		j->error = strdup(buf);
	}
	pthread_mutex_unlock(&jobs_lock);
	if (stopping)
		log_msg("job %s: %s", j->id, buf);
	return !stopping;
}

/*
 * Run the steps of job j from where it stands, stopping at the first
 * failure (which sets j->failed), and finish the job (true).  If the
 * monotonic time until passes first, return false instead, the job left
 * where it stands for any thread to go on with: with a step running (kept
 * in j->step), before its next step, or before its final state is on
 * disk.
 */
static bool
jobs_advance(job *j, int64_t until)
{
	const config_service *svc = j->svc;

	while (!j->failed && (j->step != NULL || j->next_step < svc->nsteps))
	{
		int			idx = j->step != NULL ? j->next_step - 1 : j->next_step;
		spawn_result res;

		if (j->step == NULL)
		{
			if (util_monotonic_msec() >= until)
				return false;
			if (idx == 0)
				log_msg("job %s: running service %s (%d steps)", j->id, svc->name, svc->nsteps);
			if (!jobs_may_start_step(j, idx))
				break;
			jobs_step_begin(j, &svc->steps[idx], idx);
			j->next_step = idx + 1;
			j->step = spawn_begin(&svc->steps[idx], j->id, svc->name,
								  jobs_cfg->kill_grace, &res);
		}
		if (j->step != NULL && !spawn_continue(j->step, jobs_output, j, until, &res))
			return false;
		j->step = NULL;
		jobs_step_end(j, &svc->steps[idx], idx, &res);
	}
	if (util_monotonic_msec() >= until)
		return false;
	return jobs_finish(j, j->failed ? JOB_FAILED : JOB_COMPLETED, until);
}

/*
 * Wait, as an idle runner, for the next job handed over by jobs_hand_over():
 * up to JOBS_RUNNER_IDLE_SEC, or until the agent stops.  Returns NULL if
 * none came: the runner then exits.
 */
static job *
jobs_next_for_runner(void)
{
	struct timespec until;
	job		   *j;

	util_deadline(&until, CLOCK_MONOTONIC, JOBS_RUNNER_IDLE_SEC * 1000);
	pthread_mutex_lock(&jobs_lock);
	jobs_idle_runners++;
	while (jobs_handoff_head == NULL && !jobs_stopping &&
		   pthread_cond_timedwait(&jobs_runner_cond, &jobs_lock, &until) != ETIMEDOUT)
		;
	if ((j = jobs_handoff_head) != NULL)
	{
		jobs_handoff_head = j->next;
		if (jobs_handoff_head == NULL)
			jobs_handoff_tail = NULL;
		j->next = NULL;
		jobs_handoff_n--;
	}
	jobs_idle_runners--;
	pthread_mutex_unlock(&jobs_lock);
	return j;
}

/*
 * Runner thread: run its job, then the jobs handed over to it while it
 * stays idle for less than JOBS_RUNNER_IDLE_SEC.
 */
static void *
jobs_runner(void *arg)
{
	for (job *j = arg; j != NULL; j = jobs_next_for_runner())
		jobs_advance(j, SPAWN_FOREVER);
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
jobs_service_busy(const config_service *svc)
{
	return *jobs_busy_slot(svc) != NULL;
}

/*
 * Tell whether a request must wait before it is decided: a job of its id,
 * or the running job of its service (svc, NULL for an unknown service), is
 * reserved but not yet journaled.  Only reserved jobs are journaling, and
 * a reserved job is its service's running job.  Caller holds the lock.
 */
static bool
jobs_must_wait(const restart_request *req, const config_service *svc)
{
	job		   *j = jobs_find(req->request_id);

	if (j != NULL && j->journaling)
		return true;
	return svc != NULL && (j = *jobs_busy_slot(svc)) != NULL && j->journaling;
}

/*
 * Reserve a job for a new request: index it, running and marked
 * journaling, so that its id, its service and a max_jobs slot are taken
 * while its accept record is written without the lock.  Caller holds the
 * lock, and has checked that the id is unknown and the service free.
 * Returns NULL when out of memory.
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
	if (!jobs_index(j))
	{
		job_free(j);
		return NULL;
	}
	*jobs_busy_slot(svc) = j;
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
	jobs_unindex(j);
	*jobs_busy_slot(j->svc) = NULL;
	jobs_running--;
	job_free(j);
}

/*
 * Hand job j to a runner thread, an idle one if one is free, else a new
 * one; caller holds the lock.  Returns false (logged) if no thread could
 * be started: the caller then goes on with the job itself.
 */
static bool
jobs_hand_over(job *j)
{
	pthread_attr_t attr;
	pthread_t	tid;
	int			rc;

	if (jobs_idle_runners > jobs_handoff_n)
	{
		j->next = NULL;
		if (jobs_handoff_tail != NULL)
			jobs_handoff_tail->next = j;
		else
			jobs_handoff_head = j;
		jobs_handoff_tail = j;
		jobs_handoff_n++;
		pthread_cond_signal(&jobs_runner_cond);
		return true;
	}
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	rc = pthread_create(&tid, &attr, jobs_runner, j);
	pthread_attr_destroy(&attr);
	if (rc != 0)
		log_msg("ERROR: job %s: no runner thread could be started (%s); the job goes on in the thread of its request",
				j->id, strerror(rc));
	return rc == 0;
}

/*
 * Run job j, whose accept record is on disk, in this thread (that of its
 * POST) until it is over or the monotonic time until has passed; then
 * hand what remains to a runner thread, or if none can be started, go on
 * with it here to the end.  A busy agent thus spares, for every quick job
 * of a POST ?wait, its hand-over to a runner and the wake-up of the
 * waiting request at its end: thread switches, which took most of its
 * time.  The caller has pinned the job (see jobs_prune()), so that it is
 * still there to be reported.  Called with the lock held, which is
 * released meanwhile.
 */
static void
jobs_run_here(job *j, int64_t until)
{
	bool		over;

	pthread_mutex_unlock(&jobs_lock);
	over = jobs_advance(j, until);
	pthread_mutex_lock(&jobs_lock);
	if (over || jobs_hand_over(j))
		return;
	pthread_mutex_unlock(&jobs_lock);
	jobs_advance(j, SPAWN_FOREVER);
	pthread_mutex_lock(&jobs_lock);
}

/*
 * Let go of a job pinned by jobs_create() or a long poll; the last one to
 * let go of a job that ended prunes what its pin held back.  Caller holds
 * the lock.
 */
static void
jobs_unpin(job *j)
{
	if (--j->waiters == 0 && j->status != JOB_RUNNING)
		jobs_prune();
}

/*
 * Create, journal and start a job for a new request: in a runner thread,
 * or with wait_ms > 0 in this one for that long once the job is on disk
 * (jobs_run_here()); if no runner thread can be started, in this one to
 * its end.  The job is returned pinned (jobs_unpin() lets it go), so that
 * it is still there to be reported.  Called with the lock held, which it
 * releases while the accept record is written (the job is reserved
 * meanwhile, see jobs_reserve) and while the job runs here, and holds
 * again on return.  Returns NULL if the journal write failed (nothing
 * runs then).
 */
static job *
jobs_create(const restart_request *req, const config_service *svc, int wait_ms)
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
	log_msg("job %s: accepted for service %s", j->id, j->service);
	j->waiters++;
	if (wait_ms > 0)
		jobs_run_here(j, util_monotonic_msec() + wait_ms);
	else if (!jobs_hand_over(j))
		jobs_run_here(j, SPAWN_FOREVER);
	return j;
}

/*
 * Return the job object of j, after waiting up to wait_ms milliseconds for
 * the job to end if it is running (long poll); caller holds jobs_lock,
 * which is released only while waiting.  The job is pinned meanwhile (see
 * jobs_prune()), so that it is still there to be reported however many
 * jobs end during the wait; the last waiter of a job that ended prunes
 * what its wait held back.  Waits of a second or more are logged.
 */
static json_t *
jobs_report_after_wait(job *j, int wait_ms)
{
	struct timespec deadline;
	json_t	   *report;

	if (j->status != JOB_RUNNING || wait_ms <= 0 || jobs_stopping)
		return report_job(j, j->status);
	if (wait_ms >= 1000)
		log_msg("job %s: a long poll waits up to %d.%03d s for it to finish",
				j->id, wait_ms / 1000, wait_ms % 1000);
	util_deadline(&deadline, CLOCK_MONOTONIC, wait_ms);
	j->waiters++;
	while (j->status == JOB_RUNNING && !jobs_runners_done &&
		   pthread_cond_timedwait(jobs_poll_cond(j->id), &jobs_lock, &deadline) != ETIMEDOUT)
		;
	report = report_job(j, j->status);
	jobs_unpin(j);
	return report;
}

/*
 * Handle a verified, parsed restart request: answer an existing id from
 * the table (idempotency), or check the service and the limits and start
 * a new job.  A request that depends on a job still being journaled (same
 * id or same service) waits for that first.  *report receives the job
 * object when there is one: with wait_ms > 0 (POST ?wait), its state once
 * it has ended or wait_ms have passed (for a new job, from when it is on
 * disk; it runs in this thread meanwhile); for a new job that no runner
 * thread could be started for, its final state.  The wait follows without
 * letting go of the job (the lock is released only while waiting, the job
 * pinned), so that it cannot be pruned unseen in between.
 */
jobs_submit_result
jobs_submit(const restart_request *req, int wait_ms, json_t **report)
{
	jobs_submit_result res;
	const config_service *svc = config_find_service(jobs_cfg, req->service);
	job		   *j;

	*report = NULL;
	pthread_mutex_lock(&jobs_lock);
	while (jobs_must_wait(req, svc))
		pthread_cond_wait(&jobs_cond, &jobs_lock);
	if ((j = jobs_find(req->request_id)) != NULL)
		res = jobs_same_request(j, req) ? JOBS_EXISTS : JOBS_CONFLICT;
	else if (jobs_stopping)
		res = JOBS_INTERNAL_ERROR;
	else if (svc == NULL)
		res = JOBS_UNKNOWN_SERVICE;
	else if (jobs_service_busy(svc))
		res = JOBS_SERVICE_BUSY;
	else if (jobs_running >= jobs_cfg->max_jobs)
		res = JOBS_TOO_MANY;
	else if ((j = jobs_create(req, svc, wait_ms)) == NULL)
		res = JOBS_INTERNAL_ERROR;
	else
		res = JOBS_ACCEPTED;
	/* a new job has had its wait in jobs_create() */
	if (j != NULL && res != JOBS_CONFLICT)
		*report = jobs_report_after_wait(j, res == JOBS_ACCEPTED ? 0 : wait_ms);
	if (res == JOBS_ACCEPTED)
		jobs_unpin(j);
	pthread_mutex_unlock(&jobs_lock);
	return res;
}

/*
 * Return the job object of id in *report, after waiting up to wait_ms
 * milliseconds for it to finish (long poll).  Returns false if the agent
 * has no record of the id.  A job still being journaled is waited for
 * first (it may yet be refused).  Waits of a second or more are logged.
 */
bool
jobs_lookup(const char *id, int wait_ms, json_t **report)
{
	job		   *j;

	*report = NULL;
	pthread_mutex_lock(&jobs_lock);
	while ((j = jobs_find(id)) != NULL && j->journaling)
		pthread_cond_wait(&jobs_cond, &jobs_lock);
	if (j != NULL)
		*report = jobs_report_after_wait(j, wait_ms);
	pthread_mutex_unlock(&jobs_lock);
	return j != NULL;
}

/*
 * Stop for shutdown: refuse new jobs, interrupt running steps, wait until
 * every runner has journaled its final state, then wake the long polls.
 * A long poll on a running job is answered with the job's final state,
 * woken by its runner once that is on disk; only one whose final state
 * could not be journaled is answered "running" here.
 */
void
jobs_shutdown(void)
{
	pthread_mutex_lock(&jobs_lock);
	jobs_stopping = true;
	pthread_cond_broadcast(&jobs_cond);
	pthread_cond_broadcast(&jobs_runner_cond);
	if (jobs_running > 0)
		log_msg("stopping %d running job(s)", jobs_running);
	spawn_request_stop();
	while (jobs_running > 0)
		pthread_cond_wait(&jobs_cond, &jobs_lock);
	jobs_runners_done = true;
	for (int i = 0; i < JOBS_POLL_CONDS; i++)
		pthread_cond_broadcast(&jobs_poll_conds[i]);
	pthread_mutex_unlock(&jobs_lock);
}

/*
 * Free a job given its id index key, for tdestroy.
 */
static void
jobs_free_key(void *key)
{
	job_free(jobs_of_key(key));
}

/*
 * Free the job table and close the journal, after jobs_shutdown().  Every
 * job is in the id index, so destroying it frees them all.
 */
void
jobs_cleanup(void)
{
	pthread_mutex_lock(&jobs_lock);
	tdestroy(jobs_by_id, jobs_free_key);
	jobs_by_id = NULL;
	jobs_done_head = jobs_done_tail = NULL;
	jobs_done = 0;
	free(jobs_busy);
	jobs_busy = NULL;
	pthread_mutex_unlock(&jobs_lock);
	journal_close();
}
