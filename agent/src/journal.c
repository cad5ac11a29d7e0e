/*-------------------------------------------------------------------------
 *
 * journal.c
 *	  The durable job journal: one append-only file of job records.
 *
 * state_dir/journal holds one line per record, "<request id> <job object
 * as compact JSON>\n"; the last record of an id is its current state.  A
 * writer appends its record under journal_lock (records never interleave)
 * and returns only once an fdatasync that started after its append has
 * succeeded.  That fdatasync is a group commit: a writer finding no flush
 * in progress becomes the leader and flushes once for every record
 * appended so far; writers arriving meanwhile wait and form the next
 * batch.  The two batches wait on two condition variables, so that the
 * end of a flush wakes only the writers it covered, and one writer of the
 * next batch to lead it (with one, every flush woke every waiting writer,
 * and those of the next batch only to sleep again: in a burst that cost
 * more than the writes).  Callers must not hold the jobs lock while
 * writing, so that concurrent writers share a flush.
 *
 * Failures: an append that fails (a full disk, a file size limit) is cut
 * off again with ftruncate, and only that record fails.  A failed
 * fdatasync, or an append that cannot be cut off, leaves the file's state
 * unknown: the journal then fails every later write, and is never flushed
 * again, until the agent restarts and reads back what is on disk.
 *
 * Reading back: a last line without its newline, and every line after the
 * last well-formed record, is a record torn by a crash in the middle of an
 * append (never acknowledged): it is cut off.  A damaged line followed by
 * a well-formed record still holds its id (the fixed-width id prefix is
 * readable): the id becomes a failed stand-in job, so that it is never
 * forgotten and never runs again.  If even its id prefix is damaged, the
 * agent refuses to start rather than forget an id.
 *
 * Compaction: journal.c keeps, per id, the place of its last record in the
 * file.  At start, and whenever the file has grown past both 4 MiB and
 * twice its size after the last compaction, those records are copied to
 * journal.tmp, which is fsynced and renamed over the journal before the
 * directory is fsynced.  At run time a flush leader starts a compaction
 * thread on a snapshot of the places: it copies those records and flushes
 * the copy while appends and flushes go on, then, with journal_lock held
 * and no flush running, copies the records appended since the snapshot,
 * flushes and renames, so no concurrent append can be lost and the journal
 * waits only for that last part.
 * journal_remove() (retention) only forgets an id's place: its records go
 * at the next compaction, and until then a restart loads them again.
 *
 * The previous version kept one file per id in state_dir/jobs/: at start
 * such a directory is imported once into the journal (as older than any of
 * its records), then its files are removed.  A lock file keeps two agents
 * from sharing one state directory.
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
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

#define JOURNAL_NAME "journal"
#define JOURNAL_TMP_NAME "journal.tmp"
#define JOURNAL_LEGACY_DIR "jobs"
#define JOURNAL_PREFIX_LEN (UUID_TEXT_LEN + 1)	/* "<id> " */
#define JOURNAL_COMPACT_MIN ((off_t) 4 * 1024 * 1024)
#define JOURNAL_COPY_CHUNK 65536
#define JOURNAL_MARKER_MAX 128
#define JOURNAL_PREALLOC ((off_t) 256 * 1024)

/*
 * Where the last record of an id is in the journal file.  An id whose
 * record could not be read back at start is unreadable: compaction writes
 * it as a marker record, which loads as a stand-in job again.
 */
typedef struct journal_entry
{
	struct journal_entry *next; /* in its hash bucket */
	char		id[UUID_TEXT_LEN + 1];
	off_t		offset;			/* of its line */
	size_t		length;			/* of its line, newline included */
	bool		unreadable;
	job		   *loaded;			/* while loading: the job of that line */
} journal_entry;

/* A line of the journal file. */
typedef struct journal_span
{
	off_t		offset;
	size_t		length;			/* newline included */
} journal_span;

static int	journal_statefd = -1;
static int	journal_lockfd = -1;
static char *journal_state_dir;

/* Everything below is protected by journal_lock once the agent runs. */
static pthread_mutex_t journal_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t journal_cond = PTHREAD_COND_INITIALIZER;
static int	journal_fd = -1;
static journal_entry **journal_buckets;
static size_t journal_nbuckets;	/* a power of two, or 0 */
static size_t journal_nentries;
static off_t journal_size;		/* end of the last record */
static off_t journal_allocated; /* end of the file: zeros after journal_size */
static off_t journal_compact_at;	/* size that calls for a compaction */
static uint64_t journal_appended;	/* records appended so far */
static uint64_t journal_synced;	/* how many of them are known on disk */
static bool journal_syncing;	/* a leader is in fdatasync */
static uint64_t journal_flush_target;	/* what the flush running covers */
static uint64_t journal_flush_gen;	/* number of the flush running, or of
									 * the last one */
static int	journal_next_waiters;	/* writers waiting for a flush to come */

/*
 * Writers waiting for a flush: those covered by the flush numbered g wait
 * on journal_flush_cond[g % 2], those waiting for the flush after the
 * running one on the other.
 */
static pthread_cond_t journal_flush_cond[2] = {PTHREAD_COND_INITIALIZER,
PTHREAD_COND_INITIALIZER};

static void journal_wake_writers(bool all);
static int	journal_failed;		/* errno that failed the journal, or 0 */
static void (*journal_fail_hook) (void);	/* told once when it fails */

/*
 * A compaction at run time runs in a thread of its own (see
 * journal_compact_begin()): the records of a snapshot of the entries (copies
 * of them, by offset) and where the journal ended then.
 */
static bool journal_compacting;
static bool journal_compactor_waiting;	/* for the lock with no flush running */
static journal_entry *journal_snap;
static journal_entry **journal_snap_v;
static size_t journal_snap_n;
static off_t journal_snap_end;
static int	journal_snap_fd = -1;	/* the journal file it was taken of */

/*
 * Ids pruned by retention, not yet dropped from the table: journal_remove()
 * only queues them (under its own small lock), so that the jobs lock, held
 * by its caller, never waits for a compaction holding journal_lock.  The
 * queue is applied under journal_lock before every append and compaction,
 * so a record appended later for the same id (a new job of a forgotten
 * id) is never dropped with it.
 */
static pthread_mutex_t journal_removed_lock = PTHREAD_MUTEX_INITIALIZER;
static char (*journal_removed)[UUID_TEXT_LEN + 1];
static size_t journal_nremoved;
static size_t journal_removed_cap;

/*
 * Hash a request id (FNV-1a) to choose its bucket.
 */
static size_t
journal_hash(const char *id)
{
	uint64_t	h = 14695981039346656037ULL;

	for (int i = 0; i < UUID_TEXT_LEN; i++)
		h = (h ^ (unsigned char) id[i]) * 1099511628211ULL;
	return (size_t) h;
}

/*
 * Find the entry of an id, or NULL if the journal holds no record of it.
 */
