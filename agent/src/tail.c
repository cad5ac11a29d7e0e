/*-------------------------------------------------------------------------
 *
 * tail.c
 *	  A bounded ring buffer keeping the last bytes of a job's output, and
 *	  the conversion of those bytes to valid UTF-8 for JSON.
 *
 *-------------------------------------------------------------------------
 */
#include <stdlib.h>
#include <string.h>

#include "agent.h"

/*
 * Set up an empty tail buffer that keeps at most size bytes.  Nothing is
 * allocated yet: most steps print little or nothing, and allocating the
 * whole capacity for every job cost more than anything else a job of such
 * a step did in user space (see tail_reserve()).  Cannot fail; the bool
 * is kept for callers that check it.
 */
bool
tail_init(tail_buffer *tb, size_t size)
{
	memset(tb, 0, sizeof(*tb));
	tb->size = size;
	return true;
}

/*
 * Release a tail buffer's memory.
 */
void
tail_free(tail_buffer *tb)
{
	free(tb->data);
	tb->data = NULL;
	tb->alloc = 0;
}

/*
 * Make room for holding want bytes (at most the capacity), growing the
 * allocation geometrically while the buffer has not yet wrapped (its bytes
 * then start at index 0).  If memory runs out, the capacity shrinks to
 * what is allocated: the tail keeps fewer bytes rather than failing the
 * job.
 */
static void
tail_reserve(tail_buffer *tb, size_t want)
{
	size_t		alloc;
	char	   *data;

	if (want > tb->size)
		want = tb->size;
	if (want <= tb->alloc)
		return;
	alloc = tb->alloc < 256 ? 256 : tb->alloc;
	while (alloc < want)
		alloc = alloc > tb->size / 2 ? tb->size : alloc * 2;
	if (alloc > tb->size)
		alloc = tb->size;
	data = realloc(tb->data, alloc);
	if (data == NULL)
	{
		tb->truncated |= tb->size > tb->alloc;
		tb->size = tb->alloc;
		return;
	}
	tb->data = data;
	tb->alloc = alloc;
}

/*
 * Append bytes, dropping the oldest ones once the capacity is reached, so
 * that a chatty step can never use more than the configured memory.
 */
void
tail_append(tail_buffer *tb, const char *data, size_t len)
{
	if (len == 0)
		return;
	if (tb->len < tb->size)
		tail_reserve(tb, tb->len + len);
	if (tb->size == 0)
	{
		tb->truncated = true;
		return;
	}
	if (len >= tb->size)
	{
		tb->truncated |= (len > tb->size) || tb->len > 0;
		memcpy(tb->data, data + (len - tb->size), tb->size);
		tb->start = 0;
		tb->len = tb->size;
		return;
	}
	for (size_t i = 0; i < len; i++)
	{
		size_t		pos = (tb->start + tb->len) % tb->size;

		tb->data[pos] = data[i];
		if (tb->len < tb->size)
			tb->len++;
		else
		{
			tb->start = (tb->start + 1) % tb->size;
			tb->truncated = true;
		}
	}
}

/*
 * Return the length of the valid UTF-8 sequence starting at s (at most
 * len bytes), or 0 if the bytes there are not valid UTF-8.  Overlong forms
 * and surrogates are refused.
 */
static size_t
tail_utf8_seq(const unsigned char *s, size_t len)
{
	size_t		n;
	unsigned int cp;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		n = 2, cp = s[0] & 0x1f;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		n = 3, cp = s[0] & 0x0f;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		n = 4, cp = s[0] & 0x07;
	else
		return 0;
	if (len < n)
		return 0;
	for (size_t i = 1; i < n; i++)
	{
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = (cp << 6) | (s[i] & 0x3f);
	}
	if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
		(n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return n;
}

/*
 * Copy bytes into a new NUL-terminated string, replacing each invalid
 * UTF-8 byte and each NUL by U+FFFD so that jansson accepts the result.
 */
char *
tail_sanitize_utf8(const char *in, size_t len, size_t *outlen)
{
	char	   *out = malloc(len * 3 + 1);
	size_t		o = 0;
	size_t		i = 0;

	if (out == NULL)
		return NULL;
	while (i < len)
	{
		size_t		n = tail_utf8_seq((const unsigned char *) in + i, len - i);

		if (n == 0 || in[i] == '\0')
		{
			memcpy(out + o, "\xef\xbf\xbd", 3);
			o += 3;
			i++;
			continue;
		}
		memcpy(out + o, in + i, n);
		o += n;
		i += n;
	}
	out[o] = '\0';
	*outlen = o;
	return out;
}

/*
 * Return the buffered bytes, oldest first, as valid UTF-8 (caller frees).
 */
char *
tail_to_utf8(const tail_buffer *tb, size_t *outlen)
{
	char	   *lin = malloc(tb->len + 1);
	char	   *res;
	size_t		first;

	if (lin == NULL)
		return NULL;
	first = tb->size - tb->start < tb->len ? tb->size - tb->start : tb->len;
	if (tb->len > 0)
	{
		memcpy(lin, tb->data + tb->start, first);
		memcpy(lin + first, tb->data, tb->len - first);
	}
	res = tail_sanitize_utf8(lin, tb->len, outlen);
	free(lin);
	return res;
}
