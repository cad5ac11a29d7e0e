/*-------------------------------------------------------------------------
 *
 * restart_worker.h
 *		Declarations shared by the files of the restart_worker extension.
 *
 * The path of a request through the extension, one file per step:
 *	src/sql/20_request.sql	request_service_restart() inserts the row;
 *	src/wake.c				the insert sets the worker's latch at COMMIT;
 *	src/worker.c			the background worker's main loop waits for
 *							wake-ups, timers and sockets;
 *	src/claim.c				claims due rows (policy in
 *							src/sql/50_worker.sql);
 *	src/deadline.c			fails requests past their deadline while
 *							every call slot is busy;
 *	src/dispatch.c			one call slot per request in flight;
 *	src/http.c				libcurl's multi interface on the worker's
 *							wait event set;
 *	src/sign.c				Standard Webhooks signatures;
 *	src/job.c				reads the common answer, a job object;
 *	src/record.c			records what agents answered, many at once
 *							when they come in together;
 *	src/xact.c				the short transactions of claim.c, deadline.c
 *							and record.c;
 *	src/status.c			counters in shared memory, restart_worker.status();
 *	src/dropdb.c			lets DROP DATABASE of the worker's database
 *							proceed;
 *	src/guc.c				the settings.
 *
 *-------------------------------------------------------------------------
 */
#ifndef RESTART_WORKER_H
#define RESTART_WORKER_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "nodes/pg_list.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "utils/uuid.h"

/* What the worker is doing, for restart_worker.status(). */
typedef enum RestartWorkerState
{
	RW_STATE_STOPPED = 0,
	RW_STATE_STARTING,
	RW_STATE_NO_EXTENSION,		/* waiting for CREATE EXTENSION */
	RW_STATE_IDLE,				/* nothing in flight */
	RW_STATE_BUSY,				/* calls in flight */
	RW_STATE_SETTLING			/* settling fails: claims wait (src/settle.c) */
} RestartWorkerState;

/* Counters since the worker started, for restart_worker.status(). */
typedef struct RestartWorkerCounters
{
	uint64		wakeups;		/* latch wake-ups seen by the worker */
	uint64		polls;			/* claim transactions run */
	uint64		claimed;		/* rows claimed */
	uint64		calls;			/* HTTP calls started */
	uint64		call_errors;	/* calls without an answer (connect, timeout) */
	uint64		retries;		/* requests put back for a later attempt */
	uint64		completed;		/* requests ended completed */
	uint64		failed;			/* requests ended failed */
} RestartWorkerCounters;

/*
 * State in shared memory, created by the postmaster when the library is in
 * shared_preload_libraries.  The worker publishes its PGPROC number here so
 * that committing backends can set its latch; the counters are for
 * observation and tests.
 */
typedef struct RestartWorkerShared
{
	slock_t		mutex;			/* protects the fields below */
	int			worker_procno;	/* pgprocno of the running worker, or -1 */
	pid_t		worker_pid;		/* its pid, or 0 */
	uint64		commit_wakeups; /* latches set by committing transactions */

	/* observation, written by the worker (src/status.c) */
	RestartWorkerState state;
	TimestampTz started_at;
	TimestampTz last_wake;
	TimestampTz last_poll;
	int			in_flight;
	int			max_in_flight;	/* high-water mark of in_flight */
	int			sockets;		/* sockets libcurl has open */
	int			max_sockets;	/* high-water mark of sockets */
	RestartWorkerCounters counters;

	/* failed connection attempts in a row (src/worker.c backs off) */
	int			connect_failures;

	/* claims lost in a crash (src/settle.c) */
	TimestampTz settle_before;	/* the first worker's start plus
								 * restart_worker.settle_margin, or 0 */
	bool		settled;		/* the worker took care of them, or there
								 * are none: the server stopped cleanly */
} RestartWorkerShared;

/* src/wake.c */
extern RestartWorkerShared *restart_worker_shared;
extern void restart_worker_wake_init(void);
extern void restart_worker_wake_publish(void);
extern void restart_worker_wake_unpublish(void);
extern uint64 restart_worker_wake_count(void);

/* src/guc.c */
extern char *rw_database;
extern char *rw_role;
extern int	rw_poll_interval;	/* s */
extern int	rw_max_in_flight;
extern int	rw_max_connections_per_agent;
extern int	rw_connect_timeout;	/* ms */
extern int	rw_request_timeout;	/* ms */
extern int	rw_retry_base;		/* ms */
extern int	rw_retry_max;		/* ms */
extern int	rw_max_attempts;
extern int	rw_follow_wait;		/* s */
extern int	rw_settle_margin;	/* s */
extern int	rw_max_response_size;	/* kB */
extern char *rw_ca_file;
extern void restart_worker_guc_init(void);

/* src/worker.c */
extern void restart_worker_register(void);
extern PGDLLEXPORT void restart_worker_main(Datum main_arg);

/* src/sign.c */
#define RW_SIGNATURE_LEN 128
extern bool restart_worker_sign(const unsigned char *key, int keylen,
								const char *id, const char *timestamp,
								const char *body, size_t bodylen,
								char *out, size_t outsize);