static journal_entry *
journal_find(const char *id)
{
	if (journal_nbuckets == 0)
		return NULL;
	for (journal_entry *e = journal_buckets[journal_hash(id) & (journal_nbuckets - 1)];
		 e != NULL; e = e->next)
		if (memcmp(e->id, id, UUID_TEXT_LEN) == 0)
			return e;
	return NULL;
}

/*
 * Double the hash table (or create it), so that lookups stay short however
 * many jobs are retained.
 */
static bool
journal_grow(void)
{
	size_t		n = journal_nbuckets ? journal_nbuckets * 2 : 1024;
	journal_entry **b = calloc(n, sizeof(journal_entry *));

	if (b == NULL)
		return false;
	for (size_t i = 0; i < journal_nbuckets; i++)
	{
		while (journal_buckets[i] != NULL)
		{
			journal_entry *e = journal_buckets[i];
			size_t		k = journal_hash(e->id) & (n - 1);

			journal_buckets[i] = e->next;
			e->next = b[k];
			b[k] = e;
		}
	}
	free(journal_buckets);
	journal_buckets = b;
	journal_nbuckets = n;
	return true;
}

/*
 * Return the entry of an id, creating an empty one (length 0) if there is
 * none; *fresh tells which.  NULL when memory runs out.
 */
static journal_entry *
journal_entry_get(const char *id, bool *fresh)
{
	journal_entry *e = journal_find(id);
	size_t		k;

	*fresh = e == NULL;
	if (e != NULL)
		return e;
	if ((journal_nentries >= journal_nbuckets && !journal_grow()) ||
		(e = calloc(1, sizeof(journal_entry))) == NULL)
		return NULL;
	memcpy(e->id, id, UUID_TEXT_LEN);
	k = journal_hash(id) & (journal_nbuckets - 1);
	e->next = journal_buckets[k];
	journal_buckets[k] = e;
	journal_nentries++;
	return e;
}

/*
 * Forget the entry of an id (and a job loaded for it), if there is one.
 */
static void
journal_forget(const char *id)
{
	journal_entry **p;

	if (journal_nbuckets == 0)
		return;
	for (p = &journal_buckets[journal_hash(id) & (journal_nbuckets - 1)]; *p; p = &(*p)->next)
	{
		journal_entry *e = *p;

		if (memcmp(e->id, id, UUID_TEXT_LEN) == 0)
		{
			*p = e->next;
			job_free(e->loaded);
			free(e);
			journal_nentries--;
			return;
		}
	}
}

/*
 * Drop the entries of the ids queued by journal_remove(); called with
 * journal_lock held.
 */
static void
journal_apply_removals(void)
{
	pthread_mutex_lock(&journal_removed_lock);
	for (size_t i = 0; i < journal_nremoved; i++)
		journal_forget(journal_removed[i]);
	journal_nremoved = 0;
	pthread_mutex_unlock(&journal_removed_lock);
}

/*
 * Free every entry and the hash table.
 */
static void
journal_forget_all(void)
{
	for (size_t i = 0; i < journal_nbuckets; i++)
	{
		while (journal_buckets[i] != NULL)
		{
			journal_entry *e = journal_buckets[i];

			journal_buckets[i] = e->next;
			job_free(e->loaded);
			free(e);
		}
	}
	free(journal_buckets);
	journal_buckets = NULL;
	journal_nbuckets = journal_nentries = 0;
}

/*
 * Order entries by the place of their record in the file, for qsort.
 */
static int
journal_cmp_offset(const void *a, const void *b)
{
	const journal_entry *ea = *(journal_entry *const *) a;
	const journal_entry *eb = *(journal_entry *const *) b;

	return (ea->offset > eb->offset) - (ea->offset < eb->offset);
}

/*
 * Return every entry in file order (caller frees), so that compaction and
 * loading keep the records in the order they were written.  NULL when
 * memory runs out.
 */
static journal_entry **
journal_sorted(void)
{
	journal_entry **v = malloc((journal_nentries ? journal_nentries : 1) * sizeof(journal_entry *));
	size_t		n = 0;

	if (v == NULL)
		return NULL;
	for (size_t i = 0; i < journal_nbuckets; i++)
		for (journal_entry *e = journal_buckets[i]; e != NULL; e = e->next)
			v[n++] = e;
	qsort(v, n, sizeof(journal_entry *), journal_cmp_offset);
	return v;
}

/*
 * Write all of buf to fd at offset, retrying short writes.  A write
 * failure (e.g. EFBIG past a file size limit) returns false with errno.
 */
static bool
journal_pwrite_all(int fd, const char *buf, size_t len, off_t offset)
{
	while (len > 0)
	{
		ssize_t		n = pwrite(fd, buf, len, offset);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
		{
			if (n == 0)
				errno = EIO;
			return false;
		}
		buf += n;
		len -= (size_t) n;
		offset += n;
	}
	return true;
}

/*
 * Copy len bytes at srcoff of the journal file src to dstoff of fd, through
 * buf (JOURNAL_COPY_CHUNK bytes), so that even a huge damaged line needs no
 * more memory.
 */
static bool
journal_copy(int src, int fd, off_t dstoff, off_t srcoff, size_t len, char *buf)
{
	while (len > 0)
	{
		ssize_t		n = pread(src, buf, len < JOURNAL_COPY_CHUNK ? len : JOURNAL_COPY_CHUNK,
							  srcoff);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
		{
			if (n == 0)
				errno = EIO;
			return false;
		}
		if (!journal_pwrite_all(fd, buf, (size_t) n, dstoff))
			return false;
		srcoff += n;
		dstoff += n;
		len -= (size_t) n;
	}
	return true;
}

/*
 * Put the journal in the failed state: after a failed fdatasync (or an
 * append that cannot be cut off) what is on disk is unknown, so no later
 * write may be acknowledged until a restart reads the file back.  The
 * hook set with journal_on_failure() is told the first time (the agent
 * then stops, so that its supervisor restarts it).
 */
static void
journal_fail(int err, const char *what)
{
	bool		first = journal_failed == 0;

	journal_failed = err ? err : EIO;
	log_msg("ERROR: journal: %s failed: %s; every later journal write fails until the agent is restarted",
			what, strerror(journal_failed));
	/* writers covered by a flush still running learn its outcome at its end */
	pthread_cond_broadcast(&journal_flush_cond[(journal_flush_gen + 1) % 2]);
	if (!journal_syncing)
		pthread_cond_broadcast(&journal_flush_cond[journal_flush_gen % 2]);
	if (first && journal_fail_hook != NULL)
		journal_fail_hook();
}

/*
 * Set the function that journal_fail() calls when the journal first fails.
 * It is called with the journal's lock held, so it must only signal.
 */
void
journal_on_failure(void (*hook) (void))
{
	journal_fail_hook = hook;
}

/*
 * Size at which the journal is compacted next, given its size now: past
 * both JOURNAL_COMPACT_MIN and twice the live records, so that compaction
 * costs a bounded share of the bytes appended.
 */
static off_t
journal_next_compaction(off_t size)
{
	return size > JOURNAL_COMPACT_MIN / 2 ? 2 * size : JOURNAL_COMPACT_MIN;
}

