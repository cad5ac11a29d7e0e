/*-------------------------------------------------------------------------
 *
 * log.c
 *	  One-line log messages on stderr.
 *
 * journald adds timestamps and the unit name, so each message is a single
 * line without a timestamp.  Anything that came from the network is passed
 * through log_sanitize() first so that a client cannot forge log lines.
 *
 *-------------------------------------------------------------------------
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>

#include "agent.h"

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

/*
 * Write one formatted line to stderr.  A mutex keeps lines of concurrent
 * threads from interleaving.
 */
void
log_msg(const char *fmt,...)
{
	char		line[2048];
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);

	pthread_mutex_lock(&log_lock);
	fprintf(stderr, "%s\n", line);
	fflush(stderr);
	pthread_mutex_unlock(&log_lock);
}

/*
 * Copy untrusted text into out, replacing control characters, quotes,
 * backslashes and non-ASCII bytes by '?', and truncating to outsize - 1
 * bytes.  Used for every value that reaches a log line from a request.
 */
void
log_sanitize(const char *in, size_t inlen, char *out, size_t outsize)
{
	size_t		o = 0;

	if (outsize == 0)
		return;
	for (size_t i = 0; i < inlen && in[i] != '\0' && o + 1 < outsize; i++)
	{
		unsigned char c = (unsigned char) in[i];

		out[o++] = (c < 0x20 || c >= 0x7f || c == '"' || c == '\\') ? '?' : (char) c;
	}
	out[o] = '\0';
}
