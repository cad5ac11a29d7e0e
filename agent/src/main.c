/*-------------------------------------------------------------------------
 *
 * main.c
 *	  Entry point of restart-agent: options, start-up and shutdown.
 *
 * Signals are blocked in every thread and handled synchronously here with
 * sigwait(), so no code runs in signal handlers.  On SIGTERM or SIGINT the
 * agent refuses new jobs, interrupts running steps (their jobs are
 * journaled as failed), stops the HTTP server and exits.
 *
 *-------------------------------------------------------------------------
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

/*
 * Print the usage text.
 */
static void
main_usage(FILE *out)
{
	fprintf(out,
			"Usage: restart-agent --config FILE [--check-config]\n"
			"\n"
			"Runs the allow-listed restart steps of services on signed HTTP requests\n"
			"(Standard Webhooks v1).  See docs/protocol.md for the protocol.\n"
			"\n"
			"Options:\n"
			"  -c, --config FILE    configuration file (libconfig syntax)\n"
			"  -n, --check-config   validate the configuration and the secrets file, then exit\n"
			"  -V, --version        print the version and exit\n"
			"  -h, --help           print this help and exit\n"
			"\n"
			"Secrets are read from the file named by secrets_file in the configuration;\n"
			"a relative name is looked up in $CREDENTIALS_DIRECTORY (systemd\n"
			"LoadCredential=) when set, else next to the configuration file.\n");
}

/*
 * Block the signals the main thread waits for, before any thread starts,
 * and ignore SIGPIPE (a client going away must not kill the agent) and
 * SIGXFSZ (a file size limit must make a journal write fail with EFBIG,
 * which the journal handles, rather than kill the agent).  SIGCHLD goes
 * back to the default if the agent's starter left it ignored: the kernel
 * would then reap every step as it exits, before the agent could read its
 * exit status, and the job would never end.
 */
static void
main_block_signals(sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGTERM);
	sigaddset(set, SIGINT);
	sigaddset(set, SIGHUP);
	pthread_sigmask(SIG_BLOCK, set, NULL);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGXFSZ, SIG_IGN);
	signal(SIGCHLD, SIG_DFL);
}

/*
 * Before the agent opens anything: make sure descriptors 0 to 2 are open,
 * on /dev/null if they were closed.  Otherwise its journal or a socket
 * could get one of their numbers, receive log lines written to stderr and
 * be mistaken for a step's stdin or stdout (spawn.c relies on this).
 */
static void
main_open_std_fds(void)
{
	int			fd;

	while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= 2)
		;
	if (fd > 2)
		close(fd);
}

/*
 * Once the configuration is read (it may name an inherited descriptor,
 * /dev/fd/N), close every descriptor the agent inherited above 2: one not
 * close-on-exec would reach every step.  Every descriptor the agent opens
 * itself is close-on-exec.  Without close_range (a kernel before 5.9, a
 * seccomp filter that refuses it) the open ones are listed in
 * /proc/self/fd, so that a high descriptor limit costs nothing.
 */
static void
main_close_inherited_fds(void)
{
	DIR		   *dir;
	struct dirent *de;

	if (close_range(3, ~0U, 0) == 0 || (dir = opendir("/proc/self/fd")) == NULL)
		return;
	while ((de = readdir(dir)) != NULL)
	{
		int			fd = atoi(de->d_name);

		if (fd > 2 && fd != dirfd(dir))
			close(fd);
	}
	closedir(dir);
}

/* Set once the journal has failed: the agent then stops with status 1. */
static volatile sig_atomic_t main_journal_failed;

/*
 * Called by journal.c when the journal fails (a failed fdatasync): from
 * then on no job can be accepted or finished, and only a restart that
 * reads the journal back can tell what is on disk.  Rather than stay up
 * answering 500 with its jobs stuck running, the agent stops as on
 * SIGTERM and exits with status 1, so that systemd (Restart=on-failure)
 * starts it again; the jobs that were running are then reported failed.
 */
static void
main_on_journal_failure(void)
{
	main_journal_failed = 1;
	kill(getpid(), SIGTERM);
}

/*
 * Wait for a termination signal.  SIGHUP is logged and ignored: secrets
 * and services are only read at start, so a restart applies changes.
 */