/*
 * Write the marker record of an id whose record could not be read back: a
 * well-formed line (never cut off as torn) whose JSON is not a job, so
 * that it loads as a stand-in job again.  Returns its length.
 */
static size_t
journal_marker(const char *id, char *buf, size_t size)
{
	int			n = snprintf(buf, size, "%.*s {\"request_id\":\"%.*s\",\"unreadable\":true}\n",
							 UUID_TEXT_LEN, id, UUID_TEXT_LEN, id);

	return n > 0 && (size_t) n < size ? (size_t) n : 0;
}

/*
 * Write the last record of each entry of v, read from the journal file src,
 * in order, to the new file fd, noting where each one goes in spans, and
 * fsync it.  *total receives the new file's size.
 */
static bool
journal_compact_write(int src, int fd, journal_entry **v, size_t n, journal_span *spans,
					  off_t *total)
{
	char	   *buf = malloc(JOURNAL_COPY_CHUNK);
	off_t		pos = 0;
	bool		ok = buf != NULL;

	for (size_t i = 0; ok && i < n; i++)
	{
		spans[i].offset = pos;
		if (v[i]->unreadable)
		{
			spans[i].length = journal_marker(v[i]->id, buf, JOURNAL_COPY_CHUNK);
			ok = journal_pwrite_all(fd, buf, spans[i].length, pos);
		}
		else
		{
			spans[i].length = v[i]->length;
			ok = journal_copy(src, fd, pos, v[i]->offset, v[i]->length, buf);
		}
		pos += (off_t) spans[i].length;
	}
	free(buf);
	*total = pos;
	return ok && fsync(fd) == 0;
}

/*
 * Make fd, a compacted file of size bytes just renamed over the journal,
 * the journal (it was before bytes): the directory fsync makes the rename
 * durable, and a failure of it fails the journal (returns false).  Every
 * record appended so far is then on disk.
 */
static bool
journal_swap(int fd, off_t size, off_t before)
{
	close(journal_fd);
	journal_fd = fd;
	journal_size = journal_allocated = size;
	journal_compact_at = journal_next_compaction(size);
	if (fsync(journal_statefd) != 0)
	{
		journal_fail(errno, "the directory fsync after a compaction");
		return false;
	}
	journal_synced = journal_appended;
	journal_wake_writers(true);
	log_msg("journal: compacted to %zu records, %lld bytes (was %lld bytes)",
			journal_nentries, (long long) size, (long long) before);
	return true;
}

/*
 * Make the compacted file fd (total bytes, the records of v at spans) the
 * journal, once it has been renamed over the old one: the directory fsync
 * makes the rename durable, and a failure of it fails the journal.
 */
static bool
journal_compact_install(int fd, journal_entry **v, size_t n, journal_span *spans, off_t total)
{
	off_t		before = journal_size;

	for (size_t i = 0; i < n; i++)
	{
		v[i]->offset = spans[i].offset;
		v[i]->length = spans[i].length;
	}
	return journal_swap(fd, total, before);
}

/*
 * Give up a compaction that failed before its rename (err says why): the
 * journal stays as it is, journal.tmp (open as fd, or -1) goes, and the
 * next try is postponed.
 */
static void
journal_compact_abandon(int fd, int err)
{
	log_msg("journal: cannot compact the journal, it stays as it is: %s", strerror(err));
	if (fd >= 0)
	{
		close(fd);
		unlinkat(journal_statefd, JOURNAL_TMP_NAME, 0);
	}
	journal_compact_at = journal_next_compaction(journal_size);
}

/*
 * Rewrite the journal as the last record of every id it knows, in file
 * order: journal.tmp is written and fsynced, renamed over the journal, and
 * the directory is fsynced.  Called at start, when no append or flush can
 * run (at run time, see journal_compact_begin()).  On success
 * every record appended so far is on disk.  A failure before the rename
 * leaves the journal as it was (and postpones the next try).
 */
static bool
journal_compact(void)
{
	size_t		n;
	journal_entry **v;
	journal_span *spans;
	off_t		total = 0;
	int			fd = -1;
	bool		ok;
	int			err;

	journal_apply_removals();
	n = journal_nentries;
	v = journal_sorted();
	spans = malloc((n ? n : 1) * sizeof(journal_span));
	ok = v != NULL && spans != NULL &&
		(fd = openat(journal_statefd, JOURNAL_TMP_NAME,
					 O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600)) >= 0 &&
		journal_compact_write(journal_fd, fd, v, n, spans, &total) &&
		renameat(journal_statefd, JOURNAL_TMP_NAME, journal_statefd, JOURNAL_NAME) == 0;
	err = errno;
	if (ok)
		ok = journal_compact_install(fd, v, n, spans, total);
	else
		journal_compact_abandon(fd, err);
	free(v);
	free(spans);
	return ok;
}

/*
 * The place in the compacted file of the snapshot record that was at
 * offset (spans are the snapshot's new places), or NULL.
 */
