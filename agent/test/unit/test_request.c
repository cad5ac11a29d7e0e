/*
 * Unit tests of request.c, util.c and tail.c: body validation, ids, time
 * stamps, the wait value, job paths, and the bounded output tail.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "agent.h"

#define ID "0b7e8f5a-1c2d-4e3f-8a9b-0c1d2e3f4a5b"

/* Parse body; returns success and leaves the reason in err. */
static bool
parse(const char *body, restart_request *req, char *err)
{
	return request_parse_restart(body, strlen(body), req, err, 256) == REQUEST_OK;
}

static void
test_valid_body(void **state)
{
	restart_request req;
	char		err[256];

	(void) state;
	assert_true(parse("{\"request_id\":\"" ID "\",\"service\":\"mqtt-subscriber\","
					  "\"requested_by\":null,\"requested_at\":\"2026-11-26T05:00:00.123456Z\",\"extra\":[1]}",
					  &req, err));
	assert_string_equal(req.request_id, ID);
	assert_string_equal(req.service, "mqtt-subscriber");
	assert_false(req.has_requested_by);
	assert_true(parse("{\"request_id\":\"" ID "\",\"service\":\"s\",\"requested_by\":\"" ID "\","
					  "\"requested_at\":\"2026-11-26T05:00:00+01:00\"}", &req, err));
	assert_true(req.has_requested_by);
	assert_string_equal(req.requested_by, ID);
}

static void
test_bad_bodies(void **state)
{
	restart_request req;
	char		err[256];
	static const char *const bad[] = {
		"",
		"[]",
		"null",
		"{\"request_id\":\"" ID "\"",
		"{\"service\":\"s\",\"requested_by\":null,\"requested_at\":\"2026-11-26T05:00:00Z\"}",
		"{\"request_id\":\"" ID "\",\"requested_by\":null,\"requested_at\":\"2026-11-26T05:00:00Z\"}",
		"{\"request_id\":\"" ID "\",\"service\":\"s\",\"requested_at\":\"2026-11-26T05:00:00Z\"}",
		"{\"request_id\":\"" ID "\",\"service\":\"s\",\"requested_by\":null}",
		"{\"request_id\":\"0B7E8F5A-1C2D-4E3F-8A9B-0C1D2E3F4A5B\",\"service\":\"s\",\"requested_by\":null,\"requested_at\":\"2026-11-26T05:00:00Z\"}",
		"{\"request_id\":\"" ID "x\",\"service\":\"s\",\"requested_by\":null,\"requested_at\":\"2026-11-26T05:00:00Z\"}",
		"{\"request_id\":42,\"service\":\"s\",\"requested_by\":null,\"requested_at\":\"2026-11-26T05:00:00Z\"}",
		"{\"request_id\":\"" ID "\",\"service\":\"\",\"requested_by\":null,\"requested_at\":\"2026-11-26T05:00:00Z\"}",
		"{\"request_id\":\"" ID "\",\"service\":\"s\\u0000x\",\"requested_by\":null,\"requested_at\":\"2026-11-26T05:00:00Z\"}",
		"{\"request_id\":\"" ID "\",\"service\":\"s\",\"requested_by\":\"bob\",\"requested_at\":\"2026-11-26T05:00:00Z\"}",
		"{\"request_id\":\"" ID "\",\"service\":\"s\",\"requested_by\":null,\"requested_at\":\"yesterday\"}",
		"{\"request_id\":\"" ID "\",\"service\":\"s\",\"requested_by\":null,\"requested_at\":12}",
		"{\"request_id\":\"" ID "\",\"request_id\":\"" ID "\",\"service\":\"s\",\"requested_by\":null,\"requested_at\":\"2026-11-26T05:00:00Z\"}",
		"{\"request_id\":\"" ID "\",\"service\":\"0123456789012345678901234567890123456789012345678901234567890123456789\",\"requested_by\":null,\"requested_at\":\"2026-11-26T05:00:00Z\"}",
	};

	(void) state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
	{
		err[0] = '\0';
		if (parse(bad[i], &req, err))
			fail_msg("accepted: %s", bad[i]);
		assert_true(err[0] != '\0');
	}
}

static void
test_uuid(void **state)
{
	(void) state;
	assert_true(util_is_uuid(ID, 36));
	assert_false(util_is_uuid("0b7e8f5a-1c2d-4e3f-8a9b-0c1d2e3f4a5", 35));
	assert_false(util_is_uuid("0b7e8f5a1c2d-4e3f-8a9b-0c1d2e3f4a5bb", 36));
	assert_false(util_is_uuid("0b7e8f5a-1c2d-4e3f-8a9b-0c1d2e3f4a5G", 36));
}

