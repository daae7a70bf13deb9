
/*
 * libFuzzer target: ngx_aq_key_parse() of src/ngx_aq_key.c, fed the value
 * of the Authorization header (the input's bytes, in a buffer of exactly
 * their size, so that any read past the header is an ASan report).
 *
 * Each input is parsed twice: as it is, and with its last 8 bytes replaced
 * by the checksum of the 64 bytes before them (so that mutations of valid
 * keys keep reaching the digest).  Both outcomes must equal those of the
 * reference below, which restates the README's key format:
 *
 *   "Bearer" (any case), one or more SP/HT, then the key:
 *   "aqk_" + 64 lowercase hex + 8 lowercase hex of SHA-256(the 64)[0..4)
 *
 * and an accepted key must yield digest = SHA-256(the 76 bytes of the key)
 * and prefix = its first 12 bytes; a refused one must leave both untouched.
 */


#include "fuzz_ngx.h"

#include <stdlib.h>
#include <string.h>
#include <openssl/sha.h>


#define T  "key"


static int
ref_hex(const uint8_t *p, size_t n)
{
    size_t  i;

    for (i = 0; i < n; i++) {
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f'))) {
            return 0;
        }
    }

    return 1;
}


static void
checksum(const uint8_t *body, uint8_t *out)
{
    static const char  hex[] = "0123456789abcdef";
    unsigned char      sum[SHA256_DIGEST_LENGTH];
    int                i;

    SHA256(body, 64, sum);

    for (i = 0; i < 4; i++) {
        out[2 * i] = hex[sum[i] >> 4];
        out[2 * i + 1] = hex[sum[i] & 0xf];
    }
}


static ngx_aq_key_rc_e
ref_parse(const uint8_t *p, size_t n, const uint8_t **key)
{
    static const char  bearer[] = "bearer";
    uint8_t            sum[8];
    size_t             i;

    if (n < 7) {
        return ngx_aq_key_bad_scheme;
    }

    for (i = 0; i < 6; i++) {
        if ((p[i] >= 'A' && p[i] <= 'Z' ? p[i] | 0x20 : p[i]) != bearer[i]) {
            return ngx_aq_key_bad_scheme;
        }
    }

    while (i < n && (p[i] == ' ' || p[i] == '\t')) {
        i++;
    }

    if (i == 6 || i == n) {
        return ngx_aq_key_bad_scheme;
    }

    p += i;
    n -= i;
    *key = p;

    if (n != 76 || memcmp(p, "aqk_", 4) != 0 || !ref_hex(p + 4, 72)) {
        return ngx_aq_key_malformed;
    }

    checksum(p + 4, sum);

    if (memcmp(sum, p + 68, 8) != 0) {
        return ngx_aq_key_malformed;
    }

    return ngx_aq_key_ok;
}


static void
check(uint8_t *buf, size_t size, int with_prefix)
{
    u_char           digest[NGX_AQ_DIGEST_LEN], prefix[NGX_AQ_KEY_PUBLIC_LEN];
    unsigned char    want[SHA256_DIGEST_LENGTH];
    const uint8_t   *key;
    ngx_str_t        value;
    ngx_aq_key_rc_e  rc, ref;

    value.data = buf;
    value.len = size;

    memset(digest, 0xa5, sizeof(digest));
    memset(prefix, 0xa5, sizeof(prefix));

    rc = ngx_aq_key_parse(&value, digest, with_prefix ? prefix : NULL);

    key = NULL;
    ref = ref_parse(buf, size, &key);

    FUZZ_CHECK(T, rc == ref, buf, size);

    if (rc == ngx_aq_key_ok) {
        SHA256(key, NGX_AQ_KEY_LEN, want);
        FUZZ_CHECK(T, memcmp(digest, want, NGX_AQ_DIGEST_LEN) == 0,
                   buf, size);

        if (with_prefix) {
            FUZZ_CHECK(T, memcmp(prefix, key, NGX_AQ_KEY_PUBLIC_LEN) == 0,
                       buf, size);
        }

        return;
    }

    memset(want, 0xa5, sizeof(want));
    FUZZ_CHECK(T, memcmp(digest, want, NGX_AQ_DIGEST_LEN) == 0, buf, size);
    FUZZ_CHECK(T, memcmp(prefix, want, NGX_AQ_KEY_PUBLIC_LEN) == 0,
               buf, size);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t  *buf;

    /* exactly size bytes: no terminator nginx would not have either */
    buf = malloc(size ? size : 1);
    if (buf == NULL) {
        return 0;
    }

    memcpy(buf, data, size);
    check(buf, size, 1);

    if (size >= 72) {
        checksum(buf + size - 72, buf + size - 8);
        check(buf, size, 0);
    }

    free(buf);

    if (size == 0) {
        FUZZ_CHECK(T, ngx_aq_key_parse(NULL, NULL, NULL) == ngx_aq_key_missing,
                   data, size);
    }

    return 0;
}
