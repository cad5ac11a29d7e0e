/*-------------------------------------------------------------------------
 *
 * spawn.c
 *	  Running one step: vfork and execve with a fixed argv, never a shell.
 *
 * The step gets a minimal environment, stdin from /dev/null, stdout and
 * stderr on one pipe, its own session (so also its own process group) and
 * a clean signal state.  On timeout (or agent shutdown) every process of
 * the step's session gets SIGTERM, then SIGKILL after the grace period.
 * When the step's own process exits, whatever it left in its session is
 * killed, and the pipe is drained only for a short while, so a background
 * child holding the pipe cannot hang a job.
 *
 * The session, not the process group, is what is tracked: a descendant
 * may move to another process group (setpgid) but can only leave the
 * session by starting its own (setsid), which is how a program that must
 * outlive its step detaches.  Members are found by scanning /proc; the
 * step's process is reaped only at the very end, so its id (the session
 * id) cannot be reused meanwhile.  The scan, which runs after every step,
 * asks each listed process for its session with getsid(), one cheap
 * system call, and reads /proc/<pid>/stat (costly for the kernel to
 * render) only for members of the session, to skip zombies: after a step
 * that left nothing behind, only its own zombie process.  Steps that end
 * together share one scan (spawn_sweep()): with many jobs running, a scan
 * per step end read /proc more often than anything else the agent did.
 *
 * Most steps leave nothing behind, and the scan is skipped when the agent
 * can tell so without it: the agent is a child subreaper, so whatever a
 * step's program leaves when it exits is handed to the agent's main thread
 * (the topmost survivor of each line of descendants is; every process of a
 * session descends from its leader).  If the main thread has no live
 * child, nothing is left of any step (see spawn_left_nothing()).  A
 * program that detached (setsid) also becomes the agent's child, so with
 * one running every step end is followed by a scan, as before; such
 * children, and the processes a scan killed, are reaped at the next step
 * end.
 *
 * A step may be followed by more than one thread: the connection thread of
 * a POST with ?wait starts and follows it until its wait is over, then
 * hands it to a runner thread (jobs.c).  The step's process is the child
 * of the thread that started it, and if that thread ends first (its
 * connection closed), the process is handed to the main thread, whose
 * children are read above.  The steps being followed are therefore listed
 * (spawn_tracked): such a process is neither something a step left behind
 * nor a zombie to reap there; only the thread following its step reaps it.
 *
 *-------------------------------------------------------------------------
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"

#define SPAWN_DRAIN_MSEC 1000
#define SPAWN_TICK_MSEC 100
#define SPAWN_KILL_ROUNDS 50
#define SPAWN_READS_PER_WAKE 8	/* 128 KiB of output between looks at deadlines */
#define SPAWN_DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static int	spawn_stop_fd = -1;
static int	spawn_devnull_fd = -1;	/* the steps' stdin */
static int	spawn_nondefault[NSIG];	/* signals to set back in a step */
static int	spawn_nondefault_n;
static bool spawn_subreaper = false;	/* orphans of steps come to the agent */
static char spawn_children_path[64];	/* the main thread's children */

/*
 * Held while the main thread's children are read and reaped: the kernel
 * lists them one at a time, and a child reaped by another runner during
 * the read would shift the rest of the list, so that the next one (maybe
 * alive) was skipped.
 */
static pthread_mutex_t spawn_children_lock = PTHREAD_MUTEX_INITIALIZER;

/* Processes of the steps being followed, under spawn_children_lock. */
static pid_t *spawn_tracked;
static int	spawn_tracked_n;
static int	spawn_tracked_cap;

/*
 * Sessions of steps whose program exited, waiting to be emptied by the
 * next sweep; a runner thread that finds no sweep running leads one for
 * every session waiting then (see spawn_sweep()).
 */
static pthread_mutex_t spawn_sweep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t spawn_sweep_cond = PTHREAD_COND_INITIALIZER;
static pid_t *spawn_sweep_sids;
static int	spawn_sweep_n;
static int	spawn_sweep_cap;
static bool spawn_sweeping;
static uint64_t spawn_sweep_next = 1;	/* the batch new sessions join */
static uint64_t spawn_sweep_done;	/* the last batch swept */

