/*
 * libFuzzer target for verify.c.  The input is "id\ntimestamp\nsignature\nbody";
 * a signature line of "SIGN" is replaced by the correct signature, which
 * checks the property that a correctly signed request always verifies.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

#define NOW 1614265330

/* Cut the next '\n'-terminated field out of the input. */
static char *
next_field(const uint8_t **data, size_t *size)
{
	const uint8_t *nl = memchr(*data, '\n', *size);
	size_t		len = nl ? (size_t) (nl - *data) : *size;
	char	   *s = malloc(len + 1);

	memcpy(s, *data, len);
	s[len] = '\0';
	*data += nl ? len + 1 : len;
	*size -= nl ? len + 1 : len;
	return s;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static verify_secret secrets[2];
	static int	ready;
	char	   *id;
	char	   *ts;
	char	   *sig;
	char		good[64];
	verify_result res;
	const char *reason;

	if (!ready)
	{
		verify_parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &secrets[0], &reason);
		verify_parse_secret("whsec_MDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3BxcnN0dXY=", &secrets[1], &reason);
		ready = 1;
	}
	id = next_field(&data, &size);
	ts = next_field(&data, &size);
	sig = next_field(&data, &size);
	/* the secret parser sees hostile text too */
	{
		verify_secret tmp;

		verify_parse_secret(sig, &tmp, &reason);
	}
	if (strcmp(sig, "SIGN") == 0 &&
		verify_sign(&secrets[1], id, ts, data, size, good, sizeof(good)))
	{
		res = verify_request(id, ts, good, data, size, NOW, secrets, 2);
		if (res != VERIFY_OK && res != VERIFY_BAD_ID && res != VERIFY_BAD_TIMESTAMP &&
			res != VERIFY_STALE_TIMESTAMP)
			abort();
		if (strcmp(id, "msg_p5jXN8AQM9LWM0D4loKWxJek") == 0 && strcmp(ts, "1614265330") == 0 &&
			res != VERIFY_OK)
			abort();
	}
	else
		verify_request(id, ts, sig, data, size, NOW, secrets, 2);
	free(id);
	free(ts);
	free(sig);
	return 0;
}