/*
 * How a call ended, as far as the transport knows: with an answer (whose
 * HTTP status and body src/sql/50_worker.sql judges), or the kind of
 * failure.  Only the kind reaches the request's row; the details go to the
 * server log.
 */
typedef enum RwCallKind
{
	RW_CALL_ANSWER = 0,			/* an HTTP answer */
	RW_CALL_CONNECT,			/* could not resolve or connect: nothing sent */
	RW_CALL_TIMEOUT,			/* timed out */
	RW_CALL_NETWORK,			/* connection lost while sending or receiving */
	RW_CALL_PREPARE,			/* could not set the call up: nothing sent */
	RW_CALL_TLS,				/* TLS handshake or verification failed */
	RW_CALL_TOO_LARGE,			/* answer over restart_worker.max_response_size */
	RW_CALL_PROTOCOL,			/* anything else: not an HTTP answer we take */
	RW_CALL_UNREGISTERED,		/* the service or its agent is gone */
	RW_CALL_URL					/* the agent's URL cannot be called: nothing sent */
} RwCallKind;

/*
 * One request in flight: the call to its agent being made, and what is
 * needed to make the next one.  Owned by src/dispatch.c.
 */
typedef struct RwCall
{
	bool		in_use;
	bool		following;		/* GET ?wait=N rather than the POST */
	bool		post_wait;		/* the POST asks the agent to hold its answer
								 * while the job runs (src/http.c) */
	uint64		follow_seq;		/* place in its agent's long-poll queue, or 0
								 * if its long-poll is not waiting to start */
	char		id[37];			/* request id, canonical uuid text */
	pg_uuid_t	uuid;			/* the same id in binary, for lists of ids */
	char	   *url;			/* agent base URL */
	char	   *body;			/* POST body, the same for every attempt */
	unsigned char key[64];		/* signing key */
	int			keylen;
	TimestampTz deadline;		/* deadline_at of the request */
	bool		maybe_sent;		/* an earlier call may have reached the agent */
	TimestampTz record_at;		/* record then: an outcome whose row was
								 * locked, or a held 202 (src/dispatch.c) */
	int			record_tries;	/* times recording found the row locked */
	bool		unrecorded;		/* the call ended; its outcome is not recorded */
	char	   *held_resp;		/* a 202 recorded with the next answer,
								 * malloc'd */
	size_t		held_len;
	TimestampTz accepted_at;	/* when the held 202 came */
	/* the transfer (src/http.c) */
	void	   *easy;			/* CURL * */
	void	   *headers;		/* struct curl_slist * */
	char	   *resp;			/* response body, malloc'd */
	size_t		resp_len;
	bool		resp_too_big;
	long		http_status;	/* 0 = no answer */
	RwCallKind	kind;			/* how the call ended */
	bool		sent;			/* some of the request was sent */
	bool		went_out;		/* libcurl began the request on a connection */
	char		error[256];		/* why there is no answer, for the log */
} RwCall;

/* src/encoding.c */
extern void rw_encoding_init(void);
extern void rw_encoding_answer(RwCall *call);

/* src/http.c */

/* What libcurl makes of an agent's URL (rw_http_url_judge()). */
typedef enum RwUrlJudgement
{
	RW_URL_USABLE,				/* parsed, and its port is not 0 */
	RW_URL_REFUSED,				/* not parsed, or port 0 */
	RW_URL_UNKNOWN				/* libcurl could not say (out of memory) */
} RwUrlJudgement;

extern void rw_http_init(void);
extern void rw_http_configure(void);
extern RwUrlJudgement rw_http_url_judge(const char *url);
extern bool rw_http_url_usable(const char *url);
extern bool rw_http_start(RwCall *call);
extern void rw_http_fail(RwCall *call, RwCallKind kind, const char *why);
extern const char *rw_http_kind_name(RwCallKind kind);
extern void rw_http_abort(RwCall *call);
extern long rw_http_timeout(void);
extern void rw_http_add_sockets(WaitEventSet *set);
extern bool rw_http_update_sockets(WaitEventSet *set);
extern int	rw_http_max_sockets(void);
extern bool rw_http_wait_set_stale(void);
extern void rw_http_socket_event(pgsocket fd, uint32 events);
extern void rw_http_timer_event(void);
extern RwCall *rw_http_next_done(void);

/* src/claim.c */
typedef struct RwClaimed
{
	char		id[37];
	pg_uuid_t	uuid;			/* the same id in binary */
	char	   *url;
	bytea	   *key;
	char	   *body;
	TimestampTz deadline;
	bool		maybe_sent;		/* an earlier call may have reached the agent */
	bool		accepted;		/* the agent accepted it: follow its job */
} RwClaimed;