struct spawn_state
{
	spawn_result res;			/* filled in as the step goes on */
	pid_t		pid;
	int			outfd;
	int			pidfd;
	bool		exited;
	bool		term_sent;
	bool		kill_sent;
	int64_t		deadline;		/* step timeout */
	int64_t		kill_at;		/* SIGKILL after grace */
	int64_t		sweep_at;		/* empty the session then, or 0 */
	int64_t		drain_until;	/* stop reading after exit */
	int			kill_grace_ms;
};

/*
 * Note the signals whose disposition is not the default: those the agent
 * ignores (SIGPIPE, SIGXFSZ), and those ignored by whatever started it
 * (nohup, a shell's trap), which it inherited.  An exec keeps a signal
 * ignored, so the steps' child sets these back (see spawn_child()).  The
 * agent changes no disposition after this.  glibc's own signals cannot be
 * asked about (sigaction fails): an exec resets their handlers.
 */
static void
spawn_note_signals(void)
{
	for (int sig = 1; sig < NSIG; sig++)
	{
		struct sigaction sa;

		if (sig != SIGKILL && sig != SIGSTOP &&
			sigaction(sig, NULL, &sa) == 0 && sa.sa_handler != SIG_DFL &&
			spawn_nondefault_n < (int) (sizeof(spawn_nondefault) / sizeof(int)))
			spawn_nondefault[spawn_nondefault_n++] = sig;
	}
}

/*
 * Open /dev/null for the steps' stdin, note the signals to set back in
 * them, and create the event descriptor through which a shutdown
 * interrupts running steps.  Returns false, with errno set, if a
 * descriptor cannot be opened.
 */
bool
spawn_init(void)
{
	spawn_devnull_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (spawn_devnull_fd < 0)
		return false;
	spawn_note_signals();
	spawn_stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (spawn_stop_fd < 0)
	{
		int			err = errno;

		close(spawn_devnull_fd);
		spawn_devnull_fd = -1;
		errno = err;
		return false;
	}
	spawn_subreaper = prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0;
	snprintf(spawn_children_path, sizeof(spawn_children_path),
			 "/proc/self/task/%d/children", (int) getpid());
	return true;
}

/*
 * Whether pid is the process of a step being followed; caller holds
 * spawn_children_lock.  The list is as long as the steps running at once.
 */
static bool
spawn_is_tracked(pid_t pid)
{
	for (int i = 0; i < spawn_tracked_n; i++)
		if (spawn_tracked[i] == pid)
			return true;
	return false;
}

/*
 * Make room in the list for a step about to start, as an entry 0 that
 * spawn_track() fills in once its process exists; false if memory ran out
 * (the step is then not started).
 */
static bool
spawn_track_reserve(void)
{
	bool		ok = true;

	pthread_mutex_lock(&spawn_children_lock);
	if (spawn_tracked_n == spawn_tracked_cap)
	{
		int			cap = spawn_tracked_cap ? spawn_tracked_cap * 2 : 64;
		pid_t	   *p = realloc(spawn_tracked, (size_t) cap * sizeof(pid_t));

		if (p != NULL)
		{
			spawn_tracked = p;
			spawn_tracked_cap = cap;
		}
		ok = p != NULL;
	}
	if (ok)
		spawn_tracked[spawn_tracked_n++] = 0;
	pthread_mutex_unlock(&spawn_children_lock);
	return ok;
}

/*
 * List the process of a step just started, in an entry reserved for it.
 */
static void
spawn_track(pid_t pid)
{
	pthread_mutex_lock(&spawn_children_lock);
	for (int i = 0; i < spawn_tracked_n; i++)
		if (spawn_tracked[i] == 0)
		{
			spawn_tracked[i] = pid;
			break;
		}
	pthread_mutex_unlock(&spawn_children_lock);
}

/*
 * Remove a step's process from the list once it is reaped (or the entry
 * reserved for a step that could not start, pid 0).  Until then its pid
 * cannot be reused, so the list never names another process.
 */
static void
spawn_untrack(pid_t pid)
{
	pthread_mutex_lock(&spawn_children_lock);
	for (int i = 0; i < spawn_tracked_n; i++)
		if (spawn_tracked[i] == pid)
		{
			spawn_tracked[i] = spawn_tracked[--spawn_tracked_n];
			break;
		}
	pthread_mutex_unlock(&spawn_children_lock);
}

/*
 * Read the main thread's children and reap those that are zombies; true if
 * none is alive, false if one is or the list cannot be read whole.  Caller
 * holds spawn_children_lock.
 */