static void
test_rfc3339(void **state)
{
	int64_t		us;
	char		buf[64];

	(void) state;
	assert_true(util_is_rfc3339("2026-11-26T05:00:00Z"));
	assert_true(util_is_rfc3339("2026-11-26T05:00:00.1Z"));
	assert_true(util_is_rfc3339("2026-11-26T05:00:00.123456+00:00"));
	assert_true(util_is_rfc3339("2026-11-26T05:00:00-23:59"));
	assert_true(util_is_rfc3339("2028-02-29T23:59:60Z"));
	assert_true(util_is_rfc3339("2000-02-29T00:00:00Z"));
	/* only the documented form: upper-case T and Z, no space */
	assert_false(util_is_rfc3339("2026-11-26 05:00:00.123456+00:00"));
	assert_false(util_is_rfc3339("2026-11-26t05:00:00Z"));
	assert_false(util_is_rfc3339("2026-11-26T05:00:00z"));
	/* every field within its range */
	assert_false(util_is_rfc3339("2026-99-99T99:99:99Z"));
	assert_false(util_is_rfc3339("2026-00-10T05:00:00Z"));
	assert_false(util_is_rfc3339("2026-13-10T05:00:00Z"));
	assert_false(util_is_rfc3339("2026-11-00T05:00:00Z"));
	assert_false(util_is_rfc3339("2026-11-31T05:00:00Z"));
	assert_false(util_is_rfc3339("2026-02-29T05:00:00Z"));
	assert_false(util_is_rfc3339("1900-02-29T05:00:00Z"));
	assert_false(util_is_rfc3339("2026-11-26T24:00:00Z"));
	assert_false(util_is_rfc3339("2026-11-26T23:60:00Z"));
	assert_false(util_is_rfc3339("2026-11-26T23:59:61Z"));
	assert_false(util_is_rfc3339("2026-11-26T05:00:00+24:00"));
	assert_false(util_is_rfc3339("2026-11-26T05:00:00+01:60"));
	assert_false(util_is_rfc3339("2026-11-26T05:00:00"));
	assert_false(util_is_rfc3339("2026-11-26T05:00:00.Z"));
	assert_false(util_is_rfc3339("2026-11-26T05:00:00+0000"));
	assert_false(util_is_rfc3339("2026-11-26T05:00:00Zjunk"));
	util_format_time(1764133200123456LL, buf, sizeof(buf));
	assert_string_equal(buf, "2025-11-26T05:00:00.123456Z");
	assert_true(util_parse_time(buf, &us));
	assert_int_equal(us, 1764133200123456LL);
	assert_false(util_parse_time("2025-11-26T05:00:00Z", &us));
	assert_false(util_parse_time("2026-02-30T05:00:00.000000Z", &us));
	assert_false(util_parse_time("+026-11-26T05:00:00.000000Z", &us));
	assert_false(util_parse_time("1969-12-31T23:59:59.000000Z", &us));
	assert_false(util_parse_time("2026-11-26T24:00:00.000000Z", &us));
}

static void
test_wait(void **state)
{
	int			w;

	(void) state;
	assert_true(request_parse_wait(NULL, 30, &w));
	assert_int_equal(w, 0);
	assert_true(request_parse_wait("10", 30, &w));
	assert_int_equal(w, 10000);
	assert_true(request_parse_wait("0", 30, &w));
	assert_int_equal(w, 0);
	assert_true(request_parse_wait("999", 30, &w));
	assert_int_equal(w, 30000);
	assert_true(request_parse_wait("1.5", 30, &w));
	assert_int_equal(w, 1500);
	assert_true(request_parse_wait("0.02", 30, &w));
	assert_int_equal(w, 20);
	assert_true(request_parse_wait("0.005", 30, &w));
	assert_int_equal(w, 5);
	assert_true(request_parse_wait("29.999", 30, &w));
	assert_int_equal(w, 29999);
	assert_true(request_parse_wait("30.5", 30, &w));
	assert_int_equal(w, 30000);
	assert_false(request_parse_wait("", 30, &w));
	assert_false(request_parse_wait("-1", 30, &w));
	assert_false(request_parse_wait("1.", 30, &w));
	assert_false(request_parse_wait(".5", 30, &w));
	assert_false(request_parse_wait("0.0001", 30, &w));
	assert_false(request_parse_wait("1.2.3", 30, &w));
	assert_false(request_parse_wait("1,5", 30, &w));
	assert_false(request_parse_wait("1e3", 30, &w));
	assert_false(request_parse_wait("0x10", 30, &w));
	assert_false(request_parse_wait(" 1", 30, &w));
	assert_false(request_parse_wait("12345678901234567.5", 30, &w));
	assert_false(request_parse_wait("99999999999", 30, &w));
}

