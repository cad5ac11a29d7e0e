/*
 * Unit tests of journal.c on a real state directory: concurrent writers
 * sharing flushes, compaction at run time (also after pruning, and with
 * pruning while it runs, held at a gate so that they overlap), the zeros
 * written ahead of appends, and the last record of each id read back after
 * a restart; a failed flush failing the journal for good.
 */
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "agent.h"

#define WRITERS 8
#define IDS_PER_WRITER 200

static char state_dir[64];

/* What one writer thread writes: its ids, both records of each, padded. */
typedef struct writer
{
	pthread_t	tid;
	int			number;
	int			first;			/* number of its first id */
	size_t		pad;			/* bytes of output per record */
	int			failures;
} writer;

/* Make a request id from a writer number and an id number. */
static void
make_id(char *id, int w, int n)
{
	snprintf(id, UUID_TEXT_LEN + 1, "%08x-0000-4000-8000-%012x", (unsigned) w, (unsigned) n);
}

/* Render a job record of id with the given status and pad bytes of output. */
static char *
make_record(const char *id, const char *status, size_t pad)
{
	char		when[40];
	char	   *out = malloc(pad + 1);
	char	   *text = NULL;

	util_format_time(util_now_usec(), when, sizeof(when));
	memset(out, 'x', pad);
	out[pad] = '\0';
	if (asprintf(&text, "{\"request_id\":\"%s\",\"service\":\"svc\",\"requested_by\":null,"
				 "\"requested_at\":\"2026-11-26T05:00:00Z\",\"status\":\"%s\","
				 "\"accepted_at\":\"%s\",\"started_at\":\"%s\",\"finished_at\":null,"
				 "\"exit_code\":null,\"signal\":null,\"steps\":[],\"output\":\"%s\","
				 "\"output_truncated\":false,\"error\":null}",
				 id, status, when, when, out) < 0)
		text = NULL;
	free(out);
	return text;
}

/* Writer thread: for each of its ids, an accept record then a final one. */
static void *
writer_main(void *arg)
{
	writer	   *w = arg;

	for (int n = w->first; n < w->first + IDS_PER_WRITER; n++)
	{
		char		id[UUID_TEXT_LEN + 1];

		make_id(id, w->number, n);
		for (int k = 0; k < 2; k++)
		{
			char	   *text = make_record(id, k ? "completed" : "running", w->pad);

			if (text == NULL || !journal_write(id, text))
				w->failures++;
			free(text);
		}
	}
	return NULL;
}

/* Run writers first_writer..WRITERS-1 at once; returns the failed writes. */
static int
run_writers(int first_writer, int first_id, size_t pad)
{
	writer		w[WRITERS];
	int			failures = 0;

	for (int i = first_writer; i < WRITERS; i++)
	{
		w[i] = (writer) {.number = i, .first = first_id, .pad = pad};
		assert_int_equal(pthread_create(&w[i].tid, NULL, writer_main, &w[i]), 0);
	}
	for (int i = first_writer; i < WRITERS; i++)
	{
		pthread_join(w[i].tid, NULL);
		failures += w[i].failures;
	}
	return failures;
}

/* Close and reopen the journal, as a restart does, and load its jobs. */
static int
reload(job ***jobs)
{
	char		err[256];

	journal_close();
	assert_true(journal_open(state_dir, err, sizeof(err)));
	return journal_load(jobs, 256);
}

/* Find the job of writer w's id number n in jobs, or NULL. */
static job *
find_job(job **jobs, int n_jobs, int w, int n)
{
	char		id[UUID_TEXT_LEN + 1];

	make_id(id, w, n);
	for (int i = 0; i < n_jobs; i++)
		if (strcmp(jobs[i]->id, id) == 0)
			return jobs[i];
	return NULL;
}

/* Free a loaded job array. */
static void
free_jobs(job **jobs, int n)
{
	for (int i = 0; i < n; i++)
		job_free(jobs[i]);
	free(jobs);
}

static void
test_records_refused(void **state)
{
	char	   *text = make_record("00000000-0000-4000-8000-000000000001", "running", 4);

	(void) state;
	assert_false(journal_write("not-an-id", text));
	assert_false(journal_write("00000000-0000-4000-8000-000000000001", "{\"a\":\n1}"));
	assert_false(journal_write("00000000-0000-4000-8000-000000000001", ""));
	free(text);
}

/*
 * Many threads write at once (sharing flushes) past the compaction
 * threshold; every id reads back with its last record.  Then the ids of
 * one writer are pruned and more is written: the compaction that follows
 * leaves them out, so they do not come back after a restart.
 */
