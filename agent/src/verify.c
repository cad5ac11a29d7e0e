/*-------------------------------------------------------------------------
 *
 * verify.c
 *	  Standard Webhooks v1 signature verification.
 *
 * A request carries webhook-id, webhook-timestamp and webhook-signature.
 * The signature header is a space-separated list of "v1,<base64>" entries,
 * each a HMAC-SHA256 of "id.timestamp.body" keyed with the base64-decoded
 * part of a "whsec_" secret.  Any listed entry matching any configured
 * secret is accepted, which is what makes secret rotation possible.
 *
 *-------------------------------------------------------------------------
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "agent.h"

#define VERIFY_MAC_LEN 32
#define VERIFY_B64_MAX 128

/*
 * Check that in[0..inlen) is padded standard base64 (A-Z a-z 0-9 + /, at
 * most two '=' at the end, length a multiple of 4).  OpenSSL's decoder is
 * lenient about whitespace, so the strict shape is checked here first.
 */
static bool
verify_b64_shape(const char *in, size_t inlen, int *npad)
{
	*npad = 0;
	if (inlen == 0 || inlen % 4 != 0 || inlen > VERIFY_B64_MAX)
		return false;
	for (size_t i = 0; i < inlen; i++)
	{
		char		c = in[i];

		if (c == '=')
		{
			if (i + 2 < inlen)
				return false;
			(*npad)++;
		}
		else if (*npad > 0)
			return false;
		else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
				   (c >= '0' && c <= '9') || c == '+' || c == '/'))
			return false;
	}
	return true;
}

/*
 * Decode strict base64 into out (at least VERIFY_B64_MAX * 3 / 4 bytes).
 * Returns the decoded length, or -1 if the input is not valid base64.
 */
static int
verify_b64_decode(const char *in, size_t inlen, unsigned char *out)
{
	int			npad;
	int			n;

	if (!verify_b64_shape(in, inlen, &npad))
		return -1;
	n = EVP_DecodeBlock(out, (const unsigned char *) in, (int) inlen);
	if (n < 0)
		return -1;
	return n - npad;
}

/*
 * Parse a "whsec_<base64>" secret into its key bytes.  The key must decode
 * to SECRET_KEY_MIN..SECRET_KEY_MAX bytes; on failure *reason says why.
 */
bool
verify_parse_secret(const char *text, verify_secret *secret, const char **reason)
{
	unsigned char buf[VERIFY_B64_MAX];
	size_t		len = strlen(text);
	int			n;

	if (strncmp(text, "whsec_", 6) != 0)
	{
		*reason = "secret does not start with \"whsec_\"";
		return false;
	}
	n = verify_b64_decode(text + 6, len - 6, buf);
	if (n < 0)
	{
		*reason = "secret is not valid base64 after \"whsec_\"";
		return false;
	}
	if (n < SECRET_KEY_MIN || n > SECRET_KEY_MAX)
	{
		*reason = "secret key must decode to 24..64 bytes";
		return false;
	}
	memcpy(secret->key, buf, n);
	secret->keylen = n;
	OPENSSL_cleanse(buf, sizeof(buf));
	return true;
}

/*
 * The HMAC-SHA256 context that every computation copies.  Looking the
 * algorithm and its digest up by name took as long as the rest of a
 * request's verification; a copy of a context that already has them needs
 * no look-up.  Made by the first request that needs it (verify_template_get()),
 * never changed afterwards, so threads may copy it at once.  If it cannot
 * be made (memory ran out), the next request tries again: made once for
 * good with pthread_once(), a failure left every later request refused
 * until the agent restarted.
 */
static EVP_MAC_CTX *verify_template;
static pthread_mutex_t verify_template_lock = PTHREAD_MUTEX_INITIALIZER;

/*
 * Make the template context; NULL if OpenSSL cannot.
 */
static EVP_MAC_CTX *
verify_make_template(void)
{
	EVP_MAC    *m = EVP_MAC_fetch(NULL, "HMAC", NULL);
	EVP_MAC_CTX *ctx = m ? EVP_MAC_CTX_new(m) : NULL;
	OSSL_PARAM	params[2];

	params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
												 (char *) "SHA256", 0);
	params[1] = OSSL_PARAM_construct_end();
	if (ctx != NULL && !EVP_MAC_CTX_set_params(ctx, params))
	{
		EVP_MAC_CTX_free(ctx);
		ctx = NULL;
	}
	EVP_MAC_free(m);			/* the context keeps its own reference */
	return ctx;
}