typedef enum RwOutcome
{
	RW_OUTCOME_DONE,			/* terminal state recorded (or row gone) */
	RW_OUTCOME_FOLLOW,			/* running: follow it with GET ?wait */
	RW_OUTCOME_RETRY,			/* put back until next_attempt_at */
	RW_OUTCOME_LOCKED,			/* row locked by someone: record again later */
	RW_OUTCOME_ERROR			/* could not record (logged): the lease brings
								 * the request back */
} RwOutcome;

typedef enum RwClaimResult
{
	RW_CLAIM_OK,
	RW_CLAIM_NO_EXTENSION,		/* the extension does not exist */
	RW_CLAIM_ERROR				/* the claim failed (logged): try again later */
} RwClaimResult;

#define RW_NEXT_DUE_UNKNOWN ((TimestampTz) -1)
extern RwClaimResult rw_claim(int limit, List *exclude, bool recover, List **rows,
							  TimestampTz *next_due, bool *more);
extern void rw_after_claim_defer(List *announce, bool want_due);
extern TimestampTz rw_after_claim_due(void);
extern void rw_after_claim_next_due(TimestampTz *next_due);
extern int	rw_lease_ms(void);
extern void rw_after_claim_work(void);
extern void rw_after_claim_done(bool ok);

/* src/deadline.c */
extern void rw_deadline_claimed(bool more);
extern void rw_deadline_blocked(bool new);
extern TimestampTz rw_deadline_look_at(void);
extern bool rw_deadline_look_due(void);
extern void rw_deadline_look(List *exclude);

/* src/record.c */
typedef struct RwRecord
{
	RwCall	   *first;			/* the answer to record, or a held 202 */
	RwCall	   *second;			/* the answer after a held 202, or NULL */
	TimestampTz accepted_at;	/* when the agent accepted the job, or 0 */
	bool		recorded;		/* (used while recording) */
	RwOutcome	outcome;		/* what to do next */
	TimestampTz next_at;		/* for a retry, when the request is due */
} RwRecord;
extern RwOutcome rw_record(RwCall *first, RwCall *second, TimestampTz accepted_at,
						   TimestampTz *next_at);
extern void rw_record_all(RwRecord *records, int n);

/* src/xact.c */
extern void rw_xact_begin(const char *activity);
extern void rw_xact_end(void);
extern void rw_xact_make_durable(void);
extern TimestampTz rw_retry_delay(int failures);
extern void rw_xact_recover(MemoryContext cxt);
extern ErrorData *rw_xact_abort(MemoryContext cxt);
extern bool rw_extension_exists(void);
extern SPIPlanPtr rw_plan(SPIPlanPtr *plan, const char *query, int nargs, Oid *types);
extern void rw_run_one_row(SPIPlanPtr *plan, const char *query, int nargs, Oid *types,
						   Datum *values, const char *nulls, bool read_only);
extern Oid	rw_extension_function(const char *name, int nargs, Oid *types);
extern Datum rw_uuid_array(List *ids);

/* src/job.c */
typedef struct RwJob
{
	const char *status;			/* running, completed or failed */
	bool		has_started_at;
	TimestampTz started_at;
	bool		has_finished_at;
	TimestampTz finished_at;
	bool		has_exit_code;
	int32		exit_code;
	const char *output;			/* NULL if none */
	const char *error;			/* NULL if none */
} RwJob;
extern bool rw_job_read(const char *id, char *body, size_t len, RwJob *job);
extern bool rw_job_running(const char *id, char *body, size_t len);

/* src/dispatch.c */
extern void rw_dispatch_init(void);
extern int	rw_dispatch_free_slots(void);
extern int	rw_dispatch_in_flight(void);
extern List *rw_dispatch_ids(void);
extern List *rw_dispatch_claim_exclude(void);
extern void rw_dispatch_end_recovery(void);
extern void rw_dispatch_start(RwClaimed *row);
extern void rw_dispatch_start_follows(void);
extern bool rw_dispatch_finish(TimestampTz *next_at, bool *more_done);
extern TimestampTz rw_dispatch_next_turn(void);
extern void rw_dispatch_abort_all(void);

/* src/status.c */
extern void rw_status_set_state(RestartWorkerState state);
extern void rw_status_worker_started(void);
extern void rw_status_note_wake(void);
extern void rw_status_note_poll(int claimed);
#define RW_COUNT_ADD(field, n) \
	do { \
		int			rw_count_n_ = (n); \
		if (restart_worker_shared && rw_count_n_ != 0) { \
			SpinLockAcquire(&restart_worker_shared->mutex); \
			restart_worker_shared->counters.field += rw_count_n_; \
			SpinLockRelease(&restart_worker_shared->mutex); \
		} \
	} while (0)
#define RW_COUNT(field) RW_COUNT_ADD(field, 1)
extern void rw_status_set_in_flight(int n);
extern void rw_status_set_sockets(int n);

/* src/settle.c */
extern bool rw_settle_needed(void);
extern void rw_settle_note_start(void);
extern bool rw_settle(TimestampTz *retry_at);
extern bool rw_settle_claims_async(void);

/* src/dropdb.c */
extern void restart_worker_dropdb_init(void);

#endif							/* RESTART_WORKER_H */
