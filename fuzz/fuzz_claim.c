
/*
 * libFuzzer target: ngx_aq_json_parse_claim() of src/ngx_aq_json.c, fed the
 * request body (in a buffer of exactly its size; queue_id in a buffer of
 * exactly NGX_AQ_UUID_LEN + 1 bytes).  jansson allocates from the "pool"
 * while it parses: here every such allocation is a malloc() of its own
 * (fuzz_ngx.c), freed after the input.
 *
 * Invariants:
 *   - the answer is NULL or one of the body errors of the claim;
 *   - NULL => queue_id is a lowercase UUID with its NUL, and it is the
 *     body's "queue_id" string lowercased (decoded again here);
 *   - an error => queue_id untouched;
 *   - anything but invalid_json => the body has no NUL byte and is valid
 *     UTF-8 (the README: such bodies are invalid_json).
 */


#include "fuzz_ngx.h"

#include <stdlib.h>
#include <string.h>
#include <jansson.h>


#define T  "claim"


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t                 i;
    u_char                *body, *queue_id, sentinel[NGX_AQ_UUID_LEN + 1];
    json_t                *root, *value;
    ngx_pool_t             pool;
    const char            *s;
    const ngx_aq_error_t  *err;

    body = malloc(size ? size : 1);
    queue_id = malloc(NGX_AQ_UUID_LEN + 1);

    if (body == NULL || queue_id == NULL) {
        free(body);
        free(queue_id);
        return 0;
    }

    memcpy(body, data, size);
    memset(sentinel, 0xa5, sizeof(sentinel));
    memcpy(queue_id, sentinel, sizeof(sentinel));

    ngx_memzero(&pool, sizeof(ngx_pool_t));

    err = ngx_aq_json_parse_claim(&pool, body, size, queue_id);

    FUZZ_CHECK(T, err == NULL
                  || err == &ngx_aq_err_invalid_json
                  || err == &ngx_aq_err_invalid_request
                  || err == &ngx_aq_err_missing_queue_id
                  || err == &ngx_aq_err_invalid_queue_id, data, size);

    FUZZ_CHECK(T, memcmp(body, data, size) == 0, data, size);

    if (err != &ngx_aq_err_invalid_json) {
        FUZZ_CHECK(T, memchr(data, '\0', size) == NULL, data, size);
        FUZZ_CHECK(T, fuzz_utf8_valid(data, size), data, size);
    }

    if (err != NULL) {
        FUZZ_CHECK(T, memcmp(queue_id, sentinel, sizeof(sentinel)) == 0,
                   data, size);
        goto done;
    }

    FUZZ_CHECK(T, fuzz_lower_uuid(queue_id), data, size);

    /* decoded again as the module decodes it (numbers as doubles) */
    root = json_loadb((const char *) data, size,
                      JSON_DECODE_ANY | JSON_DECODE_INT_AS_REAL, NULL);
    FUZZ_CHECK(T, root != NULL && json_is_object(root), data, size);

    value = json_object_get(root, "queue_id");
    FUZZ_CHECK(T, value != NULL && json_is_string(value)
                  && json_string_length(value) == NGX_AQ_UUID_LEN,
               data, size);

    s = json_string_value(value);

    for (i = 0; i < NGX_AQ_UUID_LEN; i++) {
        FUZZ_CHECK(T, queue_id[i] == ngx_tolower((u_char) s[i]), data, size);
    }

    json_decref(root);

done:

    fuzz_pool_reset();
    free(queue_id);
    free(body);

    return 0;
}
