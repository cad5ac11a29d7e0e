/*-------------------------------------------------------------------------
 *
 * agent.h
 *	  Shared declarations of the restart agent.
 *
 * The agent receives signed HTTP requests (Standard Webhooks v1), journals
 * each request id durably and runs the allow-listed steps of a service.
 * Each module below lives in its own file under agent/src/; the request
 * path is http.c -> verify.c -> request.c -> jobs.c -> journal.c ->
 * spawn.c, with report.c rendering the answers.
 *
 *-------------------------------------------------------------------------
 */
#ifndef AGENT_H
#define AGENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <jansson.h>

#define AGENT_VERSION "1.1.6"

#define UUID_TEXT_LEN 36
#define SERVICE_NAME_MAX 64
#define REQUESTED_AT_MAX 64
#define SECRET_KEY_MIN 24
#define SECRET_KEY_MAX 64
#define SECRETS_MAX 16
#define SIGNATURE_HEADER_MAX 1024
#define SIGNATURES_MAX 8
#define WEBHOOK_ID_MAX 255
#define TIMESTAMP_TOLERANCE 300

/*
 * Bounds that make the largest job record fit the journal's record size
 * limit: a control byte of output is written as "\u0001" (6 bytes), so
 * the output tail, the step argvs and the error can grow sixfold in JSON.
 * The journal writes no record over JOURNAL_RECORD_MAX, and reads back
 * a record line over JOURNAL_FILE_MAX (the limit of the previous version's
 * record files) as damaged, without loading it.
 */
#define OUTPUT_TAIL_MAX (1024 * 1024)
#define STEPS_MAX 32
#define STEP_ARGV_BYTES_MAX 4096
#define JOURNAL_FILE_MAX (64 * 1024 * 1024)
#define JOURNAL_RECORD_MAX \
	(6 * (OUTPUT_TAIL_MAX + STEPS_MAX * (STEP_ARGV_BYTES_MAX + 512) + 4096) + 65536)
_Static_assert(JOURNAL_RECORD_MAX < JOURNAL_FILE_MAX,
			   "the largest job record must fit the journal's record size limit");

/* ---------- log.c ---------- */
extern void log_msg(const char *fmt,...) __attribute__((format(printf, 1, 2)));
extern void log_sanitize(const char *in, size_t inlen, char *out, size_t outsize);

/* ---------- util.c ---------- */
extern int64_t util_now_usec(void);
extern int64_t util_monotonic_msec(void);
extern void util_deadline(struct timespec *ts, clockid_t clock, int64_t ms);
extern void util_format_time(int64_t usec, char *buf, size_t bufsize);
extern bool util_parse_time(const char *text, int64_t *usec);
extern bool util_is_uuid(const char *text, size_t len);
extern bool util_parse_digits(const char *text, size_t max_len, int64_t *value);
extern bool util_is_rfc3339(const char *text);
extern void util_json_init(void);
extern unsigned util_json_failures(void);

/* ---------- verify.c ---------- */
typedef struct verify_secret
{
	unsigned char key[SECRET_KEY_MAX];
	size_t		keylen;
} verify_secret;

typedef enum verify_result
{
	VERIFY_OK = 0,
	VERIFY_MISSING_HEADER,
	VERIFY_BAD_ID,
	VERIFY_BAD_TIMESTAMP,
	VERIFY_STALE_TIMESTAMP,
	VERIFY_BAD_SIGNATURE_HEADER,
	VERIFY_NO_MATCH,
	VERIFY_NOMEM				/* a MAC could not be computed (memory) */
} verify_result;

extern bool verify_parse_secret(const char *text, verify_secret *secret,
								const char **reason);
extern verify_result verify_request(const char *id, const char *timestamp,
									const char *signature,
									const unsigned char *body, size_t bodylen,
									time_t now,
									const verify_secret *secrets,
									int nsecrets);
extern bool verify_check_secrets(const verify_secret *secrets, int nsecrets,
								 char *errbuf, size_t errsize);