static void
test_job_path(void **state)
{
	char		id[UUID_TEXT_LEN + 1];
	bool		is_job;

	(void) state;
	assert_true(request_parse_job_path("/v1/restarts/" ID, id, &is_job));
	assert_true(is_job);
	assert_string_equal(id, ID);
	assert_false(request_parse_job_path("/v1/restarts/../etc/passwd", id, &is_job));
	assert_true(is_job);
	assert_string_equal(id, "");
	assert_false(request_parse_job_path("/v1/restarts/", id, &is_job));
	assert_false(is_job);
	assert_false(request_parse_job_path("/v1/restarts", id, &is_job));
	assert_false(is_job);
}

static void
test_tail(void **state)
{
	tail_buffer tb;
	size_t		len;
	char	   *s;

	(void) state;
	assert_true(tail_init(&tb, 8));
	tail_append(&tb, "abc", 3);
	s = tail_to_utf8(&tb, &len);
	assert_string_equal(s, "abc");
	assert_false(tb.truncated);
	free(s);
	tail_append(&tb, "defghij", 7);
	s = tail_to_utf8(&tb, &len);
	assert_string_equal(s, "cdefghij");
	assert_true(tb.truncated);
	free(s);
	tail_append(&tb, "0123456789XYZ", 13);
	s = tail_to_utf8(&tb, &len);
	assert_string_equal(s, "56789XYZ");
	free(s);
	tail_free(&tb);
}

/*
 * A tail allocates only what its bytes need, growing in steps through the
 * capacity and wrapping around only once it is full; what it returns is
 * always the last bytes appended, whatever the chunk sizes.
 */
static void
test_tail_growth(void **state)
{
	tail_buffer tb;
	char		all[5000];
	size_t		n = 0;
	size_t		len;
	char	   *s;

	(void) state;
	assert_true(tail_init(&tb, 1000));
	assert_null(tb.data);
	assert_int_equal(tb.alloc, 0);
	tail_append(&tb, "", 0);
	assert_null(tb.data);
	for (int i = 0; n < sizeof(all) - 64; i++)
	{
		char		chunk[64];
		int			k = snprintf(chunk, sizeof(chunk), "line %d%.*s\n", i, i % 40,
								 "........................................");

		memcpy(all + n, chunk, k);
		n += k;
		tail_append(&tb, chunk, k);
		assert_true(tb.alloc <= 1000);
		assert_true(tb.len <= tb.alloc);
		assert_int_equal(tb.truncated, n > 1000);
		if (i == 0)
			assert_int_equal(tb.alloc, 256);
	}
	assert_int_equal(tb.alloc, 1000);
	s = tail_to_utf8(&tb, &len);
	assert_int_equal(len, 1000);
	assert_memory_equal(s, all + n - 1000, 1000);
	free(s);
	tail_free(&tb);

	/* a capacity of 0 keeps nothing and says so */
	assert_true(tail_init(&tb, 0));
	tail_append(&tb, "x", 1);
	assert_true(tb.truncated);
	assert_int_equal(tb.len, 0);
	tail_free(&tb);
}

static void
test_utf8(void **state)
{
	size_t		len;
	char	   *s;

	(void) state;
	s = tail_sanitize_utf8("ok \xc3\xa9 \xff \xc3 \xed\xa0\x80 \xf0\x9f\x98\x80", 18, &len);
	assert_string_equal(s, "ok \xc3\xa9 \xef\xbf\xbd \xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd \xf0\x9f\x98\x80");
	free(s);
	s = tail_sanitize_utf8("a\0b", 3, &len);
	assert_int_equal(len, 5);
	free(s);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_valid_body),
		cmocka_unit_test(test_bad_bodies),
		cmocka_unit_test(test_uuid),
		cmocka_unit_test(test_rfc3339),
		cmocka_unit_test(test_wait),
		cmocka_unit_test(test_job_path),
		cmocka_unit_test(test_tail),
		cmocka_unit_test(test_tail_growth),
		cmocka_unit_test(test_utf8),
	};

	return cmocka_run_group_tests_name("request", tests, NULL, NULL);
}
