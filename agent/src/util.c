/*-------------------------------------------------------------------------
 *
 * util.c
 *	  Clocks, RFC 3339 time stamps, the small syntactic checks (UUID,
 *	  RFC 3339) that the protocol needs, and jansson's allocator.
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
 * Set *ts to ms milliseconds from now on the given clock: the deadline of
 * a timed wait on a condition variable that uses that clock.
 */
void
util_deadline(struct timespec *ts, clockid_t clock, int64_t ms)
{
	clock_gettime(clock, ts);
	ts->tv_sec += (time_t) (ms / 1000);
	ts->tv_nsec += (long) (ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L)
	{
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
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
 * Read n decimal digits at text as a number within lo..hi; -1 if they are
 * not all digits or out of range.
 */
static int
util_field(const char *text, int n, int lo, int hi)
{
	int			v = 0;

	if (!util_digits(text, n))
		return -1;
	for (int i = 0; i < n; i++)
		v = v * 10 + (text[i] - '0');
	return v < lo || v > hi ? -1 : v;
}

/*
 * Return the number of days of a month (1..12) of a year (Gregorian).
 */
static int
util_days_in_month(int year, int month)
{
	static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
	bool		leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;

	return month == 2 && leap ? 29 : days[month - 1];
}

/*
 * Check the date and time fields of YYYY-MM-DDTHH:MM:SS: separators, an
 * upper-case 'T', and every field within its range (the day within its
 * month, second 60 allowed for a leap second).
 */
static bool
util_rfc3339_datetime(const char *t)
{
	int			year = util_field(t, 4, 0, 9999);
	int			month = util_field(t + 5, 2, 1, 12);
	int			day = util_field(t + 8, 2, 1, 31);

	if (year < 0 || month < 0 || day < 0 || t[4] != '-' || t[7] != '-' || t[10] != 'T' ||
		t[13] != ':' || t[16] != ':' || day > util_days_in_month(year, month))
		return false;
	return util_field(t + 11, 2, 0, 23) >= 0 && util_field(t + 14, 2, 0, 59) >= 0 &&
		util_field(t + 17, 2, 0, 60) >= 0;
}

/*
 * Check an RFC 3339 date-time as the protocol documents it:
 * YYYY-MM-DDTHH:MM:SS, an optional fraction, then 'Z' or a numeric offset
 * +HH:MM / -HH:MM, every field within its range.  The agent only stores
 * and echoes requested_at, but refuses what is not a real time stamp.
 */
bool
util_is_rfc3339(const char *t)
{
	size_t		len = strlen(t);
	size_t		i = 19;

	if (len < 20 || len > REQUESTED_AT_MAX || !util_rfc3339_datetime(t))
		return false;
	if (t[i] == '.')
	{
		size_t		start = ++i;

		while (i < len && isdigit((unsigned char) t[i]))
			i++;
		if (i == start)
			return false;
	}
	if (t[i] == 'Z' && i + 1 == len)
		return true;
	return (t[i] == '+' || t[i] == '-') && i + 6 == len &&
		util_field(t + i + 1, 2, 0, 23) >= 0 && t[i + 3] == ':' &&
		util_field(t + i + 4, 2, 0, 59) >= 0;
}

/*
 * Parse a plain non-negative decimal number of 1 to max_len digits (no
 * sign, no spaces), as the protocol's time stamps and "wait" values are.
 * max_len bounds the value so that it cannot overflow.  Returns false for
 * anything else.
 */
bool
util_parse_digits(const char *text, size_t max_len, int64_t *value)
{
	size_t		len = strlen(text);
	int64_t		v = 0;

	if (len == 0 || len > max_len || max_len > 18)
		return false;
	for (size_t i = 0; i < len; i++)
	{
		if (text[i] < '0' || text[i] > '9')
			return false;
		v = v * 10 + (text[i] - '0');
	}
	*value = v;
	return true;
}

/* Allocations of jansson that failed in this thread so far. */
static __thread unsigned util_json_failed;

/*
 * jansson's malloc: counts the failures, so that a caller can tell a text
 * jansson could not read for want of memory from one that is not JSON.
 * jansson (2.14) reports some of those failures as syntax errors, and
 * ignores others: a string whose bytes could not all be kept is read
 * without them, into an object that looks whole.
 */
static void *
util_json_malloc(size_t size)
{
	void	   *p = malloc(size);

	if (p == NULL)
		util_json_failed++;
	return p;
}

/*
 * Make jansson allocate through util_json_malloc(); called before any
 * JSON is built or read.
 */
void
util_json_init(void)
{
	json_set_alloc_funcs(util_json_malloc, free);
}

/*
 * Return how many of jansson's allocations failed in this thread so far:
 * a change across a call of jansson means memory ran out in it.
 */
unsigned
util_json_failures(void)
{
	return util_json_failed;
}