static void
test_concurrent_writes_and_compaction(void **state)
{
	job		  **jobs;
	int			n;
	int			ok = 0;

	(void) state;
	/* 8 writers x 200 ids x 2 records x ~2.3 KB: past 4 MiB, compacted */
	assert_int_equal(run_writers(0, 0, 2048), 0);
	n = reload(&jobs);
	assert_int_equal(n, WRITERS * IDS_PER_WRITER);
	for (int w = 0; w < WRITERS; w++)
		for (int i = 0; i < IDS_PER_WRITER; i++)
		{
			job		   *j = find_job(jobs, n, w, i);

			ok += j != NULL && j->status == JOB_COMPLETED && j->output.len == 256;
		}
	assert_int_equal(ok, WRITERS * IDS_PER_WRITER);
	free_jobs(jobs, n);

	for (int i = 0; i < IDS_PER_WRITER; i++)
	{
		char		id[UUID_TEXT_LEN + 1];

		make_id(id, 0, i);
		assert_true(journal_remove(id));
	}
	/* 7 writers x 200 new ids x 2 records x ~8 KB: compacted again */
	assert_int_equal(run_writers(1, 1000, 8192), 0);
	n = reload(&jobs);
	assert_int_equal(n, (WRITERS - 1) * IDS_PER_WRITER * 2);
	assert_null(find_job(jobs, n, 0, 0));
	assert_non_null(find_job(jobs, n, 1, 0));
	assert_non_null(find_job(jobs, n, WRITERS - 1, 1000 + IDS_PER_WRITER - 1));
	free_jobs(jobs, n);
}

/* Writer 300's ids, pruned while a compaction runs. */
#define REMOVED_WRITER 300
#define GATE_WAIT_MS 60000
#define WRITE_ROUNDS_MAX 6

/*
 * The compaction gate.  The test is linked with --wrap=fsync (see the
 * Makefile): a compaction flushes journal.tmp (journal_compact_write())
 * after it has taken its snapshot of the entries and copied their records,
 * and before it renames the file over the journal.  While the gate is
 * armed, the first such flush holds its compaction there until the test
 * opens the gate: what the test does meanwhile overlaps the compaction for
 * certain.  Every flush of journal.tmp is counted, so that the test can
 * also wait for a compaction that began later.
 */
static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;
static bool gate_armed;			/* hold the next compaction */
static bool gate_held;			/* a compaction is held */
static bool gate_open;			/* let it go on */
static int	gate_compactions;	/* flushes of journal.tmp so far */

extern int	__real_fsync(int fd);
extern int	__wrap_fsync(int fd);

/*
 * Tell whether fd is the journal.tmp of the test's state directory.
 */
static bool
is_journal_tmp(int fd)
{
	char		link[64];
	char		target[PATH_MAX];
	char		tmp[128];
	ssize_t		n;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, target, sizeof(target) - 1);
	if (n <= 0)
		return false;
	target[n] = '\0';
	snprintf(tmp, sizeof(tmp), "%s/journal.tmp", state_dir);
	return strcmp(target, tmp) == 0;
}

/*
 * The fsync of the agent's code: count a flush of journal.tmp, and hold it
 * while the gate is armed, until it is opened; then flush for real.
 */
int
__wrap_fsync(int fd)
{
	if (is_journal_tmp(fd))
	{
		pthread_mutex_lock(&gate_lock);
		gate_compactions++;
		if (gate_armed)
		{
			gate_armed = false;
			gate_held = true;
			pthread_cond_broadcast(&gate_cond);
			while (!gate_open)
				pthread_cond_wait(&gate_cond, &gate_lock);
		}
		pthread_mutex_unlock(&gate_lock);
	}
	return __real_fsync(fd);
}

/*
 * Wait until a compaction is held at the gate, for at most GATE_WAIT_MS;
 * tell whether one is.
 */
static bool
gate_wait_held(void)
{
	struct timespec deadline;
	bool		held;

	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += GATE_WAIT_MS / 1000;
	pthread_mutex_lock(&gate_lock);
	while (!gate_held &&
		   pthread_cond_timedwait(&gate_cond, &gate_lock, &deadline) == 0)
		;
	held = gate_held;
	pthread_mutex_unlock(&gate_lock);
	return held;
}

/*
 * Open the gate (also with no compaction held, so that none is held later)
 * and return how many flushes of journal.tmp there have been.
 */
static int
gate_release(void)
{
	int			n;

	pthread_mutex_lock(&gate_lock);
	gate_armed = false;
	gate_open = true;
	n = gate_compactions;
	pthread_cond_broadcast(&gate_cond);
	pthread_mutex_unlock(&gate_lock);
	return n;
}

