
/*
 * The bearer key: "Authorization: Bearer aqk_<64 hex><8 hex checksum>".
 *
 * A key is checked for shape and checksum here, so that a malformed or
 * mistyped key is refused without a database round trip; a well-formed one
 * is reduced to its SHA-256 digest, the only form the database ever sees.
 * The key itself is never logged.
 */


/*
 * SHA-256 through OpenSSL's low-level functions: a context on the stack, no
 * allocation per digest (EVP_Digest() allocates contexts every time).
 * They are deprecated in OpenSSL 3 in favour of EVP, not removed.
 */
#define OPENSSL_SUPPRESS_DEPRECATED

#include "ngx_aq.h"
#include <openssl/sha.h>


static ngx_int_t ngx_aq_key_is_hex(u_char *p, size_t len);
static ngx_int_t ngx_aq_sha256(u_char *data, size_t len, u_char *digest);


ngx_aq_key_rc_e
ngx_aq_key_parse(ngx_str_t *authorization, u_char *digest, u_char *prefix)
{
    u_char     *p, *last, *key;
    u_char      sum[NGX_AQ_DIGEST_LEN];
    u_char      hex[NGX_AQ_KEY_CHECKSUM_LEN];
    ngx_uint_t  spaces;

    if (authorization == NULL) {
        return ngx_aq_key_missing;
    }

    p = authorization->data;
    last = p + authorization->len;

    if (authorization->len < sizeof("Bearer ") - 1
        || ngx_strncasecmp(p, (u_char *) "Bearer", sizeof("Bearer") - 1)
           != 0)
    {
        return ngx_aq_key_bad_scheme;
    }

    p += sizeof("Bearer") - 1;

    for (spaces = 0; p < last && (*p == ' ' || *p == '\t'); p++) {
        spaces++;
    }

    if (spaces == 0 || p == last) {
        return ngx_aq_key_bad_scheme;
    }

    key = p;

    if ((size_t) (last - key) != NGX_AQ_KEY_LEN
        || ngx_strncmp(key, NGX_AQ_KEY_PREFIX, NGX_AQ_KEY_PREFIX_LEN) != 0
        || !ngx_aq_key_is_hex(key + NGX_AQ_KEY_PREFIX_LEN,
                              NGX_AQ_KEY_BODY_LEN + NGX_AQ_KEY_CHECKSUM_LEN))
    {
        return ngx_aq_key_malformed;
    }

    /* the checksum: the first 4 bytes of SHA-256 of the 64 random digits */

    if (ngx_aq_sha256(key + NGX_AQ_KEY_PREFIX_LEN, NGX_AQ_KEY_BODY_LEN, sum)
        != NGX_OK)
    {
        return ngx_aq_key_malformed;
    }

    ngx_hex_dump(hex, sum, NGX_AQ_KEY_CHECKSUM_LEN / 2);

    if (ngx_strncmp(hex, key + NGX_AQ_KEY_PREFIX_LEN + NGX_AQ_KEY_BODY_LEN,
                    NGX_AQ_KEY_CHECKSUM_LEN)
        != 0)
    {
        return ngx_aq_key_malformed;
    }

    if (ngx_aq_sha256(key, NGX_AQ_KEY_LEN, digest) != NGX_OK) {
        return ngx_aq_key_malformed;
    }

    if (prefix) {
        ngx_memcpy(prefix, key, NGX_AQ_KEY_PUBLIC_LEN);
    }

    return ngx_aq_key_ok;
}


static ngx_int_t
ngx_aq_key_is_hex(u_char *p, size_t len)
{
    u_char  *last;

    for (last = p + len; p < last; p++) {
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) {
            return 0;
        }
    }

    return 1;
}


static ngx_int_t
ngx_aq_sha256(u_char *data, size_t len, u_char *digest)
{
    SHA256_CTX  ctx;

    if (SHA256_Init(&ctx) != 1
        || SHA256_Update(&ctx, data, len) != 1
        || SHA256_Final(digest, &ctx) != 1)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}