/*
 * Return the template context, making it if no request has yet; NULL if
 * it cannot be made now.  Once made it is read without the lock.
 */
static EVP_MAC_CTX *
verify_template_get(void)
{
	EVP_MAC_CTX *ctx = __atomic_load_n(&verify_template, __ATOMIC_ACQUIRE);

	if (ctx != NULL)
		return ctx;
	pthread_mutex_lock(&verify_template_lock);
	ctx = verify_template;
	if (ctx == NULL && (ctx = verify_make_template()) != NULL)
		__atomic_store_n(&verify_template, ctx, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&verify_template_lock);
	return ctx;
}

/*
 * Compute HMAC-SHA256(key, id "." timestamp "." body) into mac, the signed
 * content defined by Standard Webhooks.
 */
static bool
verify_compute(const verify_secret *secret, const char *id, const char *ts,
			   const unsigned char *body, size_t bodylen,
			   unsigned char mac[VERIFY_MAC_LEN])
{
	EVP_MAC_CTX *template = verify_template_get();
	EVP_MAC_CTX *ctx;
	size_t		outlen = 0;
	bool		ok;

	ctx = template ? EVP_MAC_CTX_dup(template) : NULL;
	ok = ctx != NULL &&
		EVP_MAC_init(ctx, secret->key, secret->keylen, NULL) &&
		EVP_MAC_update(ctx, (const unsigned char *) id, strlen(id)) &&
		EVP_MAC_update(ctx, (const unsigned char *) ".", 1) &&
		EVP_MAC_update(ctx, (const unsigned char *) ts, strlen(ts)) &&
		EVP_MAC_update(ctx, (const unsigned char *) ".", 1) &&
		(bodylen == 0 || EVP_MAC_update(ctx, body, bodylen)) &&
		EVP_MAC_final(ctx, mac, &outlen, VERIFY_MAC_LEN) &&
		outlen == VERIFY_MAC_LEN;
	EVP_MAC_CTX_free(ctx);
	return ok;
}

/*
 * Check, once at start, that a MAC can be computed with each configured
 * secret, making the template meanwhile.  A failure that is not about
 * memory (OpenSSL without the HMAC or SHA-256 of a provider: a provider
 * left out by its configuration, OPENSSL_CONF, or one that fails to load)
 * would otherwise show only in requests, every one answered 500 until the
 * worker gave up: the agent refuses to start instead, with why in errbuf
 * (OpenSSL's reason, when it gives one).
 */
bool
verify_check_secrets(const verify_secret *secrets, int nsecrets, char *errbuf, size_t errsize)
{
	unsigned char mac[VERIFY_MAC_LEN];

	for (int s = 0; s < nsecrets; s++)
	{
		char		reason[256] = "OpenSSL gives no reason";
		unsigned long e;

		ERR_clear_error();
		if (verify_compute(&secrets[s], "check", "0", (const unsigned char *) "", 0, mac))
			continue;
		if ((e = ERR_peek_last_error()) != 0)
			ERR_error_string_n(e, reason, sizeof(reason));
		ERR_clear_error();
		snprintf(errbuf, errsize,
				 "HMAC-SHA256 cannot be computed with secret %d of %d, so no request signature could be checked "
				 "(is OpenSSL's default provider available? see OPENSSL_CONF): %s", s + 1, nsecrets, reason);
		return false;
	}
	OPENSSL_cleanse(mac, sizeof(mac));
	return true;
}

/*
 * Check the webhook-id header: 1..WEBHOOK_ID_MAX printable ASCII
 * characters without spaces.
 */
static bool
verify_id_ok(const char *id)
{
	size_t		len = strlen(id);

	if (len == 0 || len > WEBHOOK_ID_MAX)
		return false;
	for (size_t i = 0; i < len; i++)
		if ((unsigned char) id[i] <= 0x20 || (unsigned char) id[i] >= 0x7f)
			return false;
	return true;
}

/*
 * Split the signature header into the decoded v1 MACs it lists.  Entries
 * with other version tags are ignored; a v1 entry that is not 32 bytes of
 * valid base64 makes the header malformed.  Returns the number of v1 MACs,
 * or -1 if the header is malformed (too long, too many entries, bad
 * base64).
 */