/* Return how many flushes of journal.tmp there have been. */
static int
gate_count(void)
{
	int			n;

	pthread_mutex_lock(&gate_lock);
	n = gate_compactions;
	pthread_mutex_unlock(&gate_lock);
	return n;
}

/* What the background writer thread of the test does. */
typedef struct background
{
	pthread_t	tid;
	int			rounds;
	int			failures;
} background;

/*
 * Background writer thread: rounds of writers 1..7 (each 200 ids, two
 * records of ~8 KB each), until a compaction is held at the gate and the
 * gate opened again (or WRITE_ROUNDS_MAX rounds): the journal grows past
 * its compaction threshold, and appends and flushes go on while the
 * compaction is held.
 */
static void *
background_main(void *arg)
{
	background *b = arg;
	bool		done;

	do
	{
		b->failures += run_writers(1, 2000 + b->rounds * IDS_PER_WRITER, 8192);
		b->rounds++;
		pthread_mutex_lock(&gate_lock);
		done = gate_open;
		pthread_mutex_unlock(&gate_lock);
	} while (!done && b->rounds < WRITE_ROUNDS_MAX);
	return NULL;
}

/*
 * Ids removed while a compaction runs, beside other writers: the
 * compaction's snapshot holds their records, so the file it makes still
 * does, but once a compaction has begun after the removals, a restart loads
 * none of the removed ids; every id written again right after its removal
 * (as for a new job of an id the agent forgot) loads with its new record,
 * appended while the compaction ran (a removal is applied before the next
 * append, so it never drops a later record of the same id).  The
 * compaction is held at the gate while the ids are removed, and the test
 * asserts that it was, and that it had not yet renamed its file: the
 * removals overlap it whatever the timing.
 */
static void
test_removal_during_compaction(void **state)
{
	char		tmp[128];
	job		  **jobs;
	int			n;
	int			gone = 0;
	int			back = 0;
	int			after;
	int			rounds = 0;
	background	b = {0};

	(void) state;
	for (int i = 0; i < IDS_PER_WRITER; i++)
	{
		char		id[UUID_TEXT_LEN + 1];

		make_id(id, REMOVED_WRITER, i);
		for (int k = 0; k < 2; k++)
		{
			char	   *text = make_record(id, k ? "completed" : "running", 64);

			assert_true(text != NULL && journal_write(id, text));
			free(text);
		}
	}
	pthread_mutex_lock(&gate_lock);
	gate_armed = true;
	pthread_mutex_unlock(&gate_lock);
	assert_int_equal(pthread_create(&b.tid, NULL, background_main, &b), 0);
	if (!gate_wait_held())
	{
		gate_release();
		pthread_join(b.tid, NULL);
		fail_msg("no compaction began while %d rounds of writers wrote", b.rounds);
	}
	for (int i = 0; i < IDS_PER_WRITER; i++)
	{
		char		id[UUID_TEXT_LEN + 1];

		make_id(id, REMOVED_WRITER, i);
		assert_true(journal_remove(id));
		if (i % 2 == 0)
		{
			char	   *text = make_record(id, "running", 8);

			assert_true(text != NULL && journal_write(id, text));
			free(text);
		}
	}
	/* the compaction is still held before its rename: the removals overlapped it */
	snprintf(tmp, sizeof(tmp), "%s/journal.tmp", state_dir);
	assert_int_equal(access(tmp, F_OK), 0);
	after = gate_release();
	pthread_join(b.tid, NULL);
	assert_int_equal(b.failures, 0);

	/* write on until a compaction begins after the removals */
	while (gate_count() == after && rounds < WRITE_ROUNDS_MAX)
		assert_int_equal(run_writers(1, 4000 + rounds++ * IDS_PER_WRITER, 8192), 0);
	assert_true(gate_count() > after);
	n = reload(&jobs);
	for (int i = 0; i < IDS_PER_WRITER; i++)
	{
		job		   *j = find_job(jobs, n, REMOVED_WRITER, i);

		if (i % 2)
			gone += j == NULL;
		else
			back += j != NULL && j->status == JOB_RUNNING && j->output.len == 8;
	}
	assert_int_equal(gone, IDS_PER_WRITER / 2);
	assert_int_equal(back, IDS_PER_WRITER / 2);
	assert_non_null(find_job(jobs, n, 1, 2000));
	assert_non_null(find_job(jobs, n, WRITERS - 1, 4000 + IDS_PER_WRITER - 1));
	free_jobs(jobs, n);
}

/*
 * Appends overwrite zeros written ahead of them (journal_make_room()): the
 * file ends in zeros after the last record, and those read back as
 * nothing, also after more records were written.
 */