static bool
spawn_children_gone(void)
{
	char		buf[4096];
	ssize_t		n;
	int			fd;
	bool		none = true;

	if ((fd = open(spawn_children_path, O_RDONLY | O_CLOEXEC)) < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n < 0 || n == (ssize_t) sizeof(buf) - 1)
		return false;
	buf[n] = '\0';
	for (char *p = buf, *end;; p = end)
	{
		long		pid = strtol(p, &end, 10);

		if (end == p)
			break;
		if (pid <= 0 || spawn_is_tracked((pid_t) pid))
			continue;
		if (waitpid((pid_t) pid, NULL, WNOHANG) == 0)
			none = false;		/* alive: the scan decides whose it is */
	}
	return none;
}

/*
 * Whether no process that a step left behind is alive: the agent's main
 * thread, which the orphans of steps are handed to (see the head comment;
 * it starts no process itself), has no live child.  Its children that are
 * zombies are reaped on the way.  Returns false when that cannot be told
 * (not a subreaper, no such file in /proc, too many children to read at
 * once): the caller then scans /proc.  Called once a step's program has
 * exited, when its orphans have already been handed over.
 */
static bool
spawn_left_nothing(void)
{
	bool		none;

	if (!spawn_subreaper)
		return false;
	pthread_mutex_lock(&spawn_children_lock);
	none = spawn_children_gone();
	pthread_mutex_unlock(&spawn_children_lock);
	return none;
}

/*
 * Ask every running step to stop (agent shutdown).  The eventfd stays
 * readable, so steps started later see it too.
 */
void
spawn_request_stop(void)
{
	uint64_t	one = 1;

	if (spawn_stop_fd >= 0 && write(spawn_stop_fd, &one, sizeof(one)) < 0)
		log_msg("cannot signal the step runners: %s", strerror(errno));
}

/*
 * Add "name=value" to envp unless a variable of that name is already
 * there (the step's own env entries are added first, so they win).
 * Returns false if memory ran out (nothing was added).
 */
static bool
spawn_env_add(char **envp, int *n, const char *name, const char *value)
{
	size_t		nlen = strlen(name);
	size_t		len;

	for (int i = 0; i < *n; i++)
		if (strncmp(envp[i], name, nlen) == 0 && envp[i][nlen] == '=')
			return true;
	len = nlen + strlen(value) + 2;
	envp[*n] = malloc(len);
	if (envp[*n] == NULL)
		return false;
	snprintf(envp[*n], len, "%s=%s", name, value);
	(*n)++;
	return true;
}

/*
 * Free an environment built by spawn_build_env(), or built in part.
 */
static void
spawn_free_env(char **envp)
{
	for (int i = 0; envp && envp[i]; i++)
		free(envp[i]);
	free(envp);
}

/*
 * Build the step's environment: its configured variables, then PATH, LANG
 * and the request id and service name.  Nothing is inherited from the
 * agent's own environment.  NULL if memory ran out for any variable: a
 * step never runs with one left out.
 */
static char **
spawn_build_env(const config_step *step, const char *request_id, const char *service)
{
	char	  **envp = calloc(step->nenv + 5, sizeof(char *));
	int			n = 0;
	bool		ok = true;

	if (envp == NULL)
		return NULL;
	for (int i = 0; ok && i < step->nenv; i++)
		ok = spawn_env_add(envp, &n, step->env[i].name, step->env[i].value);
	ok = ok && spawn_env_add(envp, &n, "PATH", SPAWN_DEFAULT_PATH) &&
		spawn_env_add(envp, &n, "LANG", "C.UTF-8") &&
		spawn_env_add(envp, &n, "RESTART_AGENT_REQUEST_ID", request_id) &&
		spawn_env_add(envp, &n, "RESTART_AGENT_SERVICE", service);
	if (!ok)
	{
		spawn_free_env(envp);
		return NULL;
	}
	return envp;
}

/*
 * The child's side of spawn_start(), between vfork() and execve(): give
 * the step its session, descriptors, working directory and signal state,
 * and exec its program.  Until the exec the child shares the agent's
 * memory and runs on the stack of the thread that called vfork(), which is
 * suspended meanwhile: only system calls here, no allocation, no lock.  If
 * a call fails, its errno is left in *err and the child exits with 127.
 *
 * The agent installs no signal handler; the signals it or its starter
 * ignored, which an exec would keep ignored, are set back to the default
 * (see spawn_note_signals()).  The mask inherited from the agent's thread,
 * every signal blocked (see spawn_start()), is emptied last.
 *
 * Descriptors 0 to 2 of the agent are always open, and every other one is
 * close-on-exec or was closed at start (see main.c), so outfd and
 * spawn_devnull_fd are above 2, and the close_range() is a second guard:
 * where the kernel lacks it (or a seccomp filter refuses it with an
 * error), the step starts all the same.
 */
