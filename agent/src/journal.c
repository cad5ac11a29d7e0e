/*-------------------------------------------------------------------------
 *
 * journal.c
 *	  The durable job journal: one JSON file per request id.
 *
 * state_dir/jobs/<uuid>.json holds the job object.  Each write goes to a
 * temporary file that is fsynced, renamed over the old one, and the
 * directory is fsynced, so a crash leaves either the old or the new record
 * and a new job is on disk before any of its steps runs.  A lock file
 * keeps two agents from sharing one state directory.
 *
 * The directory fsync is a group commit: writers that have renamed their
 * record queue up, one of them (the leader) flushes the directory once for
 * everyone queued at that moment, and each writer returns only after a
 * directory fsync that started after its own rename has succeeded.  Writers
 * arriving during a flush form the next batch.  Callers must not hold the
 * jobs lock while writing, so that concurrent writers can share a flush.
 *
 *-------------------------------------------------------------------------
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

static int	journal_dirfd = -1;
static int	journal_lockfd = -1;

/*
 * A writer waiting for the directory flush that covers its rename.  It
 * lives on the writer's stack; the writer leaves journal_sync_dir() only
 * once the leader of its batch has set its state.
 */
typedef enum
{
	SYNC_WAITING,
	SYNC_DONE,
	SYNC_FAILED
} journal_sync_state;

typedef struct journal_waiter
{
	struct journal_waiter *next;
	journal_sync_state state;
	int			err;			/* errno of a failed flush */
} journal_waiter;

static pthread_mutex_t journal_sync_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t journal_sync_cond = PTHREAD_COND_INITIALIZER;
static journal_waiter *journal_sync_queue;	/* renamed, not yet in a flush */
static bool journal_sync_busy;	/* a leader is flushing */

/*
 * Flush the directory holding path (its parent), so that a directory just
 * created there survives a crash.
 */