static void
main_wait_for_stop(const sigset_t *set)
{
	for (;;)
	{
		int			sig = 0;

		if (sigwait(set, &sig) != 0)
			continue;
		if (sig == SIGHUP)
		{
			log_msg("SIGHUP ignored: restart the agent to apply configuration or secret changes");
			continue;
		}
		if (main_journal_failed)
			log_msg("stopping: the journal failed; the agent exits with status 1 so that it is restarted and reads the journal back");
		else
			log_msg("received signal %d, stopping", sig);
		return;
	}
}

/*
 * Parse the command line.  Returns -1 if the agent is to go on with the
 * configuration file and mode found, or else the status to exit with
 * (after --version, --help or a usage error).
 */
static int
main_parse_args(int argc, char **argv, const char **config_path, bool *check_only)
{
	static const struct option opts[] = {
		{"config", required_argument, NULL, 'c'},
		{"check-config", no_argument, NULL, 'n'},
		{"version", no_argument, NULL, 'V'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0}
	};
	int			c;

	while ((c = getopt_long(argc, argv, "c:nVh", opts, NULL)) != -1)
	{
		switch (c)
		{
			case 'c':
				*config_path = optarg;
				break;
			case 'n':
				*check_only = true;
				break;
			case 'V':
				printf("restart-agent %s\n", AGENT_VERSION);
				return 0;
			case 'h':
				main_usage(stdout);
				return 0;
			default:
				main_usage(stderr);
				return 2;
		}
	}
	if (*config_path == NULL || optind != argc)
	{
		main_usage(stderr);
		return 2;
	}
	return -1;
}

/*
 * Load the configuration and check that OpenSSL can sign with each
 * secret.  The descriptors the agent inherited are closed in between:
 * after the configuration is read (it may name one), before OpenSSL is
 * first used (a provider or its random source may open a descriptor and
 * keep it).  Returns NULL, the reason logged, if the agent cannot start.
 */
static agent_config *
main_load_config(const char *path)
{
	char		err[1024];
	agent_config *cfg;

	if ((cfg = config_load(path, err, sizeof(err))) == NULL)
	{
		log_msg("configuration error: %s", err);
		return NULL;
	}
	main_close_inherited_fds();
	if (!verify_check_secrets(cfg->secrets, cfg->nsecrets, err, sizeof(err)))
	{
		log_msg("cannot start: %s", err);
		config_free(cfg);
		return NULL;
	}
	return cfg;
}

/*
 * Start the journal and job table (reading the journal back) and the HTTP
 * server.  Returns false, the reason logged, if one of them cannot start;
 * threads they started may still use cfg.
 */
static bool
main_start(agent_config *cfg)
{
	char		err[1024];

	journal_on_failure(main_on_journal_failure);
	if (!jobs_init(cfg, err, sizeof(err)) || !http_start(cfg, err, sizeof(err)))
	{
		log_msg("cannot start: %s", err);
		return false;
	}
	return true;
}

/*
 * Parse options, load the configuration, start the journal, the job table
 * and the HTTP server, and run until told to stop.
 */
int
main(int argc, char **argv)
{
	const char *config_path = NULL;
	bool		check_only = false;
	agent_config *cfg;
	sigset_t	set;
	int			status;

	main_open_std_fds();
	if ((status = main_parse_args(argc, argv, &config_path, &check_only)) >= 0)
		return status;
	umask(077);
	util_json_init();
	main_block_signals(&set);
	if ((cfg = main_load_config(config_path)) == NULL)
		return 1;
	if (check_only)
	{
		printf("%s: configuration ok (%d service(s), %d secret(s))\n",
			   config_path, cfg->nservices, cfg->nsecrets);
		config_free(cfg);
		return 0;
	}
	if (!spawn_init())
	{
		log_msg("cannot start: cannot open /dev/null or an event descriptor: %s", strerror(errno));
		config_free(cfg);
		return 1;
	}
	if (!main_start(cfg))
		return 1;
	log_msg("restart-agent %s started: %d service(s), %d secret(s), state in %s",
			AGENT_VERSION, cfg->nservices, cfg->nsecrets, cfg->state_dir);
	main_wait_for_stop(&set);
	jobs_shutdown();
	http_stop();
	jobs_cleanup();
	config_free(cfg);
	log_msg("restart-agent stopped%s", main_journal_failed ? " (the journal failed)" : "");
	return main_journal_failed ? 1 : 0;
}