extern const char *verify_result_text(verify_result res);
extern bool verify_sign(const verify_secret *secret, const char *id,
						const char *timestamp, const unsigned char *body,
						size_t bodylen, char *out, size_t outsize);

/* ---------- config.c ---------- */
typedef struct config_env
{
	char	   *name;
	char	   *value;
} config_env;

typedef struct config_step
{
	char	  **argv;			/* NULL-terminated */
	int			argc;
	char	   *cwd;
	int			timeout;		/* seconds */
	config_env *env;
	int			nenv;
	json_t	   *argv_json;		/* the argv as a JSON array, for reports */
} config_step;

typedef struct config_service
{
	char	   *name;
	config_step *steps;
	int			nsteps;
} config_service;

typedef struct agent_config
{
	char	   *path;
	/* listen: either host/port or a unix socket path */
	char	   *listen;
	char	   *listen_host;
	int			listen_port;
	char	   *listen_unix;
	int			socket_mode;
	char	   *tls_cert;
	char	   *tls_key;
	char	   *secrets_file;	/* resolved path */
	verify_secret secrets[SECRETS_MAX];
	int			nsecrets;
	char	   *state_dir;
	/* limits */
	int			max_body;
	int			max_jobs;
	int			max_wait;
	int			output_tail;
	int			kill_grace;
	int			connection_limit;
	int			per_ip_connection_limit;
	int			connection_timeout;
	int			connection_memory_limit;
	int			retention_days;
	int			retention_max_jobs;
	int			retention_min_age;
	config_service *services;
	int			nservices;
	const config_service **services_by_name;	/* sorted, for lookups */
} agent_config;

extern agent_config *config_load(const char *path, char *errbuf, size_t errsize);
extern void config_free(agent_config *cfg);
extern const config_service *config_find_service(const agent_config *cfg,
												 const char *name);
extern bool config_load_secrets(const char *path, verify_secret *secrets,
								int *nsecrets, char *errbuf, size_t errsize);

/* ---------- request.c ---------- */
typedef struct restart_request
{
	char		request_id[UUID_TEXT_LEN + 1];
	char		service[SERVICE_NAME_MAX + 1];
	bool		has_requested_by;
	char		requested_by[UUID_TEXT_LEN + 1];
	char		requested_at[REQUESTED_AT_MAX + 1];
} restart_request;

typedef enum request_parse_result
{
	REQUEST_OK,
	REQUEST_BAD,				/* not a valid body: the reason in errbuf */
	REQUEST_NOMEM				/* memory ran out while reading it */
} request_parse_result;

extern request_parse_result request_parse_restart(const char *body, size_t len,
												  restart_request *req,
												  char *errbuf, size_t errsize);
extern bool request_parse_wait(const char *text, int max_wait, int *wait_ms);
extern bool request_parse_job_path(const char *url, char *id, bool *is_job);

/* ---------- tail.c ---------- */
typedef struct tail_buffer
{
	char	   *data;			/* NULL until the first byte */
	size_t		size;			/* capacity: the most bytes kept */
	size_t		alloc;			/* bytes allocated (grows up to size) */
	size_t		start;			/* index of the oldest byte */
	size_t		len;			/* bytes held */
	bool		truncated;
} tail_buffer;

extern bool tail_init(tail_buffer *tb, size_t size);
extern void tail_free(tail_buffer *tb);
extern void tail_append(tail_buffer *tb, const char *data, size_t len);
extern char *tail_to_utf8(const tail_buffer *tb, size_t *outlen);
extern char *tail_sanitize_utf8(const char *in, size_t len, size_t *outlen);

/* ---------- jobs.c ---------- */
typedef enum job_status
{
	JOB_RUNNING = 0,
	JOB_COMPLETED,
	JOB_FAILED
} job_status;

typedef struct job_step
{
	json_t	   *argv;
	int			exit_code;		/* -1 = none */
	int			signal;			/* 0 = none */
	bool		timed_out;
	int64_t		started_at;		/* usec, 0 = none */
	int64_t		finished_at;
} job_step;

