/*-------------------------------------------------------------------------
 *
 * sign.c
 *		Standard Webhooks v1 signatures of the calls to agents.
 *
 * The signature is base64(HMAC-SHA256(key, id "." timestamp "." body)),
 * sent as "v1,<signature>" in the webhook-signature header.  The agent
 * recognises a repeated call by its webhook-id, the request id.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "common/base64.h"
#include "lib/stringinfo.h"

#include "restart_worker.h"

/*
 * Write "v1,<base64 signature>" of one call into out.  Returns false if the
 * signature could not be computed or does not fit.
 */
bool
restart_worker_sign(const unsigned char *key, int keylen,
					const char *id, const char *timestamp,
					const char *body, size_t bodylen,
					char *out, size_t outsize)
{
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int maclen = 0;
	StringInfoData msg;
	bool		ok;
	int			n;

	initStringInfo(&msg);
	appendStringInfo(&msg, "%s.%s.", id, timestamp);
	appendBinaryStringInfo(&msg, body, bodylen);
	ok = HMAC(EVP_sha256(), key, keylen, (const unsigned char *) msg.data,
			  msg.len, mac, &maclen) != NULL;
	pfree(msg.data);
	if (!ok || outsize < 4 + (size_t) pg_b64_enc_len(maclen))
		return false;

	memcpy(out, "v1,", 3);
	n = pg_b64_encode((const char *) mac, maclen, out + 3, outsize - 4);
	if (n < 0)
		return false;
	out[3 + n] = '\0';
	return true;
}