static void
__attribute__((noinline, noreturn))
spawn_child(const config_step *step, char **envp, int outfd, volatile int *err)
{
	struct sigaction dfl;
	sigset_t	none;
	int			i;

	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	sigemptyset(&none);
	for (i = 0; i < spawn_nondefault_n; i++)
		if (sigaction(spawn_nondefault[i], &dfl, NULL) != 0)
			break;
	if (i == spawn_nondefault_n &&
		setsid() >= 0 &&
		dup2(spawn_devnull_fd, 0) == 0 &&
		dup2(outfd, 1) == 1 &&
		dup2(outfd, 2) == 2)
	{
		(void) close_range(3, ~0U, 0);	/* a second guard: see above */
		if (chdir(step->cwd) == 0 &&
			sigprocmask(SIG_SETMASK, &none, NULL) == 0)
			execve(step->argv[0], step->argv, envp);
	}
	*err = errno != 0 ? errno : ECHILD;
	_exit(127);
}

/*
 * Start the step's program: own session, default signal dispositions,
 * empty signal mask, stdin /dev/null, stdout+stderr to outfd, working
 * directory cwd, every other descriptor closed.  Returns 0 or an errno
 * value (of the exec, for a program that cannot be run).
 *
 * vfork() rather than posix_spawn(): glibc's posix_spawn maps and unmaps a
 * stack for the child and, with the signals it must reset unknown to it,
 * asks the kernel about every one of them, 64 sigaction calls a step; the
 * agent knows which it changed (docs/benchmarks.md, thirteenth round, has
 * the difference).  Every signal that can be blocked is blocked around the
 * vfork() (glibc keeps its own two deliverable; the agent neither cancels
 * threads nor changes its ids, which is what sends them), so that no
 * signal reaches the child before its exec but through the default
 * disposition, and no handler can run on the memory it shares.
 */
static int
spawn_start(const config_step *step, char **envp, int outfd, pid_t *pid)
{
	volatile int err = 0;
	sigset_t	all;
	sigset_t	old;
	pid_t		child;
	int			fork_errno;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	child = vfork();
	if (child == 0)
		spawn_child(step, envp, outfd, &err);
	fork_errno = errno;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (child < 0)
		return fork_errno;
	if (err != 0)
	{
		/* the child has exited already: reap it */
		while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
			;
		return err;
	}
	*pid = child;
	return 0;
}

/*
 * Read the session id and state of process pid from /proc/<pid>/stat.
 * Returns false if the process is gone or the file cannot be parsed.
 */
static bool
spawn_proc_session(pid_t pid, pid_t *sid, char *state)
{
	char		path[64];
	char		buf[512];
	char	   *p;
	int			fd;
	ssize_t		n;
	int			ppid;
	int			pgrp;
	int			session;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int) pid);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return false;
	buf[n] = '\0';
	/* the command name may hold anything: parse after its last ')' */
	if ((p = strrchr(buf, ')')) == NULL ||
		sscanf(p + 1, " %c %d %d %d", state, &ppid, &pgrp, &session) != 4)
		return false;
	*sid = (pid_t) session;
	return true;
}

/*
 * Send sig to process pid if it is a live member of session sid.  The
 * process is pinned with a pidfd before its session is checked, so a
 * recycled pid cannot be signalled by mistake.  Returns true if a signal
 * was sent.
 */
static bool
spawn_signal_member(pid_t pid, pid_t sid, int sig)
{
	int			pidfd = (int) syscall(SYS_pidfd_open, pid, 0);
	pid_t		s;
	char		state;
	bool		sent = false;

	if (pidfd < 0)
		return false;
	if (spawn_proc_session(pid, &s, &state) && s == sid && state != 'Z')
		sent = syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0) == 0;
	close(pidfd);
	return sent;
}

/*
 * The session of process pid, in *sid.  getsid() reports it without the
 * cost of rendering /proc/<pid>/stat; only if it is refused (a security
 * module may) is the file read.  Returns false if the process is gone.
 */