static bool
journal_sync_parent(const char *path)
{
	char	   *copy = strdup(path);
	char	   *slash;
	size_t		len = copy ? strlen(copy) : 0;
	int			fd;
	bool		ok;

	while (len > 1 && copy[len - 1] == '/')
		copy[--len] = '\0';
	slash = copy ? strrchr(copy, '/') : NULL;
	if (slash == NULL)
	{
		free(copy);
		return false;
	}
	if (slash == copy)
		slash[1] = '\0';		/* the parent is "/" */
	else
		*slash = '\0';
	fd = open(copy, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	ok = fd >= 0 && fsync(fd) == 0;
	if (fd >= 0)
		close(fd);
	free(copy);
	return ok;
}

/*
 * Create the state directory and its jobs/ subdirectory when missing
 * (flushing each parent directory, so that they survive a crash), take
 * the lock file, and keep a descriptor of jobs/ for the *at() calls.
 */
bool
journal_open(const char *state_dir, char *errbuf, size_t errsize)
{
	int			sfd;

	if (mkdir(state_dir, 0700) == 0)
	{
		if (!journal_sync_parent(state_dir))
		{
			snprintf(errbuf, errsize, "cannot flush the parent of state_dir \"%s\": %s",
					 state_dir, strerror(errno));
			return false;
		}
	}
	else if (errno != EEXIST)
	{
		snprintf(errbuf, errsize, "cannot create state_dir \"%s\": %s", state_dir, strerror(errno));
		return false;
	}
	sfd = open(state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (sfd < 0)
	{
		snprintf(errbuf, errsize, "cannot open state_dir \"%s\": %s", state_dir, strerror(errno));
		return false;
	}
	journal_lockfd = openat(sfd, "lock", O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (journal_lockfd < 0 || flock(journal_lockfd, LOCK_EX | LOCK_NB) != 0)
	{
		snprintf(errbuf, errsize, "cannot lock \"%s/lock\" (is another agent using it?): %s",
				 state_dir, strerror(errno));
		close(sfd);
		return false;
	}
	if ((mkdirat(sfd, "jobs", 0700) != 0 && errno != EEXIST) || fsync(sfd) != 0)
	{
		snprintf(errbuf, errsize, "cannot create \"%s/jobs\": %s", state_dir, strerror(errno));
		close(sfd);
		return false;
	}
	journal_dirfd = openat(sfd, "jobs", O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
	close(sfd);
	if (journal_dirfd < 0)
	{
		snprintf(errbuf, errsize, "cannot open \"%s/jobs\": %s", state_dir, strerror(errno));
		return false;
	}
	return true;
}

/*
 * Close the journal's descriptors (releasing the lock).
 */
void
journal_close(void)
{
	if (journal_dirfd >= 0)
		close(journal_dirfd);
	if (journal_lockfd >= 0)
		close(journal_lockfd);
	journal_dirfd = journal_lockfd = -1;
}

/*
 * Write all of buf to fd, retrying short writes.
 */
static bool
journal_write_all(int fd, const char *buf, size_t len)
{
	while (len > 0)
	{
		ssize_t		n = write(fd, buf, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		buf += n;
		len -= (size_t) n;
	}
	return true;
}

/*
 * Make every rename done so far in the jobs directory durable, sharing
 * one fsync of the directory with the writers queued at the same time
 * (group commit).  Returns true once a flush that started after the
 * caller queued up has succeeded; false (errno set) if that flush failed:
 * a failed flush is never retried for its batch, as its outcome is
 * unknown.
 */
static bool
journal_sync_dir(void)
{
	journal_waiter me = {NULL, SYNC_WAITING, 0};

	pthread_mutex_lock(&journal_sync_lock);
	me.next = journal_sync_queue;
	journal_sync_queue = &me;
	while (me.state == SYNC_WAITING)
	{
		journal_waiter *batch;
		bool		ok;
		int			err;

		if (journal_sync_busy)
		{
			pthread_cond_wait(&journal_sync_cond, &journal_sync_lock);
			continue;
		}
		/* Lead a flush for everyone queued now (this includes me). */
		batch = journal_sync_queue;
		journal_sync_queue = NULL;
		journal_sync_busy = true;
		pthread_mutex_unlock(&journal_sync_lock);
		ok = fsync(journal_dirfd) == 0;
		err = ok ? 0 : errno;
		pthread_mutex_lock(&journal_sync_lock);
		while (batch != NULL)
		{
			journal_waiter *w = batch;

			batch = w->next;
			w->err = err;
			w->state = ok ? SYNC_DONE : SYNC_FAILED;
		}
		journal_sync_busy = false;
		pthread_cond_broadcast(&journal_sync_cond);
	}
	pthread_mutex_unlock(&journal_sync_lock);
	if (me.state != SYNC_DONE)
		errno = me.err;
	return me.state == SYNC_DONE;
}

/*
 * Durably replace the record of job id with text: temporary file, fsync,
 * rename, fsync of the directory (shared with concurrent writers, see
 * journal_sync_dir).  Returns false (and logs) on any error.  Called
 * without the jobs lock; at most one thread writes a given id at a time.
 */
bool
journal_write(const char *id, const char *text)
{
	char		tmp[64];
	char		final[64];
	int			fd;
	bool		ok;

	snprintf(tmp, sizeof(tmp), ".%s.tmp", id);
	snprintf(final, sizeof(final), "%s.json", id);
	fd = openat(journal_dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
	{
		log_msg("journal: cannot create %s: %s", tmp, strerror(errno));
		return false;
	}
	ok = journal_write_all(fd, text, strlen(text)) && journal_write_all(fd, "\n", 1) &&
		fsync(fd) == 0;
	if (close(fd) != 0)
		ok = false;
	if (ok)
		ok = renameat(journal_dirfd, tmp, journal_dirfd, final) == 0 &&
			journal_sync_dir();
	if (!ok)
	{
		log_msg("journal: cannot write %s: %s", final, strerror(errno));
		unlinkat(journal_dirfd, tmp, 0);
	}
	return ok;
}

/*
 * Remove the record of a job (retention pruning).
 */
bool
journal_remove(const char *id)
{
	char		name[64];

	snprintf(name, sizeof(name), "%s.json", id);
	if (unlinkat(journal_dirfd, name, 0) != 0 && errno != ENOENT)
	{
		log_msg("journal: cannot remove %s: %s", name, strerror(errno));
		return false;
	}
	return true;
}

/*
 * Parse an optional time stamp field: null means 0; anything but a string
 * written by util_format_time() is an error.
 */
static bool
journal_time(json_t *v, int64_t *usec)
{
	*usec = 0;
	if (v == NULL || json_is_null(v))
		return true;
	return json_is_string(v) && util_parse_time(json_string_value(v), usec) && *usec != 0;
}

/*
 * Parse an integer-or-null field, storing none for null.
 */
static bool
journal_int(json_t *v, int none, int *out)
{
	*out = none;
	if (v == NULL || json_is_null(v))
		return true;
	if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 255)
		return false;
	*out = (int) json_integer_value(v);
	return true;
}

/*
 * Rebuild the steps of a job from the journal's "steps" array.
 */
static bool
journal_steps(json_t *arr, job *j)
{
	size_t		n = json_array_size(arr);

	if (!json_is_array(arr) || n > 64)
		return false;
	j->steps = calloc(n ? n : 1, sizeof(job_step));
	for (size_t i = 0; i < n; i++)
	{
		json_t	   *s = json_array_get(arr, i);
		job_step   *st = &j->steps[i];
		json_t	   *argv = json_object_get(s, "argv");

		if (!json_is_object(s) || !json_is_array(argv))
			return false;
		st->argv = json_incref(argv);
		j->nsteps++;
		st->timed_out = json_is_true(json_object_get(s, "timed_out"));
		if (!journal_int(json_object_get(s, "exit_code"), -1, &st->exit_code) ||
			!journal_int(json_object_get(s, "signal"), 0, &st->signal) ||
			!journal_time(json_object_get(s, "started_at"), &st->started_at) ||
			!journal_time(json_object_get(s, "finished_at"), &st->finished_at))
			return false;
	}
	return true;
}

/*
 * Copy a required string field of at most max bytes into dst.
 */
static bool
journal_string(json_t *obj, const char *key, char *dst, size_t max)
{
	json_t	   *v = json_object_get(obj, key);

	if (!json_is_string(v) || json_string_length(v) == 0 || json_string_length(v) > max ||
		strlen(json_string_value(v)) != json_string_length(v))
		return false;
	memcpy(dst, json_string_value(v), json_string_length(v) + 1);
	return true;
}

/*
 * Fill in a job's identity fields (id, service, requester) from a record.
 */
static bool
journal_identity(json_t *obj, job *j)
{
	json_t	   *by = json_object_get(obj, "requested_by");

	if (!journal_string(obj, "request_id", j->id, UUID_TEXT_LEN) ||
		!util_is_uuid(j->id, strlen(j->id)) ||
		!journal_string(obj, "service", j->service, SERVICE_NAME_MAX) ||
		!journal_string(obj, "requested_at", j->requested_at, REQUESTED_AT_MAX))
		return false;
	if (json_is_string(by))
	{
		j->has_requested_by = true;
		return journal_string(obj, "requested_by", j->requested_by, UUID_TEXT_LEN);
	}
	return json_is_null(by);
}

/*
 * Rebuild a job from a journal record (a job object).  Returns NULL if
 * the record is not a well-formed job object.
 */
job *
journal_job_from_json(json_t *obj, size_t output_tail)
{
	job		   *j = job_alloc(output_tail);
	const char *status = json_string_value(json_object_get(obj, "status"));
	const char *output = json_string_value(json_object_get(obj, "output"));
	json_t	   *error = json_object_get(obj, "error");

	if (j == NULL)
		return NULL;
	if (!json_is_object(obj) || status == NULL || !journal_identity(obj, j) ||
		!journal_time(json_object_get(obj, "accepted_at"), &j->accepted_at) ||
		!journal_time(json_object_get(obj, "started_at"), &j->started_at) ||
		!journal_time(json_object_get(obj, "finished_at"), &j->finished_at) ||
		!journal_int(json_object_get(obj, "exit_code"), -1, &j->exit_code) ||
		!journal_int(json_object_get(obj, "signal"), 0, &j->signal) ||
		!journal_steps(json_object_get(obj, "steps"), j) ||
		j->accepted_at == 0)
	{
		job_free(j);
		return NULL;
	}
	if (strcmp(status, "completed") == 0)
		j->status = JOB_COMPLETED;
	else if (strcmp(status, "failed") == 0)
		j->status = JOB_FAILED;
	else
		j->status = JOB_RUNNING;
	if (output != NULL)
		tail_append(&j->output, output, strlen(output));
	j->output.truncated |= json_is_true(json_object_get(obj, "output_truncated"));
	if (json_is_string(error))
		j->error = strdup(json_string_value(error));
	return j;
}

/*
 * Stand in for a record that cannot be read back: a failed job holding
 * only the id taken from the file name, so that the id is never forgotten
 * and never runs again (fail closed).  Its time stamps are the file's
 * modification time, or now when even that is unknown.
 */
static job *
journal_unreadable_job(const char *name, const struct stat *st, const char *why)
{
	job		   *j = job_alloc(0);
	int64_t		when = util_now_usec();

	log_msg("journal: %s: %s; the id stays taken and is reported as a failed job",
			name, why);
	if (j == NULL)
		return NULL;
	if (st != NULL && st->st_mtim.tv_sec > 0)
		when = (int64_t) st->st_mtim.tv_sec * 1000000 + st->st_mtim.tv_nsec / 1000;
	memcpy(j->id, name, UUID_TEXT_LEN);
	j->id[UUID_TEXT_LEN] = '\0';
	j->status = JOB_FAILED;
	j->accepted_at = j->started_at = j->finished_at = when;
	j->error = strdup("journal record unreadable");
	j->unreadable = true;
	return j;
}

/*
 * Parse the open journal file f into a job; NULL if it is not a job
 * object of the id its name says.
 */
static job *
journal_parse_file(FILE *f, const char *name, size_t output_tail)
{
	json_error_t jerr;
	json_t	   *obj = json_loadf(f, JSON_REJECT_DUPLICATES, &jerr);
	job		   *j = obj ? journal_job_from_json(obj, output_tail) : NULL;

	json_decref(obj);
	if (j != NULL && strncmp(name, j->id, UUID_TEXT_LEN) != 0)
	{
		job_free(j);
		j = NULL;
	}
	return j;
}

/*
 * Read and parse one journal file.  A record that is unreadable, too
 * large or not a job object becomes a failed stand-in job (see
 * journal_unreadable_job); NULL only when memory runs out.
 */
static job *
journal_read_one(const char *name, size_t output_tail)
{
	int			fd = openat(journal_dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	struct stat st;
	job		   *j = NULL;
	FILE	   *f;

	if (fd < 0 || fstat(fd, &st) != 0)
	{
		if (fd >= 0)
			close(fd);
		return journal_unreadable_job(name, NULL, strerror(errno));
	}
	if (!S_ISREG(st.st_mode) || st.st_size > JOURNAL_FILE_MAX)
	{
		close(fd);
		return journal_unreadable_job(name, &st, "not a regular file of sane size");
	}
	if ((f = fdopen(fd, "r")) == NULL)
	{
		close(fd);
		return NULL;
	}
	j = journal_parse_file(f, name, output_tail);
	fclose(f);
	return j ? j : journal_unreadable_job(name, &st, "not a valid job record");
}

/*
 * Append a job to a growing array; false when memory runs out.
 */
static bool
journal_push(job ***jobs, int *n, int *cap, job *j)
{
	if (*n == *cap)
	{
		int			newcap = *cap ? *cap * 2 : 64;
		job		  **p = realloc(*jobs, newcap * sizeof(job *));

		if (p == NULL)
			return false;
		*jobs = p;
		*cap = newcap;
	}
	(*jobs)[(*n)++] = j;
	return true;
}

/*
 * Give up loading the journal: free what was loaded and return -1, so
 * that the agent refuses to start rather than forget an id.
 */
static int
journal_load_fail(DIR *d, job **jobs, int n, job *extra)
{
	log_msg("journal: cannot read the job records: %s", strerror(errno ? errno : ENOMEM));
	for (int i = 0; i < n; i++)
		job_free(jobs[i]);
	free(jobs);
	job_free(extra);
	closedir(d);
	return -1;
}

/*
 * Load every job record of the journal into a new array (*jobs_out,
 * caller frees), removing left-over temporary files.  Returns the number
 * of jobs, or -1 on error.
 */
int
journal_load(job ***jobs_out, size_t output_tail)
{
	int			dfd = dup(journal_dirfd);
	DIR		   *d = dfd >= 0 ? fdopendir(dfd) : NULL;
	struct dirent *de;
	job		  **jobs = NULL;
	int			n = 0;
	int			cap = 0;

	*jobs_out = NULL;
	if (d == NULL)
		return -1;
	rewinddir(d);
	for (errno = 0; (de = readdir(d)) != NULL; errno = 0)
	{
		size_t		len = strlen(de->d_name);
		job		   *j;

		if (de->d_name[0] == '.' && len > 4 && strcmp(de->d_name + len - 4, ".tmp") == 0)
		{
			unlinkat(journal_dirfd, de->d_name, 0);
			continue;
		}
		if (len != UUID_TEXT_LEN + 5 || strcmp(de->d_name + UUID_TEXT_LEN, ".json") != 0 ||
			!util_is_uuid(de->d_name, UUID_TEXT_LEN))
			continue;
		if ((j = journal_read_one(de->d_name, output_tail)) == NULL ||
			!journal_push(&jobs, &n, &cap, j))
			return journal_load_fail(d, jobs, n, j);
	}
	if (errno != 0)
		return journal_load_fail(d, jobs, n, NULL);
	closedir(d);
	*jobs_out = jobs;
	return n;
}