static int
verify_split_signatures(const char *header,
						unsigned char macs[SIGNATURES_MAX][VERIFY_MAC_LEN])
{
	size_t		len = strlen(header);
	size_t		pos = 0;
	int			nentries = 0;
	int			nmacs = 0;

	if (len == 0 || len > SIGNATURE_HEADER_MAX)
		return -1;
	while (pos < len)
	{
		size_t		end;

		if (header[pos] == ' ')
		{
			pos++;
			continue;
		}
		end = pos;
		while (end < len && header[end] != ' ')
			end++;
		if (++nentries > SIGNATURES_MAX)
			return -1;
		if (end - pos > 3 && strncmp(header + pos, "v1,", 3) == 0)
		{
			unsigned char buf[VERIFY_B64_MAX];
			int			n = verify_b64_decode(header + pos + 3, end - pos - 3, buf);

			if (n != VERIFY_MAC_LEN)
				return -1;
			memcpy(macs[nmacs++], buf, VERIFY_MAC_LEN);
		}
		pos = end;
	}
	return nmacs;
}

/*
 * Verify a request's Standard Webhooks headers against the body and the
 * configured secrets.  Every header is untrusted: all lengths and shapes
 * are checked before use, the timestamp must be within
 * TIMESTAMP_TOLERANCE seconds of now, and MACs are compared in constant
 * time.  Every (secret, listed signature) pair is tried.
 */
verify_result
verify_request(const char *id, const char *timestamp, const char *signature,
			   const unsigned char *body, size_t bodylen, time_t now,
			   const verify_secret *secrets, int nsecrets)
{
	unsigned char macs[SIGNATURES_MAX][VERIFY_MAC_LEN];
	unsigned char mine[VERIFY_MAC_LEN];
	int64_t		ts;
	int			nmacs;
	int			match = 0;

	if (id == NULL || timestamp == NULL || signature == NULL)
		return VERIFY_MISSING_HEADER;
	if (!verify_id_ok(id))
		return VERIFY_BAD_ID;
	if (!util_parse_digits(timestamp, 18, &ts))
		return VERIFY_BAD_TIMESTAMP;
	if (ts < (int64_t) now - TIMESTAMP_TOLERANCE ||
		ts > (int64_t) now + TIMESTAMP_TOLERANCE)
		return VERIFY_STALE_TIMESTAMP;
	nmacs = verify_split_signatures(signature, macs);
	if (nmacs <= 0)
		return VERIFY_BAD_SIGNATURE_HEADER;
	for (int s = 0; s < nsecrets; s++)
	{
		if (!verify_compute(&secrets[s], id, timestamp, body, bodylen, mine))
			return VERIFY_NOMEM;
		for (int i = 0; i < nmacs; i++)
			match |= (CRYPTO_memcmp(mine, macs[i], VERIFY_MAC_LEN) == 0);
	}
	OPENSSL_cleanse(mine, sizeof(mine));
	return match ? VERIFY_OK : VERIFY_NO_MATCH;
}

/*
 * Describe a verification result for error messages and logs.
 */
const char *
verify_result_text(verify_result res)
{
	switch (res)
	{
		case VERIFY_OK:
			return "signature ok";
		case VERIFY_MISSING_HEADER:
			return "missing webhook-id, webhook-timestamp or webhook-signature header";
		case VERIFY_BAD_ID:
			return "malformed webhook-id header";
		case VERIFY_BAD_TIMESTAMP:
			return "malformed webhook-timestamp header";
		case VERIFY_STALE_TIMESTAMP:
			return "webhook-timestamp is more than 300 seconds away from the agent's clock";
		case VERIFY_BAD_SIGNATURE_HEADER:
			return "malformed webhook-signature header (no valid v1 entry)";
		case VERIFY_NO_MATCH:
			return "no signature matches";
		case VERIFY_NOMEM:
			return "the agent ran out of memory while checking the signature";
	}
	return "unknown verification result";
}

/*
 * Produce "v1,<base64 MAC>" for a request; used by the unit tests and the
 * fuzz target to build valid requests.
 */
bool
verify_sign(const verify_secret *secret, const char *id, const char *timestamp,
			const unsigned char *body, size_t bodylen, char *out, size_t outsize)
{
	unsigned char mac[VERIFY_MAC_LEN];

	if (outsize < 3 + 45)
		return false;
	if (!verify_compute(secret, id, timestamp, body, bodylen, mac))
		return false;
	memcpy(out, "v1,", 3);
	EVP_EncodeBlock((unsigned char *) out + 3, mac, VERIFY_MAC_LEN);
	return true;
}
