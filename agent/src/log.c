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
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

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
	int			len;

	va_start(ap, fmt);
	len = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (len < 0)
		return;
	if ((size_t) len > sizeof(line) - 2)
		len = sizeof(line) - 2;
	line[len++] = '\n';

	/* one write per line, so that lines of threads never interleave */
	pthread_mutex_lock(&log_lock);
	for (size_t off = 0; off < (size_t) len;)
	{
		ssize_t		n = write(STDERR_FILENO, line + off, (size_t) len - off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		off += (size_t) n;
	}
	pthread_mutex_unlock(&log_lock);
}

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