typedef struct job
{
	struct job *next;			/* next in jobs.c's finished FIFO, or before
								 * it starts, in its hand-off queue */
	char		id[UUID_TEXT_LEN + 1];
	char		service[SERVICE_NAME_MAX + 1];
	bool		has_requested_by;
	char		requested_by[UUID_TEXT_LEN + 1];
	char		requested_at[REQUESTED_AT_MAX + 1];
	job_status	status;
	int64_t		accepted_at;
	int64_t		started_at;
	int64_t		finished_at;
	int			exit_code;		/* -1 = null */
	int			signal;			/* 0 = null */
	job_step   *steps;
	int			nsteps;			/* steps started so far */
	tail_buffer output;
	char	   *error;			/* why it failed, or NULL (also when memory
								 * ran out for the text: see failed) */
	bool		failed;			/* a step failed or the job was interrupted:
								 * it ends failed, with or without an error
								 * text */
	const config_service *svc;	/* NULL for jobs loaded from the journal */
	bool		unreadable;		/* stands for a journal record that could not
								 * be read: the id stays taken */
	bool		journaling;		/* reserved: its accept record is being
								 * written; nobody may report it yet */
	int			waiters;		/* long polls waiting for it: while there
								 * are, it is not pruned */
	struct spawn_state *step;	/* the step started and not yet over, while
								 * the job passes from one thread to another */
	int			next_step;		/* index of the step to run after it */
} job;

typedef enum jobs_submit_result
{
	JOBS_ACCEPTED,
	JOBS_EXISTS,
	JOBS_CONFLICT,
	JOBS_UNKNOWN_SERVICE,
	JOBS_SERVICE_BUSY,
	JOBS_TOO_MANY,
	JOBS_INTERNAL_ERROR
} jobs_submit_result;

extern bool jobs_init(const agent_config *cfg, char *errbuf, size_t errsize);
extern jobs_submit_result jobs_submit(const restart_request *req, int wait_ms,
									  json_t **report);
extern bool jobs_lookup(const char *id, int wait_ms, json_t **report);
extern void jobs_shutdown(void);
extern void jobs_cleanup(void);
extern const char *job_status_name(job_status st);
extern job *job_alloc(size_t output_tail);
extern void job_free(job *j);

/* ---------- journal.c ---------- */
extern bool journal_open(const char *state_dir, char *errbuf, size_t errsize);
extern void journal_close(void);
extern bool journal_write(const char *id, const char *text);
extern bool journal_remove(const char *id);
extern void journal_on_failure(void (*hook) (void));
extern int	journal_load(job ***jobs_out, size_t output_tail);
extern job *journal_job_from_json(json_t *obj, size_t output_tail, bool *nomem);

/* ---------- spawn.c ---------- */
typedef struct spawn_result
{
	int			exit_code;		/* -1 if none */
	int			signal;			/* 0 if none */
	bool		timed_out;
	bool		interrupted;	/* agent shutting down */
	int			spawn_errno;	/* non-zero if the program could not start */
} spawn_result;

typedef void (*spawn_output_cb) (void *arg, const char *data, size_t len);

extern bool spawn_init(void);
extern void spawn_request_stop(void);
typedef struct spawn_state spawn_state;	/* a step started, not yet over */

#define SPAWN_FOREVER INT64_MAX

extern spawn_state *spawn_begin(const config_step *step, const char *request_id,
								const char *service, int kill_grace,
								spawn_result *res);
extern bool spawn_continue(spawn_state *st, spawn_output_cb out, void *arg,
						   int64_t until, spawn_result *res);

/* ---------- report.c ---------- */
extern char *report_text(const json_t *value);
extern json_t *report_job(const job *j, job_status status);
extern char *report_error(const char *code, const char *message);

/* ---------- http.c ---------- */
extern bool http_start(const agent_config *cfg, char *errbuf, size_t errsize);
extern void http_stop(void);

#endif							/* AGENT_H */
