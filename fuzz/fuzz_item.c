
/*
 * libFuzzer target: ngx_aq_json_parse_item() of src/ngx_aq_json.c (the
 * body of extend, release and complete), fed the request body in a buffer
 * of exactly its size, once without and once with want_result.  item_id
 * and version get buffers of exactly the size the module gives them;
 * jansson's allocations from the "pool" are malloc()s of their own
 * (fuzz_ngx.c), freed after each call.
 *
 * Invariants:
 *   - the answer is NULL or one of the body errors of these endpoints
 *     (never internal_error: memory does not run out here);
 *   - NULL => item_id is a lowercase UUID with its NUL, the body's
 *     "item_id" lowercased; the body's "version" is a number holding a
 *     non-negative integer of at most 2^53 - 1 (JSON numbers are decoded as
 *     doubles), and version is its decimal text with its NUL; result is
 *     empty unless wanted and the body's "result" is an object, and then it
 *     is the whole body, NUL-terminated (the statement takes "result" from
 *     the body's own text);
 *   - anything but invalid_json => the body has no NUL byte and is valid
 *     UTF-8 (a NUL would cut the text PostgreSQL gets).
 */


#include "fuzz_ngx.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>


#define T  "item"


static void
check(const uint8_t *data, size_t size, ngx_uint_t want_result)
{
    char                   text[NGX_INT64_LEN + 1];
    double                 v;
    size_t                 i;
    u_char                *body, *item_id, *version;
    json_t                *root, *value;
    ngx_str_t              res;
    ngx_pool_t             pool;
    const char            *s;
    const ngx_aq_error_t  *err;

    body = malloc(size ? size : 1);
    item_id = malloc(NGX_AQ_UUID_LEN + 1);
    version = malloc(NGX_INT64_LEN + 1);

    if (body == NULL || item_id == NULL || version == NULL) {
        goto done;
    }

    memcpy(body, data, size);
    memset(item_id, 0xa5, NGX_AQ_UUID_LEN + 1);
    memset(version, 0xa5, NGX_INT64_LEN + 1);
    res.len = 12345;
    res.data = (u_char *) "sentinel";

    ngx_memzero(&pool, sizeof(ngx_pool_t));

    err = ngx_aq_json_parse_item(&pool, body, size, want_result, item_id,
                                 version, &res);

    FUZZ_CHECK(T, err == NULL
                  || err == &ngx_aq_err_invalid_json
                  || err == &ngx_aq_err_invalid_request
                  || err == &ngx_aq_err_missing_item_id
                  || err == &ngx_aq_err_invalid_item_id
                  || err == &ngx_aq_err_missing_version
                  || err == &ngx_aq_err_invalid_version
                  || (want_result && err == &ngx_aq_err_invalid_result),
               data, size);

    FUZZ_CHECK(T, memcmp(body, data, size) == 0, data, size);

    if (err != &ngx_aq_err_invalid_json) {
        FUZZ_CHECK(T, memchr(data, '\0', size) == NULL, data, size);
        FUZZ_CHECK(T, fuzz_utf8_valid(data, size), data, size);
    }

    if (err != NULL) {
        goto done;
    }

    /* decoded again as the module decodes it (numbers as doubles) */
    root = json_loadb((const char *) data, size,
                      JSON_DECODE_ANY | JSON_DECODE_INT_AS_REAL, NULL);
    FUZZ_CHECK(T, root != NULL && json_is_object(root), data, size);

    /* item_id */

    FUZZ_CHECK(T, fuzz_lower_uuid(item_id), data, size);

    value = json_object_get(root, "item_id");
    FUZZ_CHECK(T, value != NULL && json_is_string(value)
                  && json_string_length(value) == NGX_AQ_UUID_LEN,
               data, size);

    s = json_string_value(value);

    for (i = 0; i < NGX_AQ_UUID_LEN; i++) {
        FUZZ_CHECK(T, item_id[i] == ngx_tolower((u_char) s[i]), data, size);
    }

    /* version */

    value = json_object_get(root, "version");
    FUZZ_CHECK(T, value != NULL && json_is_number(value), data, size);

    v = json_number_value(value);
    FUZZ_CHECK(T, v >= 0 && v <= 9007199254740991.0
                  && v == (double) (int64_t) v, data, size);

    snprintf(text, sizeof(text), "%" PRId64, (int64_t) v);
    FUZZ_CHECK(T, memchr(version, '\0', NGX_INT64_LEN + 1) != NULL,
               data, size);
    FUZZ_CHECK(T, strcmp((char *) version, text) == 0, data, size);

    /* result */

    value = json_object_get(root, "result");

    if (!want_result || value == NULL || json_is_null(value)) {
        FUZZ_CHECK(T, res.len == 0 && res.data == NULL, data, size);

    } else {
        FUZZ_CHECK(T, json_is_object(value), data, size);
        FUZZ_CHECK(T, res.len == size && res.data != NULL
                      && memcmp(res.data, data, size) == 0
                      && res.data[size] == '\0', data, size);
    }

    json_decref(root);

done:

    fuzz_pool_reset();
    free(version);
    free(item_id);
    free(body);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check(data, size, 0);
    check(data, size, 1);

    return 0;
}