static bool
spawn_session_of(pid_t pid, pid_t *sid)
{
	char		state;

	if ((*sid = getsid(pid)) >= 0)
		return true;
	if (errno == ESRCH)
		return false;
	return spawn_proc_session(pid, sid, &state);
}

/*
 * qsort and bsearch comparator of session ids.
 */
static int
spawn_sid_cmp(const void *a, const void *b)
{
	pid_t		x = *(const pid_t *) a;
	pid_t		y = *(const pid_t *) b;

	return (x > y) - (x < y);
}

/*
 * Send sig to every live process of the n sessions in sids (sorted), with
 * one listing of /proc for all of them; returns how many got it.
 */
static int
spawn_signal_sessions_once(const pid_t *sids, int n, int sig)
{
	DIR		   *d = opendir("/proc");
	struct dirent *de;
	int			count = 0;

	if (d == NULL)
	{
		log_msg("cannot scan /proc for the steps' processes: %s", strerror(errno));
		return 0;
	}
	while ((de = readdir(d)) != NULL)
	{
		pid_t		pid;
		pid_t		sid;

		if (!isdigit((unsigned char) de->d_name[0]))
			continue;
		pid = (pid_t) atoi(de->d_name);
		if (spawn_session_of(pid, &sid) &&
			bsearch(&sid, sids, n, sizeof(pid_t), spawn_sid_cmp) != NULL)
			count += spawn_signal_member(pid, sid, sig);
	}
	closedir(d);
	return count;
}

/*
 * Signal every process of the n sessions in sids: each step's process (the
 * session leader, kept as a zombie until the step is over) and everything
 * it started that did not start a session of its own, whatever process
 * group it moved to.  For SIGKILL, repeat until no member is left (a
 * member may fork while the list is read), within SPAWN_KILL_ROUNDS.
 */
static void
spawn_signal_sessions(pid_t *sids, int n, int sig)
{
	qsort(sids, n, sizeof(pid_t), spawn_sid_cmp);
	for (int round = 0; round < SPAWN_KILL_ROUNDS; round++)
	{
		if (spawn_signal_sessions_once(sids, n, sig) == 0 || sig != SIGKILL)
			return;
		usleep(2000);			/* let the killed ones die */
	}
	log_msg("processes of %d step session(s) keep appearing after %d rounds of SIGKILL",
			n, SPAWN_KILL_ROUNDS);
}

/*
 * Signal every process of the step's session sid (see
 * spawn_signal_sessions()).
 */
static void
spawn_signal_session(pid_t sid, int sig)
{
	spawn_signal_sessions(&sid, 1, sig);
}

/*
 * Kill whatever a step whose program exited left in its session sid, and
 * return once that is done.  Runners whose steps end at about the same
 * time share the work, as writers share a flush in journal.c: the session
 * joins the next batch, and a runner that finds no sweep running sweeps
 * every session waiting, in one scan of /proc per round.  If memory runs
 * out, the session is swept alone.
 */
static void
spawn_sweep(pid_t sid)
{
	uint64_t	batch;

	pthread_mutex_lock(&spawn_sweep_lock);
	if (spawn_sweep_n == spawn_sweep_cap)
	{
		int			cap = spawn_sweep_cap ? spawn_sweep_cap * 2 : 64;
		pid_t	   *p = realloc(spawn_sweep_sids, (size_t) cap * sizeof(pid_t));

		if (p == NULL)
		{
			pthread_mutex_unlock(&spawn_sweep_lock);
			spawn_signal_sessions(&sid, 1, SIGKILL);
			return;
		}
		spawn_sweep_sids = p;
		spawn_sweep_cap = cap;
	}
	spawn_sweep_sids[spawn_sweep_n++] = sid;
	batch = spawn_sweep_next;
	while (spawn_sweep_done < batch)
	{
		if (spawn_sweeping)
		{
			pthread_cond_wait(&spawn_sweep_cond, &spawn_sweep_lock);
			continue;
		}
		spawn_sweeping = true;
		spawn_sweep_next++;
		{
			/* take the batch over; later sessions start a new array */
			int			n = spawn_sweep_n;
			pid_t	   *sids = spawn_sweep_sids;

			spawn_sweep_sids = NULL;
			spawn_sweep_n = spawn_sweep_cap = 0;
			pthread_mutex_unlock(&spawn_sweep_lock);
			spawn_signal_sessions(sids, n, SIGKILL);
			free(sids);
			pthread_mutex_lock(&spawn_sweep_lock);
		}
		spawn_sweeping = false;
		spawn_sweep_done = batch;
		pthread_cond_broadcast(&spawn_sweep_cond);
	}
	pthread_mutex_unlock(&spawn_sweep_lock);
}

