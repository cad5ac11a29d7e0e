/*
 * Unit tests of verify.c: Standard Webhooks v1 signatures.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "agent.h"

#define VEC_SECRET "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
#define VEC_ID "msg_p5jXN8AQM9LWM0D4loKWxJek"
#define VEC_TS "1614265330"
#define VEC_BODY "{\"test\": 2432232314}"
#define VEC_SIG "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
#define VEC_NOW 1614265330

static verify_secret secret;
static verify_secret other;

/* Parse the vector's secret and a second, unrelated one. */
static int
setup(void **state)
{
	const char *reason;

	(void) state;
	assert_true(verify_parse_secret(VEC_SECRET, &secret, &reason));
	assert_true(verify_parse_secret("whsec_MDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3BxcnN0dXY=", &other, &reason));
	return 0;
}

/* Verify the given headers against the vector body at time now. */
static verify_result
check(const char *id, const char *ts, const char *sig, const char *body, time_t now,
	  const verify_secret *secrets, int n)
{
	return verify_request(id, ts, sig, (const unsigned char *) body, strlen(body), now, secrets, n);
}

static void
test_spec_vector(void **state)
{
	(void) state;
	assert_int_equal(check(VEC_ID, VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_OK);
}

static void
test_sign_matches_vector(void **state)
{
	char		out[64];

	(void) state;
	assert_true(verify_sign(&secret, VEC_ID, VEC_TS, (const unsigned char *) VEC_BODY,
							strlen(VEC_BODY), out, sizeof(out)));
	assert_string_equal(out, VEC_SIG);
}

static void
test_tampered_body(void **state)
{
	(void) state;
	assert_int_equal(check(VEC_ID, VEC_TS, VEC_SIG, "{\"test\": 2432232315}", VEC_NOW, &secret, 1),
					 VERIFY_NO_MATCH);
}

static void
test_tampered_id(void **state)
{
	(void) state;
	assert_int_equal(check("msg_p5jXN8AQM9LWM0D4loKWxJel", VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1),
					 VERIFY_NO_MATCH);
}

static void
test_tampered_timestamp(void **state)
{
	(void) state;
	assert_int_equal(check(VEC_ID, "1614265331", VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1),
					 VERIFY_NO_MATCH);
}

static void
test_wrong_secret(void **state)
{
	(void) state;
	assert_int_equal(check(VEC_ID, VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW, &other, 1), VERIFY_NO_MATCH);
}

static void
test_rotation_several_secrets(void **state)
{
	verify_secret both[2];

	(void) state;
	both[0] = other;
	both[1] = secret;
	assert_int_equal(check(VEC_ID, VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW, both, 2), VERIFY_OK);
	both[0] = secret;
	both[1] = other;
	assert_int_equal(check(VEC_ID, VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW, both, 2), VERIFY_OK);
}

static void
test_rotation_several_signatures(void **state)
{
	char		mine[64];
	char		header[256];

	(void) state;
	assert_true(verify_sign(&other, VEC_ID, VEC_TS, (const unsigned char *) VEC_BODY,
							strlen(VEC_BODY), mine, sizeof(mine)));
	snprintf(header, sizeof(header), "%s v2,whatever %s", mine, VEC_SIG);
	assert_int_equal(check(VEC_ID, VEC_TS, header, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_OK);
	snprintf(header, sizeof(header), "%s", mine);
	assert_int_equal(check(VEC_ID, VEC_TS, header, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_NO_MATCH);
}

static void
test_missing_headers(void **state)
{
	(void) state;
	assert_int_equal(check(NULL, VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_MISSING_HEADER);
	assert_int_equal(check(VEC_ID, NULL, VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_MISSING_HEADER);
	assert_int_equal(check(VEC_ID, VEC_TS, NULL, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_MISSING_HEADER);
}

static void
test_missing_v1(void **state)
{
	(void) state;
	assert_int_equal(check(VEC_ID, VEC_TS, "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
						   VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_SIGNATURE_HEADER);
	assert_int_equal(check(VEC_ID, VEC_TS, "", VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_SIGNATURE_HEADER);
	assert_int_equal(check(VEC_ID, VEC_TS, "   ", VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_SIGNATURE_HEADER);
	assert_int_equal(check(VEC_ID, VEC_TS, "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
						   VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_SIGNATURE_HEADER);
}

static void
test_bad_base64(void **state)
{
	(void) state;
	/* invalid character, missing padding, wrong length, padding inside */
	assert_int_equal(check(VEC_ID, VEC_TS, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1O!=",
						   VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_SIGNATURE_HEADER);
	assert_int_equal(check(VEC_ID, VEC_TS, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE",
						   VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_SIGNATURE_HEADER);
	assert_int_equal(check(VEC_ID, VEC_TS, "v1,AAAA", VEC_BODY, VEC_NOW, &secret, 1),
					 VERIFY_BAD_SIGNATURE_HEADER);
	assert_int_equal(check(VEC_ID, VEC_TS, "v1,g0hM=SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
						   VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_SIGNATURE_HEADER);
	assert_int_equal(check(VEC_ID, VEC_TS, "v1,", VEC_BODY, VEC_NOW, &secret, 1),
					 VERIFY_BAD_SIGNATURE_HEADER);
}

static void
test_too_many_signatures(void **state)
{
	char		header[1024] = "";

	(void) state;
	for (int i = 0; i < SIGNATURES_MAX; i++)
		strcat(header, "v2,x ");
	strcat(header, VEC_SIG);
	assert_int_equal(check(VEC_ID, VEC_TS, header, VEC_BODY, VEC_NOW, &secret, 1),
					 VERIFY_BAD_SIGNATURE_HEADER);
}

static void
test_too_long_header(void **state)
{
	char		header[SIGNATURE_HEADER_MAX + 64];

	(void) state;
	memset(header, ' ', sizeof(header));
	memcpy(header, VEC_SIG, strlen(VEC_SIG));
	header[sizeof(header) - 1] = '\0';
	assert_int_equal(check(VEC_ID, VEC_TS, header, VEC_BODY, VEC_NOW, &secret, 1),
					 VERIFY_BAD_SIGNATURE_HEADER);
}

static void
test_bad_id_and_timestamp(void **state)
{
	char		longid[WEBHOOK_ID_MAX + 2];

	(void) state;
	memset(longid, 'a', sizeof(longid));
	longid[sizeof(longid) - 1] = '\0';
	assert_int_equal(check(longid, VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_ID);
	assert_int_equal(check("", VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_ID);
	assert_int_equal(check("a b", VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_ID);
	assert_int_equal(check(VEC_ID, "16142653x0", VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_TIMESTAMP);
	assert_int_equal(check(VEC_ID, "-1614265330", VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_TIMESTAMP);
	assert_int_equal(check(VEC_ID, "", VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1), VERIFY_BAD_TIMESTAMP);
	assert_int_equal(check(VEC_ID, "1234567890123456789012", VEC_SIG, VEC_BODY, VEC_NOW, &secret, 1),
					 VERIFY_BAD_TIMESTAMP);
}

static void
test_timestamp_window(void **state)
{
	(void) state;
	assert_int_equal(check(VEC_ID, VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW + 300, &secret, 1), VERIFY_OK);
	assert_int_equal(check(VEC_ID, VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW - 300, &secret, 1), VERIFY_OK);
	assert_int_equal(check(VEC_ID, VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW + 301, &secret, 1),
					 VERIFY_STALE_TIMESTAMP);
	assert_int_equal(check(VEC_ID, VEC_TS, VEC_SIG, VEC_BODY, VEC_NOW - 301, &secret, 1),
					 VERIFY_STALE_TIMESTAMP);
}

static void
test_parse_secret(void **state)
{
	verify_secret s;
	const char *reason;

	(void) state;
	assert_false(verify_parse_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &s, &reason));
	assert_false(verify_parse_secret("whsec_", &s, &reason));
	assert_false(verify_parse_secret("whsec_YWJj", &s, &reason));	/* 3 bytes: too short */
	assert_false(verify_parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2La!aSw", &s, &reason));
	assert_true(verify_parse_secret(VEC_SECRET, &s, &reason));
	assert_int_equal(s.keylen, 24);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_spec_vector),
		cmocka_unit_test(test_sign_matches_vector),
		cmocka_unit_test(test_tampered_body),
		cmocka_unit_test(test_tampered_id),
		cmocka_unit_test(test_tampered_timestamp),
		cmocka_unit_test(test_wrong_secret),
		cmocka_unit_test(test_rotation_several_secrets),
		cmocka_unit_test(test_rotation_several_signatures),
		cmocka_unit_test(test_missing_headers),
		cmocka_unit_test(test_missing_v1),
		cmocka_unit_test(test_bad_base64),
		cmocka_unit_test(test_too_many_signatures),
		cmocka_unit_test(test_too_long_header),
		cmocka_unit_test(test_bad_id_and_timestamp),
		cmocka_unit_test(test_timestamp_window),
		cmocka_unit_test(test_parse_secret),
	};

	return cmocka_run_group_tests_name("verify", tests, setup, NULL);
}
