/*-------------------------------------------------------------------------
 *
 * util.c
 *	  Clocks, RFC 3339 time stamps and the small syntactic checks
 *	  (UUID, RFC 3339) that the protocol needs.
 *
 *-------------------------------------------------------------------------
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agent.h"

/*
 * Return the wall-clock time in microseconds since the epoch; used for the
 * time stamps reported in job objects.
 */
int64_t
util_now_usec(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/*
 * Return a monotonic clock in milliseconds; used for deadlines, which must
 * not move when the wall clock is set.
 */
int64_t
util_monotonic_msec(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Format a time in microseconds as RFC 3339 UTC with microseconds, the
 * form every time stamp of the protocol uses.
 */
void
util_format_time(int64_t usec, char *buf, size_t bufsize)
{
	time_t		secs = (time_t) (usec / 1000000);
	struct tm	tm;

	gmtime_r(&secs, &tm);
	snprintf(buf, bufsize, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ",
			 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
			 tm.tm_hour, tm.tm_min, tm.tm_sec, (int) (usec % 1000000));
}

/*
 * Parse a time stamp written by util_format_time() (used when the journal
 * is read back).  Returns false if the text has any other shape or a field
 * is out of range, so that every accepted value formats back identically.
 */
bool
util_parse_time(const char *text, int64_t *usec)
{
	static const char shape[] = "dddd-dd-ddTdd:dd:dd.ddddddZ";
	struct tm	tm;
	int			frac;
	time_t		secs;

	if (strlen(text) != sizeof(shape) - 1)
		return false;
	for (size_t i = 0; i < sizeof(shape) - 1; i++)
		if (shape[i] == 'd' ? !isdigit((unsigned char) text[i]) : text[i] != shape[i])
			return false;
	memset(&tm, 0, sizeof(tm));
	sscanf(text, "%4d-%2d-%2dT%2d:%2d:%2d.%6dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
		   &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &frac);
	if (tm.tm_year < 1970 || tm.tm_mon < 1 || tm.tm_mon > 12 || tm.tm_mday < 1 ||
		tm.tm_mday > 31 || tm.tm_hour > 23 || tm.tm_min > 59 || tm.tm_sec > 59)
		return false;
	tm.tm_year -= 1900;
	tm.tm_mon -= 1;
	secs = timegm(&tm);
	if (secs <= 0 || tm.tm_mday != atoi(text + 8))
		return false;			/* e.g. February 30th */
	*usec = (int64_t) secs * 1000000 + frac;
	return true;
}

/*
 * Check that text is a UUID in canonical lowercase form
 * (8-4-4-4-12 hexadecimal digits), the only request id form accepted.
 */
bool
util_is_uuid(const char *text, size_t len)
{
	if (len != UUID_TEXT_LEN)
		return false;
	for (size_t i = 0; i < UUID_TEXT_LEN; i++)
	{
		char		c = text[i];

		if (i == 8 || i == 13 || i == 18 || i == 23)
		{
			if (c != '-')
				return false;
		}
		else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
			return false;
	}
	return true;
}

/*
 * Check that a string of n characters of text are all decimal digits.
 */
static bool
util_digits(const char *text, int n)
{
	for (int i = 0; i < n; i++)
		if (!isdigit((unsigned char) text[i]))
			return false;
	return true;
}

/*
 * Check the shape of an RFC 3339 date-time: YYYY-MM-DDTHH:MM:SS, optional
 * fraction, then Z or a numeric offset.  The agent only stores and echoes
 * requested_at, so a syntactic check is all it needs.
 */
bool
util_is_rfc3339(const char *t)
{
	size_t		len = strlen(t);
	size_t		i = 19;

	if (len < 20 || len > REQUESTED_AT_MAX)
		return false;
	if (!util_digits(t, 4) || t[4] != '-' || !util_digits(t + 5, 2) ||
		t[7] != '-' || !util_digits(t + 8, 2) ||
		(t[10] != 'T' && t[10] != 't' && t[10] != ' ') ||
		!util_digits(t + 11, 2) || t[13] != ':' || !util_digits(t + 14, 2) ||
		t[16] != ':' || !util_digits(t + 17, 2))
		return false;
	if (t[i] == '.')
	{
		size_t		start = ++i;

		while (i < len && isdigit((unsigned char) t[i]))
			i++;
		if (i == start)
			return false;
	}
	if ((t[i] == 'Z' || t[i] == 'z') && i + 1 == len)
		return true;
	if ((t[i] == '+' || t[i] == '-') && i + 6 == len &&
		util_digits(t + i + 1, 2) && t[i + 3] == ':' && util_digits(t + i + 4, 2))
		return true;
	return false;
}