static journal_span *
journal_snap_span(off_t offset, journal_span *spans)
{
	size_t		lo = 0;
	size_t		hi = journal_snap_n;

	while (lo < hi)
	{
		size_t		mid = lo + (hi - lo) / 2;

		if (journal_snap[mid].offset == offset)
			return &spans[mid];
		if (journal_snap[mid].offset < offset)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

/*
 * Finish a compaction at run time, with journal_lock held and no flush in
 * progress: append to the compacted file fd (total bytes so far, the
 * snapshot's records at spans, already on disk) the records appended since
 * the snapshot, flush it, rename it over the journal, move every entry to
 * its new place and fsync the directory.  Returns false (the journal is
 * left as it was) if anything before the rename fails.
 */
static bool
journal_compact_finish(int fd, journal_span *spans, off_t total)
{
	off_t		tail = journal_size - journal_snap_end;
	off_t		before = journal_size;
	char	   *buf = malloc(JOURNAL_COPY_CHUNK);
	bool		ok;

	ok = buf != NULL &&
		(tail == 0 || journal_copy(journal_fd, fd, total, journal_snap_end, (size_t) tail, buf)) &&
		fdatasync(fd) == 0 &&
		renameat(journal_statefd, JOURNAL_TMP_NAME, journal_statefd, JOURNAL_NAME) == 0;
	free(buf);
	if (!ok)
		return false;
	for (size_t i = 0; i < journal_nbuckets; i++)
		for (journal_entry *e = journal_buckets[i]; e != NULL; e = e->next)
		{
			journal_span *span;

			if (e->offset >= journal_snap_end)
				e->offset = total + (e->offset - journal_snap_end);
			else if ((span = journal_snap_span(e->offset, spans)) != NULL)
			{
				e->offset = span->offset;
				e->length = span->length;
			}
		}
	(void) journal_swap(fd, total + tail, before);
	return true;
}

/*
 * The compaction thread: copy the snapshot's records to journal.tmp and
 * flush it without journal_lock (appends and flushes go on meanwhile), then
 * finish with the lock held, once no flush is in progress: only the records
 * appended since the snapshot are copied then, so the journal waits for a
 * small copy and two small flushes, not for the whole file.
 */
static void *
journal_compactor_main(void *arg)
{
	journal_span *spans = malloc((journal_snap_n ? journal_snap_n : 1) * sizeof(journal_span));
	off_t		total = 0;
	int			fd = openat(journal_statefd, JOURNAL_TMP_NAME,
							O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
	bool		ok = spans != NULL && fd >= 0 &&
		journal_compact_write(journal_snap_fd, fd, journal_snap_v, journal_snap_n, spans, &total);
	int			err = errno;

	(void) arg;
	pthread_mutex_lock(&journal_lock);
	/* no new flush is led meanwhile (journal_wait_durable()): finishing makes all durable */
	journal_compactor_waiting = true;
	while (journal_syncing)
		pthread_cond_wait(&journal_cond, &journal_lock);
	if (ok && journal_failed != 0)
	{
		ok = false;
		err = journal_failed;
	}
	if (ok)
	{
		ok = journal_compact_finish(fd, spans, total);
		err = errno;
	}
	journal_compactor_waiting = false;
	if (!ok)
		journal_compact_abandon(fd, err);
	free(spans);
	free(journal_snap);
	free(journal_snap_v);
	journal_snap = NULL;
	journal_snap_v = NULL;
	journal_compacting = false;
	journal_wake_writers(true);
	pthread_cond_broadcast(&journal_cond);
	pthread_mutex_unlock(&journal_lock);
	return NULL;
}

/*
 * Start a compaction at run time in a thread of its own, from a snapshot
 * of the entries; called by a flush leader with journal_lock held.  If it
 * cannot start, the next try is postponed.
 */
static void
journal_compact_begin(void)
{
	journal_entry **v;
	pthread_attr_t attr;
	pthread_t	tid;
	size_t		n;
	bool		ok;
	int			rc;

	journal_apply_removals();
	n = journal_nentries;
	v = journal_sorted();
	journal_snap = malloc((n ? n : 1) * sizeof(journal_entry));
	journal_snap_v = malloc((n ? n : 1) * sizeof(journal_entry *));
	ok = v != NULL && journal_snap != NULL && journal_snap_v != NULL;
	for (size_t i = 0; ok && i < n; i++)
	{
		journal_snap[i] = *v[i];
		journal_snap[i].next = NULL;
		journal_snap[i].loaded = NULL;
		journal_snap_v[i] = &journal_snap[i];
	}
	free(v);
	journal_snap_n = n;
	journal_snap_end = journal_size;
	journal_snap_fd = journal_fd;
	journal_compacting = ok;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (ok && (rc = pthread_create(&tid, &attr, journal_compactor_main, NULL)) != 0)
	{
		log_msg("journal: cannot start a compaction: %s", strerror(rc));
		journal_compacting = ok = false;
	}
	pthread_attr_destroy(&attr);
	if (!ok)
	{
		free(journal_snap);
		free(journal_snap_v);
		journal_snap = NULL;
		journal_snap_v = NULL;
		journal_compact_at = journal_next_compaction(journal_size);
	}
}

/*
 * Wake the writers waiting for the flush that has just ended (all of them
 * once the journal failed, or a compaction made every record durable) and
 * one writer of the next batch, to lead its flush.  Called with
 * journal_lock held.
 */
static void
journal_wake_writers(bool all)
{
	pthread_cond_broadcast(&journal_flush_cond[journal_flush_gen % 2]);
	if (all || journal_failed != 0)
		pthread_cond_broadcast(&journal_flush_cond[(journal_flush_gen + 1) % 2]);
	else if (journal_next_waiters > 0)
		pthread_cond_signal(&journal_flush_cond[(journal_flush_gen + 1) % 2]);
}

/*
 * Flush the journal for every record appended so far, as the leader of a
 * group commit: the flush runs without journal_lock, so that more records
 * can be appended meanwhile (they wait for the next flush).  If the journal
 * has grown enough, the leader also starts a compaction, which runs beside
 * the appends and flushes.  Called with journal_lock held and no flush in
 * progress.
 */
static void
journal_lead_flush(void)
{
	uint64_t	target = journal_appended;
	int			fd = journal_fd;
	int			rc;
	int			err;

	if (journal_size >= journal_compact_at && !journal_compacting)
		journal_compact_begin();
	journal_syncing = true;
	journal_flush_target = target;
	journal_flush_gen++;
	pthread_mutex_unlock(&journal_lock);
	rc = fdatasync(fd);
	err = errno;
	pthread_mutex_lock(&journal_lock);
	journal_syncing = false;
	if (rc != 0)
		journal_fail(err, "fdatasync of the journal");
	else if (target > journal_synced)
		journal_synced = target;
	journal_wake_writers(rc != 0);
	pthread_cond_broadcast(&journal_cond);
}

/*
 * Wait until record seq is on disk, leading a flush when none is running.
 * A record that the running flush covers waits for its end; one appended
 * after it started waits for the next flush, which one of its writers
 * leads once the running one ends.  Returns false (errno set) if the
 * journal failed first: the flush that would have covered the record
 * failed, and it is never retried.  Called with journal_lock held.
 */
static bool
journal_wait_durable(uint64_t seq)
{
	while (journal_synced < seq && journal_failed == 0)
	{
		if (journal_syncing && seq <= journal_flush_target)
			pthread_cond_wait(&journal_flush_cond[journal_flush_gen % 2], &journal_lock);
		else if (journal_syncing || journal_compactor_waiting)
		{
			journal_next_waiters++;
			pthread_cond_wait(&journal_flush_cond[(journal_flush_gen + 1) % 2], &journal_lock);
			journal_next_waiters--;
		}
		else
			journal_lead_flush();
	}
	if (journal_synced >= seq)
		return true;
	errno = journal_failed;
	return false;
}

/*
 * Make room for len more bytes after the last record: when they would pass
 * the end of the file, write JOURNAL_PREALLOC bytes of zeros past it.  An
 * append then overwrites blocks that are on disk already, so that its
 * fdatasync writes the record alone, not also the file's new size and
 * block map (a third of its cost on the machine of docs/benchmarks.md).
 * The room is small because the flush after it writes it all: 256 KiB
 * cost that flush 0.3 ms there, 1 MiB 3 ms on average and up to 50 ms.
 * Zeros after the last record read back as nothing (journal_read()).  If
 * the zeros cannot be written, they are cut off again and the append just
 * extends the file.  Called with journal_lock held.
 */
static void
journal_make_room(size_t len)
{
	static const char zeros[JOURNAL_COPY_CHUNK];
	off_t		before = journal_allocated;
	off_t		end = journal_size + (off_t) len + JOURNAL_PREALLOC;

	if (journal_size + (off_t) len <= journal_allocated)
		return;
	while (journal_allocated < end)
	{
		off_t		left = end - journal_allocated;
		size_t		n = left < (off_t) sizeof(zeros) ? (size_t) left : sizeof(zeros);

		if (!journal_pwrite_all(journal_fd, zeros, n, journal_allocated))
		{
			if (ftruncate(journal_fd, before) != 0)
				journal_fail(errno, "cutting off zeros after a failed write");
			journal_allocated = before;
			return;
		}
		journal_allocated += (off_t) n;
	}
}

/*
 * Append one record line (len bytes, newline included) at the end of the
 * journal and note its place; *seq receives its sequence number.  Called
 * with journal_lock held.  A failed or short write is cut off again, so
 * that only this record fails; if even that fails, the journal fails.
 */
static bool
journal_append(const char *id, const char *line, size_t len, uint64_t *seq)
{
	journal_entry *e;
	bool		fresh;
	int			err;

	if (journal_failed != 0)
	{
		errno = journal_failed;
		return false;
	}
	journal_apply_removals();
	if ((e = journal_entry_get(id, &fresh)) == NULL)
	{
		errno = ENOMEM;
		return false;
	}
	journal_make_room(len);
	if (journal_failed == 0 && journal_pwrite_all(journal_fd, line, len, journal_size))
	{
		e->offset = journal_size;
		e->length = len;
		e->unreadable = false;
		journal_size += (off_t) len;
		if (journal_allocated < journal_size)
			journal_allocated = journal_size;
		*seq = ++journal_appended;
		return true;
	}
	err = journal_failed != 0 ? journal_failed : errno;
	if (fresh)
		journal_forget(id);
	if (journal_failed == 0 && ftruncate(journal_fd, journal_size) != 0)
		journal_fail(errno, "cutting off a failed append");
	journal_allocated = journal_size;
	errno = err;
	return false;
}

/*
 * Build the journal line of a record (caller frees): the id (the first
 * UUID_TEXT_LEN bytes of id), a space, text and a newline; *linelen
 * receives its length.  NULL (errno set) if the id is not a UUID, or if
 * text is empty, too large or holds a newline (it would not read back as
 * one record).
 */
static char *
journal_make_line(const char *id, const char *text, size_t *linelen)
{
	size_t		len = strlen(text);
	char	   *line;

	if (!util_is_uuid(id, UUID_TEXT_LEN) || len == 0 || len > JOURNAL_RECORD_MAX ||
		memchr(text, '\n', len) != NULL)
	{
		errno = EINVAL;
		return NULL;
	}
	if ((line = malloc(JOURNAL_PREFIX_LEN + len + 1)) == NULL)
		return NULL;
	memcpy(line, id, UUID_TEXT_LEN);
	line[UUID_TEXT_LEN] = ' ';
	memcpy(line + JOURNAL_PREFIX_LEN, text, len);
	line[JOURNAL_PREFIX_LEN + len] = '\n';
	*linelen = JOURNAL_PREFIX_LEN + len + 1;
	return line;
}

/*
 * Durably record text (a job object as compact JSON, no newline) as the
 * current state of job id: append it, then wait for a flush covering it
 * (shared with concurrent writers).  Returns true once it is on disk;
 * false (errno set, and logged) otherwise.  Called without the jobs lock;
 * at most one thread writes a given id at a time.
 */
bool
journal_write(const char *id, const char *text)
{
	size_t		len = 0;
	char	   *line = NULL;
	uint64_t	seq = 0;
	bool		ok = false;
	int			err;

	if (strlen(id) != UUID_TEXT_LEN)
		errno = EINVAL;
	else
		line = journal_make_line(id, text, &len);
	err = errno;
	if (line != NULL)
	{
		pthread_mutex_lock(&journal_lock);
		ok = journal_append(id, line, len, &seq) && journal_wait_durable(seq);
		err = errno;
		pthread_mutex_unlock(&journal_lock);
		free(line);
	}
	if (!ok)
		log_msg("journal: cannot write a record of job %.*s: %s", UUID_TEXT_LEN, id, strerror(err));
	errno = err;
	return ok;
}

/*
 * Drop a job from the journal (retention pruning): its records are left
 * out of the next compaction.  Nothing is written: until that compaction,
 * a restart loads the job again, and retention prunes it again.  Only
 * queues the id (see journal_removed), so it never waits for a flush or a
 * compaction; false if memory ran out (the job then stays in the journal).
 */
bool
journal_remove(const char *id)
{
	bool		ok = true;

	pthread_mutex_lock(&journal_removed_lock);
	if (journal_nremoved == journal_removed_cap)
	{
		size_t		cap = journal_removed_cap ? journal_removed_cap * 2 : 64;
		void	   *p = realloc(journal_removed, cap * sizeof(*journal_removed));

		if (p == NULL)
			ok = false;
		else
		{
			journal_removed = p;
			journal_removed_cap = cap;
		}
	}
	if (ok)
	{
		memcpy(journal_removed[journal_nremoved], id, UUID_TEXT_LEN);
		journal_removed[journal_nremoved++][UUID_TEXT_LEN] = '\0';
	}
	pthread_mutex_unlock(&journal_removed_lock);
	return ok;
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
 * Rebuild the steps of a job from the journal's "steps" array; false if
 * it is not one, or (*nomem set) if memory ran out.
 */
static bool
journal_steps(json_t *arr, job *j, bool *nomem)
{
	size_t		n = json_array_size(arr);

	if (!json_is_array(arr) || n > 64)
		return false;
	if ((j->steps = calloc(n ? n : 1, sizeof(job_step))) == NULL)
	{
		*nomem = true;
		return false;
	}
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
 * the record is not a well-formed job object, or, with *nomem set, if
 * memory ran out: the record may well be one, and must not be taken for
 * an unreadable one.
 */
job *
journal_job_from_json(json_t *obj, size_t output_tail, bool *nomem)
{
	job		   *j = job_alloc(output_tail);
	const char *status = json_string_value(json_object_get(obj, "status"));
	const char *output = json_string_value(json_object_get(obj, "output"));
	json_t	   *error = json_object_get(obj, "error");

	*nomem = j == NULL;
	if (j == NULL)
		return NULL;
	if (!json_is_object(obj) || status == NULL || !journal_identity(obj, j) ||
		!journal_time(json_object_get(obj, "accepted_at"), &j->accepted_at) ||
		!journal_time(json_object_get(obj, "started_at"), &j->started_at) ||
		!journal_time(json_object_get(obj, "finished_at"), &j->finished_at) ||
		!journal_int(json_object_get(obj, "exit_code"), -1, &j->exit_code) ||
		!journal_int(json_object_get(obj, "signal"), 0, &j->signal) ||
		!journal_steps(json_object_get(obj, "steps"), j, nomem) ||
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
	if (json_is_string(error) && (j->error = strdup(json_string_value(error))) == NULL)
	{
		*nomem = true;
		job_free(j);
		return NULL;
	}
	return j;
}

/*
 * Stand in for a record that cannot be read back: a failed job holding
 * only the id taken from the record's prefix, so that the id is never
 * forgotten and never runs again (fail closed).  Its time stamps are when,
 * the journal's modification time at start.
 */
static job *
journal_unreadable_job(const char *id, int64_t when, off_t offset, const char *why)
{
	job		   *j = job_alloc(0);

	log_msg("journal: the record of %.*s at offset %lld %s; the id stays taken and is reported as a failed job",
			UUID_TEXT_LEN, id, (long long) offset, why);
	if (j == NULL)
		return NULL;
	memcpy(j->id, id, UUID_TEXT_LEN);
	j->id[UUID_TEXT_LEN] = '\0';
	j->status = JOB_FAILED;
	j->accepted_at = j->started_at = j->finished_at = when;
	j->unreadable = true;
	if ((j->error = strdup("journal record unreadable")) == NULL)
	{
		job_free(j);
		return NULL;
	}
	return j;
}

/*
 * What the reader knows while it scans the journal: the mapped file, the
 * end of the last well-formed record, and the damaged lines seen since
 * (a torn tail, unless a well-formed record follows them).
 */
typedef struct journal_scan
{
	const char *map;
	off_t		good_end;
	journal_span *damaged;
	size_t		ndamaged;
	size_t		damaged_cap;
	int64_t		when;			/* time stamp of stand-in jobs */
	size_t		output_tail;
	off_t		hole;			/* offset of a line with zero bytes, or -1 */
} journal_scan;

/*
 * Tell whether a line (without its newline) starts with a readable id
 * prefix, "<uuid> ", followed by something.
 */
static bool
journal_has_id(const char *line, size_t len)
{
	return len > JOURNAL_PREFIX_LEN && line[UUID_TEXT_LEN] == ' ' &&
		util_is_uuid(line, UUID_TEXT_LEN);
}

/*
 * Make job j (NULL when memory ran out) the loaded state of id, whose last
 * record is the line at span.
 */
static bool
journal_scan_apply(const char *id, journal_span span, job *j)
{
	journal_entry *e;
	bool		fresh;

	if (j == NULL || (e = journal_entry_get(id, &fresh)) == NULL)
	{
		log_msg("journal: out of memory while loading");
		job_free(j);
		return false;
	}
	e->offset = span.offset;
	e->length = span.length;
	e->unreadable = j->unreadable;
	job_free(e->loaded);
	e->loaded = j;
	return true;
}

/*
 * Remember a damaged line until it is known whether a well-formed record
 * follows it.
 */
static bool
journal_scan_defer(journal_scan *s, journal_span span)
{
	if (s->ndamaged == s->damaged_cap)
	{
		size_t		cap = s->damaged_cap ? s->damaged_cap * 2 : 16;
		journal_span *p = realloc(s->damaged, cap * sizeof(journal_span));

		if (p == NULL)
		{
			log_msg("journal: out of memory while loading");
			return false;
		}
		s->damaged = p;
		s->damaged_cap = cap;
	}
	s->damaged[s->ndamaged++] = span;
	return true;
}

/*
 * A well-formed record follows the damaged lines remembered so far, so
 * they are not a torn tail: each one whose id prefix is readable holds
 * its id as a stand-in job; one whose id is damaged makes the load fail
 * (refusing to start rather than forget an id).
 */
static bool
journal_scan_settle(journal_scan *s)
{
	for (size_t i = 0; i < s->ndamaged; i++)
	{
		journal_span sp = s->damaged[i];
		const char *line = s->map + sp.offset;

		if (!journal_has_id(line, sp.length - 1))
		{
			log_msg("journal: the line at offset %lld of %s/%s is damaged, its request id unreadable, and "
					"complete records follow it: refusing to start rather than forget an id "
					"(inspect the file; remove the line only once its id is known to be safe to forget)",
					(long long) sp.offset, journal_state_dir, JOURNAL_NAME);
			return false;
		}
		if (!journal_scan_apply(line, sp,
								journal_unreadable_job(line, s->when, sp.offset,
													   "is damaged (not a complete JSON record)")))
			return false;
	}
	s->ndamaged = 0;
	return true;
}

/*
 * Read one line (len bytes before its newline) at offset off: a record
 * with a readable id and JSON becomes the loaded state of its id (a
 * stand-in job if the JSON is not a job of that id); anything else is
 * deferred as damaged.
 */
static bool
journal_scan_line(journal_scan *s, off_t off, size_t len)
{
	const char *line = s->map + off;
	journal_span span = {off, len + 1};
	unsigned	failures = util_json_failures();
	json_t	   *obj = NULL;
	json_error_t jerr;
	bool		nomem = false;
	job		   *j;

	if (memchr(line, '\0', len) != NULL)
	{
		s->hole = off;			/* the rest is a torn tail: see journal_scan_all */
		return true;
	}
	if (journal_has_id(line, len) && len - JOURNAL_PREFIX_LEN <= JOURNAL_FILE_MAX)
		obj = json_loadb(line + JOURNAL_PREFIX_LEN, len - JOURNAL_PREFIX_LEN,
						 JSON_REJECT_DUPLICATES, &jerr);

	/*
	 * A record jansson could not read for want of memory is not damaged
	 * (it would be cut off as a torn tail, or kept as unreadable), and one
	 * it read while an allocation failed may have lost bytes of a string:
	 * the load fails instead.
	 */
	if (util_json_failures() != failures)
	{
		log_msg("journal: out of memory while loading");
		json_decref(obj);
		return false;
	}
	if (obj == NULL)
		return journal_scan_defer(s, span);
	if (!journal_scan_settle(s))
	{
		json_decref(obj);
		return false;
	}
	j = journal_job_from_json(obj, s->output_tail, &nomem);
	if (nomem)
	{
		log_msg("journal: out of memory while loading");
		json_decref(obj);
		return false;
	}
	if (j != NULL && memcmp(j->id, line, UUID_TEXT_LEN) != 0)
	{
		job_free(j);
		j = NULL;
	}
	if (j == NULL)
		j = journal_unreadable_job(line, s->when, off,
								   json_is_true(json_object_get(obj, "unreadable")) ?
								   "stands for a record found unreadable earlier" :
								   "is not a job record of that id");
	json_decref(obj);
	s->good_end = off + (off_t) span.length;
	return journal_scan_apply(line, span, j);
}

/*
 * Read every complete line of the mapped journal (size bytes).  A last
 * line without its newline is left for the caller to cut off.  So is
 * everything from a line holding zero bytes on: the agent never writes a
 * zero byte, so they are a region the file system never got to write, as
 * a crash during an append leaves (records appended together may reach
 * the disk out of order).  No record at or after such a hole was ever
 * acknowledged: the flush that acknowledged it would have written the
 * hole too.
 */
static bool
journal_scan_all(journal_scan *s, size_t size)
{
	size_t		off = 0;

	s->hole = -1;
	while (off < size && s->hole < 0)
	{
		const char *nl = memchr(s->map + off, '\n', size - off);
		size_t		len;

		if (nl == NULL)
			break;
		len = (size_t) (nl - (s->map + off));
		if (!journal_scan_line(s, (off_t) off, len))
			return false;
		off += len + 1;
	}
	return true;
}

/*
 * Whether bytes from to end of fd are all zero.
 */
static bool
journal_zeros_from(int fd, off_t from, off_t end)
{
	char		buf[4096];

	while (from < end)
	{
		off_t		left = end - from;
		ssize_t		n = pread(fd, buf, left < (off_t) sizeof(buf) ? (size_t) left : sizeof(buf), from);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		for (ssize_t i = 0; i < n; i++)
			if (buf[i] != '\0')
				return false;
		from += n;
	}
	return true;
}

/*
 * Cut off everything after the last well-formed record (from good_end to
 * size): a record torn by a crash in the middle of an append, which was
 * never acknowledged.  The truncation is fsynced before anything is
 * appended after it.
 */
static bool
journal_cut_tail(off_t good_end, off_t size)
{
	log_msg("journal: cutting off %lld bytes after the last complete record (offset %lld): "
			"a record torn by a crash, never acknowledged",
			(long long) (size - good_end), (long long) good_end);
	if (ftruncate(journal_fd, good_end) != 0 || fsync(journal_fd) != 0)
	{
		log_msg("journal: cannot cut off the torn record: %s", strerror(errno));
		return false;
	}
	return true;
}

/*
 * Read the journal file into the entries (each with its loaded job),
 * cutting off a torn tail.  Returns false if it cannot be read, or if a
 * line whose id is unreadable is followed by complete records.
 */
static bool
journal_read(size_t output_tail)
{
	journal_scan s = {0};
	struct stat st;
	void	   *map = NULL;
	bool		ok;

	if (fstat(journal_fd, &st) != 0)
	{
		log_msg("journal: cannot read %s/%s: %s", journal_state_dir, JOURNAL_NAME, strerror(errno));
		return false;
	}
	s.when = (int64_t) st.st_mtim.tv_sec * 1000000 + st.st_mtim.tv_nsec / 1000;
	s.output_tail = output_tail;
	if (st.st_size > 0 &&
		(map = mmap(NULL, (size_t) st.st_size, PROT_READ, MAP_PRIVATE, journal_fd, 0)) == MAP_FAILED)
	{
		log_msg("journal: cannot read %s/%s: %s", journal_state_dir, JOURNAL_NAME, strerror(errno));
		return false;
	}
	s.map = map;
	ok = journal_scan_all(&s, (size_t) st.st_size);
	if (map != NULL)
		munmap(map, (size_t) st.st_size);
	free(s.damaged);
	if (!ok)
		return false;
	if (s.hole >= 0)
		log_msg("journal: zero bytes at offset %lld: records appended when the agent stopped "
				"never reached the disk whole, and none from there on was acknowledged",
				(long long) s.hole);
	journal_size = journal_allocated = s.good_end;
	if (s.good_end == st.st_size)
		return true;
	if (journal_zeros_from(journal_fd, s.good_end, st.st_size))
	{
		/* the room made for appends (journal_make_room()): not a torn record */
		journal_allocated = st.st_size;
		return true;
	}
	return journal_cut_tail(s.good_end, st.st_size);
}

/*
 * Turn a record file of the previous version (jobs/<id>.json) into a
 * journal line (caller frees): the job object as compact JSON, or the
 * marker of an unreadable record (which loads as a stand-in) if the file
 * is not a readable job record of its id.  *linelen receives the line's
 * length.  NULL when memory runs out.
 */
static char *
journal_legacy_line(int dfd, const char *name, size_t *linelen)
{
	int			fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	struct stat st;
	unsigned	failures = util_json_failures();
	json_error_t jerr;
	json_t	   *obj = NULL;
	job		   *j = NULL;
	char	   *text = NULL;
	char	   *line = NULL;
	bool		nomem = false;

	if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size <= JOURNAL_FILE_MAX)
		obj = json_loadfd(fd, JSON_REJECT_DUPLICATES, &jerr);
	if (fd >= 0)
		close(fd);
	if (obj != NULL && (j = journal_job_from_json(obj, 0, &nomem)) != NULL &&
		strncmp(j->id, name, UUID_TEXT_LEN) == 0 && (text = report_text(obj)) == NULL)
		nomem = true;
	job_free(j);
	json_decref(obj);

	/* a record that memory ran short for is not imported as unreadable */
	if (nomem || util_json_failures() != failures)
	{
		log_msg("journal: out of memory while importing %s/%s", JOURNAL_LEGACY_DIR, name);
		free(text);
		return NULL;
	}
	if (text != NULL)
	{
		line = journal_make_line(name, text, linelen);
		free(text);
		return line;			/* NULL: out of memory */
	}
	log_msg("journal: %s/%s cannot be read back; it is imported as an unreadable record",
			JOURNAL_LEGACY_DIR, name);
	if ((line = malloc(JOURNAL_MARKER_MAX)) != NULL)
		*linelen = journal_marker(name, line, JOURNAL_MARKER_MAX);
	return line;
}

/*
 * Tell whether a name in the old jobs/ directory is a record file of the
 * previous version, <uuid>.json.
 */
static bool
journal_is_legacy_record(const char *name)
{
	return strlen(name) == UUID_TEXT_LEN + 5 && strcmp(name + UUID_TEXT_LEN, ".json") == 0 &&
		util_is_uuid(name, UUID_TEXT_LEN);
}

/*
 * Write a journal line for each record file of the old jobs/ directory to
 * fd from *pos on, counting them in *count.
 */
static bool
journal_import_records(DIR *d, int dfd, int fd, off_t *pos, int *count)
{
	struct dirent *de;

	for (errno = 0; (de = readdir(d)) != NULL; errno = 0)
	{
		char	   *line;
		size_t		len = 0;
		bool		ok;

		if (!journal_is_legacy_record(de->d_name))
			continue;
		line = journal_legacy_line(dfd, de->d_name, &len);
		ok = line != NULL && journal_pwrite_all(fd, line, len, *pos);
		free(line);
		if (!ok)
			return false;
		*pos += (off_t) len;
		(*count)++;
	}
	return errno == 0;
}

/*
 * Remove the imported files of the old jobs/ directory (its records and
 * left-over temporary files), then the directory.  A failure is logged
 * only: whatever is left is imported again at the next start, ahead of
 * the journal's newer records.
 */
static void
journal_remove_legacy(DIR *d, int dfd)
{
	struct dirent *de;

	rewinddir(d);
	while ((de = readdir(d)) != NULL)
	{
		size_t		len = strlen(de->d_name);

		if (journal_is_legacy_record(de->d_name) ||
			(de->d_name[0] == '.' && len > 4 && strcmp(de->d_name + len - 4, ".tmp") == 0))
			unlinkat(dfd, de->d_name, 0);
	}
	if (unlinkat(journal_statefd, JOURNAL_LEGACY_DIR, AT_REMOVEDIR) != 0 ||
		fsync(journal_statefd) != 0)
		log_msg("journal: cannot remove the imported %s/%s: %s",
				journal_state_dir, JOURNAL_LEGACY_DIR, strerror(errno));
}

/*
 * Write the imported records, then the journal's current content (newer),
 * to journal.tmp, fsync it, rename it over the journal and fsync the
 * directory.  *count receives the number of records imported.
 */
static bool
journal_import_into_new(DIR *d, int dfd, int *count)
{
	char	   *buf = malloc(JOURNAL_COPY_CHUNK);
	struct stat st;
	off_t		pos = 0;
	int			fd;
	bool		ok;

	fd = openat(journal_statefd, JOURNAL_TMP_NAME,
				O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
	ok = buf != NULL && fd >= 0 && journal_import_records(d, dfd, fd, &pos, count) &&
		fstat(journal_fd, &st) == 0 && journal_copy(journal_fd, fd, pos, 0, (size_t) st.st_size, buf) &&
		fsync(fd) == 0 &&
		renameat(journal_statefd, JOURNAL_TMP_NAME, journal_statefd, JOURNAL_NAME) == 0 &&
		fsync(journal_statefd) == 0;
	free(buf);
	if (!ok)
	{
		int			err = errno;

		if (fd >= 0)
			close(fd);
		unlinkat(journal_statefd, JOURNAL_TMP_NAME, 0);
		errno = err;
		return false;
	}
	close(journal_fd);
	journal_fd = fd;
	return true;
}

/*
 * Import the record files of the previous version (state_dir/jobs/) into
 * the journal, once, so that no id is forgotten across the upgrade; the
 * old files are removed once the journal holding them is on disk.
 * Returns false if the import could not be made durable: the agent then
 * refuses to start, the old files untouched.
 */
static bool
journal_import_legacy(void)
{
	int			dfd = openat(journal_statefd, JOURNAL_LEGACY_DIR,
							 O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
	DIR		   *d = dfd >= 0 ? fdopendir(dfd) : NULL;
	int			count = 0;

	if (dfd < 0 && errno == ENOENT)
		return true;
	if (d == NULL || !journal_import_into_new(d, dfd, &count))
	{
		log_msg("journal: cannot import the job records of %s/%s: %s",
				journal_state_dir, JOURNAL_LEGACY_DIR, strerror(errno));
		if (d != NULL)
			closedir(d);
		else if (dfd >= 0)
			close(dfd);
		return false;
	}
	log_msg("journal: imported %d job records of the previous version from %s/%s",
			count, journal_state_dir, JOURNAL_LEGACY_DIR);
	journal_remove_legacy(d, dfd);
	closedir(d);
	return true;
}

/*
 * Hand the loaded jobs over, in file order, in a new array (*jobs_out,
 * caller frees).  Returns their number, or -1 when memory runs out.
 */
static int
journal_collect(job ***jobs_out)
{
	journal_entry **v = journal_sorted();
	job		  **jobs = malloc((journal_nentries ? journal_nentries : 1) * sizeof(job *));
	int			n = 0;

	if (v == NULL || jobs == NULL)
	{
		free(v);
		free(jobs);
		return -1;
	}
	for (size_t i = 0; i < journal_nentries; i++)
	{
		if (v[i]->loaded != NULL)
			jobs[n++] = v[i]->loaded;
		v[i]->loaded = NULL;
	}
	free(v);
	*jobs_out = jobs;
	return n;
}

/*
 * Load every job of the journal (the last record of each id) into a new
 * array (*jobs_out, caller frees), after importing the previous version's
 * jobs/ directory if there is one; then compact the journal (if that
 * fails before its rename, the journal stays as it is and is still
 * valid).  Returns the number of jobs, or -1 (logged) when the agent must
 * not start.
 */
int
journal_load(job ***jobs_out, size_t output_tail)
{
	int			n;

	*jobs_out = NULL;
	if (!journal_import_legacy())
		return -1;
	if (!journal_read(output_tail))
	{
		journal_forget_all();
		return -1;
	}
	if (!journal_compact() && journal_failed != 0)
	{
		journal_forget_all();
		return -1;
	}
	if ((n = journal_collect(jobs_out)) < 0)
	{
		log_msg("journal: out of memory");
		journal_forget_all();
	}
	return n;
}

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
 * Create the state directory when missing (flushing its parent, so that it
 * survives a crash) and open it.
 */
static bool
journal_open_state_dir(const char *state_dir, char *errbuf, size_t errsize)
{
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
	journal_statefd = open(state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (journal_statefd < 0)
	{
		snprintf(errbuf, errsize, "cannot open state_dir \"%s\": %s", state_dir, strerror(errno));
		return false;
	}
	return true;
}

/*
 * Open the state directory (creating it when missing), take its lock file,
 * and open the journal file (creating it, and flushing the directory so
 * that it survives a crash).  A journal.tmp left by a compaction that a
 * crash interrupted is removed.
 */
bool
journal_open(const char *state_dir, char *errbuf, size_t errsize)
{
	struct stat st;

	if ((journal_state_dir = strdup(state_dir)) == NULL ||
		!journal_open_state_dir(state_dir, errbuf, errsize))
	{
		if (journal_state_dir == NULL)
			snprintf(errbuf, errsize, "out of memory");
		journal_close();
		return false;
	}
	journal_lockfd = openat(journal_statefd, "lock", O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (journal_lockfd < 0 || flock(journal_lockfd, LOCK_EX | LOCK_NB) != 0)
	{
		snprintf(errbuf, errsize, "cannot lock \"%s/lock\" (is another agent using it?): %s",
				 state_dir, strerror(errno));
		journal_close();
		return false;
	}
	journal_fd = openat(journal_statefd, JOURNAL_NAME, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (journal_fd < 0 || fstat(journal_fd, &st) != 0 || fsync(journal_statefd) != 0 ||
		!S_ISREG(st.st_mode))
	{
		snprintf(errbuf, errsize, "cannot open the journal \"%s/%s\": %s", state_dir, JOURNAL_NAME,
				 journal_fd >= 0 && !S_ISREG(st.st_mode) ? "not a regular file" : strerror(errno));
		journal_close();
		return false;
	}
	unlinkat(journal_statefd, JOURNAL_TMP_NAME, 0);
	journal_compact_at = JOURNAL_COMPACT_MIN;
	return true;
}

/*
 * Close the journal's descriptors (releasing the lock) and forget its
 * entries.
 */
void
journal_close(void)
{
	pthread_mutex_lock(&journal_lock);
	while (journal_compacting)
		pthread_cond_wait(&journal_cond, &journal_lock);
	pthread_mutex_unlock(&journal_lock);
	if (journal_fd >= 0)
		close(journal_fd);
	if (journal_statefd >= 0)
		close(journal_statefd);
	if (journal_lockfd >= 0)
		close(journal_lockfd);
	journal_fd = journal_statefd = journal_lockfd = -1;
	journal_forget_all();
	free(journal_removed);
	journal_removed = NULL;
	journal_nremoved = journal_removed_cap = 0;
	free(journal_state_dir);
	journal_state_dir = NULL;
}