/*
 * Read what the pipe holds, up to SPAWN_READS_PER_WAKE reads, and pass it
 * on; close it at end of file.  The bound returns to the caller's loop,
 * which checks the step's deadlines, however fast the step's processes
 * fill the pipe.
 */
static void
spawn_read_output(spawn_state *st, spawn_output_cb out, void *arg)
{
	char		buf[16384];

	for (int reads = 0; reads < SPAWN_READS_PER_WAKE; reads++)
	{
		ssize_t		n = read(st->outfd, buf, sizeof(buf));

		if (n > 0)
		{
			out(arg, buf, (size_t) n);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0 || (n < 0 && errno != EAGAIN))
		{
			close(st->outfd);
			st->outfd = -1;
		}
		return;
	}
}

/*
 * Check, without reaping, whether the step's process has exited and record
 * how.  The zombie keeps the session id reserved, so the session can
 * still be signalled safely afterwards.
 */
static void
spawn_check_exit(spawn_state *st, spawn_result *res)
{
	siginfo_t	si;

	if (st->exited)
		return;
	memset(&si, 0, sizeof(si));
	if (waitid(P_PID, st->pid, &si, WEXITED | WNOHANG | WNOWAIT) != 0 ||
		si.si_pid != st->pid)
		return;
	st->exited = true;
	if (si.si_code == CLD_EXITED)
		res->exit_code = si.si_status;
	else
		res->signal = si.si_status;

	/*
	 * Kill anything the step left behind in its session: at once, or, if
	 * the session was told to stop (SIGTERM), once its grace period is over,
	 * so that what it left can stop cleanly meanwhile.
	 */
	if (st->term_sent && !st->kill_sent)
		st->sweep_at = st->kill_at;
	else if (!spawn_left_nothing())
		spawn_sweep(st->pid);
	st->drain_until = util_monotonic_msec() + SPAWN_DRAIN_MSEC;
}

/*
 * After a step's program exited on SIGTERM: return true once nothing of
 * its session is left, or its grace period is over and what was left got
 * SIGKILL.  Called at every turn of the wait, at least every tick.
 */
static bool
spawn_grace_over(spawn_state *st)
{
	bool		over;

	if (st->sweep_at == 0)
		return true;
	over = util_monotonic_msec() >= st->sweep_at;
	if (!over && !spawn_left_nothing())
		return false;
	if (over)
		spawn_sweep(st->pid);
	st->sweep_at = 0;
	return true;
}

/*
 * Send SIGTERM, then SIGKILL after the grace period, to the step's session
 * once its deadline has passed or the agent is shutting down.
 */
static void
spawn_enforce_deadline(spawn_state *st, spawn_result *res, bool stop)
{
	int64_t		now = util_monotonic_msec();

	if (!st->term_sent && (now >= st->deadline || stop))
	{
		if (stop)
			res->interrupted = true;
		else
			res->timed_out = true;
		spawn_signal_session(st->pid, SIGTERM);
		st->term_sent = true;
		st->kill_at = now + st->kill_grace_ms;
	}
	else if (st->term_sent && !st->kill_sent && now >= st->kill_at)
	{
		spawn_signal_session(st->pid, SIGKILL);
		st->kill_sent = true;
	}
}

/*
 * Compute how long the next poll may sleep, in milliseconds: until the
 * step's next deadline, or until, whichever comes first.
 */
static int
spawn_poll_timeout(const spawn_state *st, int64_t until_caller)
{
	int64_t		now = util_monotonic_msec();
	int64_t		until;

	if (st->exited && st->sweep_at != 0)
		until = st->sweep_at < now + SPAWN_TICK_MSEC ? st->sweep_at : now + SPAWN_TICK_MSEC;
	else if (st->exited)
		until = st->drain_until;
	else if (!st->term_sent)
		until = st->deadline;
	else if (!st->kill_sent)
		until = st->kill_at;
	else
		until = now + SPAWN_TICK_MSEC;
	if (st->pidfd < 0 && !st->exited && until > now + SPAWN_TICK_MSEC)
		until = now + SPAWN_TICK_MSEC;
	if (until > until_caller)
		until = until_caller;
	return until <= now ? 0 : (int) (until - now);
}