static void
test_room_made_for_appends(void **state)
{
	char		path[128];
	char		id[UUID_TEXT_LEN + 1];
	char	   *text;
	char	   *buf;
	struct stat st;
	FILE	   *f;
	job		  **jobs;
	int			n;
	size_t		len;
	size_t		end;

	(void) state;
	make_id(id, 100, 1);
	text = make_record(id, "running", 16);
	assert_true(journal_write(id, text));
	free(text);
	snprintf(path, sizeof(path), "%s/journal", state_dir);
	assert_int_equal(stat(path, &st), 0);
	assert_non_null(f = fopen(path, "rb"));
	buf = malloc((size_t) st.st_size);
	len = fread(buf, 1, (size_t) st.st_size, f);
	fclose(f);
	assert_int_equal(len, (size_t) st.st_size);
	end = (size_t) ((char *) memrchr(buf, '\n', len) - buf) + 1;
	assert_true(end < len);
	for (size_t i = end; i < len; i++)
		assert_int_equal(buf[i], 0);
	free(buf);

	n = reload(&jobs);
	assert_non_null(find_job(jobs, n, 100, 1));
	free_jobs(jobs, n);
	text = make_record(id, "completed", 16);
	assert_true(journal_write(id, text));
	free(text);
	n = reload(&jobs);
	assert_true(find_job(jobs, n, 100, 1) != NULL &&
				find_job(jobs, n, 100, 1)->status == JOB_COMPLETED);
	free_jobs(jobs, n);
}

static int	failures_told;

/* The journal's failure hook of the test: counts how often it is told. */
static void
count_failure(void)
{
	failures_told++;
}

/*
 * When a flush of the journal fails, the write fails, the failure hook is
 * told once, and every later write fails too (what is on disk is unknown
 * until a restart reads it back).  The journal's file descriptors are
 * pointed at /dev/null, where a write succeeds and fdatasync fails.  Runs
 * last: the journal stays failed.
 */
static void
test_failed_flush_fails_the_journal(void **state)
{
	char		path[PATH_MAX];
	char		link[300];
	char		target[PATH_MAX];
	char		id[UUID_TEXT_LEN + 1];
	char	   *text;
	int			devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
	int			replaced = 0;
	DIR		   *d = opendir("/proc/self/fd");
	struct dirent *e;

	(void) state;
	assert_true(devnull >= 0 && d != NULL);
	journal_on_failure(count_failure);
	make_id(id, 200, 1);
	text = make_record(id, "running", 16);
	assert_true(journal_write(id, text));
	assert_int_equal(failures_told, 0);

	snprintf(path, sizeof(path), "%s/journal", state_dir);
	while ((e = readdir(d)) != NULL)
	{
		ssize_t		n;

		snprintf(link, sizeof(link), "/proc/self/fd/%s", e->d_name);
		n = readlink(link, target, sizeof(target) - 1);
		if (n <= 0)
			continue;
		target[n] = '\0';
		if (strcmp(target, path) == 0 && dup2(devnull, atoi(e->d_name)) >= 0)
			replaced++;
	}
	closedir(d);
	close(devnull);
	assert_true(replaced >= 1);

	make_id(id, 200, 2);
	free(text);
	text = make_record(id, "running", 16);
	assert_false(journal_write(id, text));
	assert_int_equal(failures_told, 1);
	assert_false(journal_write(id, text));
	make_id(id, 200, 1);
	assert_false(journal_write(id, text));
	assert_int_equal(failures_told, 1);
	free(text);
	journal_on_failure(NULL);
}

/* Create the state directory and open the journal in it. */
static int
setup(void **state)
{
	char		err[256];
	job		  **jobs;

	(void) state;
	snprintf(state_dir, sizeof(state_dir), "/tmp/test_journal.XXXXXX");
	if (mkdtemp(state_dir) == NULL || !journal_open(state_dir, err, sizeof(err)) ||
		journal_load(&jobs, 256) != 0)
		return -1;
	free(jobs);
	return 0;
}

/* Close the journal and remove its state directory. */
static int
teardown(void **state)
{
	char		path[128];

	(void) state;
	journal_close();
	snprintf(path, sizeof(path), "%s/journal", state_dir);
	unlink(path);
	snprintf(path, sizeof(path), "%s/lock", state_dir);
	unlink(path);
	return rmdir(state_dir);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_records_refused),
		cmocka_unit_test(test_concurrent_writes_and_compaction),
		cmocka_unit_test(test_removal_during_compaction),
		cmocka_unit_test(test_room_made_for_appends),
		cmocka_unit_test(test_failed_flush_fails_the_journal),
	};

	return cmocka_run_group_tests_name("journal", tests, setup, teardown);
}