/*
 * Wait for output, the step's exit, the deadlines or a shutdown, until the
 * step has exited and the pipe is closed or the drain time is over (true),
 * or until the monotonic time until (in ms) has passed (false).
 */
static bool
spawn_wait(spawn_state *st, spawn_output_cb out, void *arg, int64_t until)
{
	spawn_result *res = &st->res;

	for (;;)
	{
		struct pollfd fds[3];
		int			nfds = 0;
		int			stop_idx = -1;
		bool		stop = false;

		spawn_check_exit(st, res);
		if (st->exited && spawn_grace_over(st) &&
			(st->outfd < 0 || util_monotonic_msec() >= st->drain_until))
			return true;
		if (util_monotonic_msec() >= until)
			return false;
		if (st->outfd >= 0)
			fds[nfds++] = (struct pollfd) {st->outfd, POLLIN, 0};
		if (!st->exited && st->pidfd >= 0)
			fds[nfds++] = (struct pollfd) {st->pidfd, POLLIN, 0};
		if (!st->exited && !st->term_sent)
		{
			stop_idx = nfds;
			fds[nfds++] = (struct pollfd) {spawn_stop_fd, POLLIN, 0};
		}
		if (poll(fds, nfds, spawn_poll_timeout(st, until)) < 0 && errno != EINTR)
		{
			log_msg("poll failed while running a step: %s", strerror(errno));
			spawn_signal_session(st->pid, SIGKILL);
			return true;
		}
		if (st->outfd >= 0 && fds[0].revents != 0)
			spawn_read_output(st, out, arg);
		stop = stop_idx >= 0 && fds[stop_idx].revents != 0;
		if (!st->exited)
			spawn_enforce_deadline(st, res, stop);
	}
}

/*
 * Start one step.  Returns its state, to be followed with
 * spawn_continue(); or NULL if its program could not be started, with the
 * reason in res.
 */
spawn_state *
spawn_begin(const config_step *step, const char *request_id, const char *service,
			int kill_grace, spawn_result *res)
{
	spawn_state *st = calloc(1, sizeof(spawn_state));
	char	  **envp = spawn_build_env(step, request_id, service);
	int			pipefd[2] = {-1, -1};

	memset(res, 0, sizeof(*res));
	res->exit_code = -1;
	if (st == NULL || envp == NULL || !spawn_track_reserve())
		res->spawn_errno = ENOMEM;
	else if (pipe2(pipefd, O_CLOEXEC) != 0)
	{
		res->spawn_errno = errno;
		spawn_untrack(0);
	}
	else
	{
		res->spawn_errno = spawn_start(step, envp, pipefd[1], &st->pid);
		close(pipefd[1]);
		if (res->spawn_errno != 0)
		{
			spawn_untrack(0);
			close(pipefd[0]);
		}
	}
	spawn_free_env(envp);
	if (res->spawn_errno != 0)
	{
		free(st);
		return NULL;
	}
	st->res = *res;
	spawn_track(st->pid);
	fcntl(pipefd[0], F_SETFL, O_NONBLOCK);
	st->outfd = pipefd[0];
	st->pidfd = (int) syscall(SYS_pidfd_open, st->pid, 0);
	st->deadline = util_monotonic_msec() + (int64_t) step->timeout * 1000;
	st->kill_grace_ms = kill_grace * 1000;
	return st;
}

/*
 * Follow a step started by spawn_begin() until it is over, or until the
 * monotonic time until (ms; SPAWN_FOREVER for no limit) has passed.  Once
 * it is over, its process is reaped, the state freed, res filled in, and
 * true returned; otherwise any thread may go on with it.  The output
 * callback gets every chunk the step writes, in the calling thread.
 */
bool
spawn_continue(spawn_state *st, spawn_output_cb out, void *arg, int64_t until,
			   spawn_result *res)
{
	int			status;

	if (!spawn_wait(st, out, arg, until))
		return false;
	if (st->outfd >= 0)
		close(st->outfd);
	if (st->pidfd >= 0)
		close(st->pidfd);
	while (waitpid(st->pid, &status, 0) < 0 && errno == EINTR)
		;
	spawn_untrack(st->pid);		/* only now: its pid cannot be reused before */
	*res = st->res;
	free(st);
	return true;
}
