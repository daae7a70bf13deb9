
/*
 * The claim's request body: a JSON object with a "queue_id" string holding
 * a UUID.  jansson rejects invalid UTF-8, NUL bytes (escaped or raw),
 * nesting beyond its depth limit and, with JSON_REJECT_DUPLICATES, objects
 * that name a key twice.
 */


#include "ngx_aq.h"
#include <jansson.h>


ngx_aq_json_rc_e
ngx_aq_json_parse_claim(u_char *body, size_t len, u_char *queue_id)
{
    size_t             n;
    json_t            *root, *value;
    const char        *s;
    json_error_t       error;
    ngx_aq_json_rc_e   rc;

    root = json_loadb((const char *) body, len,
                      JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &error);
    if (root == NULL) {
        return ngx_aq_json_invalid;
    }

    if (!json_is_object(root)) {
        rc = ngx_aq_json_not_object;
        goto done;
    }

    value = json_object_get(root, "queue_id");
    if (value == NULL) {
        rc = ngx_aq_json_missing_queue_id;
        goto done;
    }

    if (!json_is_string(value)) {
        rc = ngx_aq_json_bad_queue_id;
        goto done;
    }

    s = json_string_value(value);
    n = json_string_length(value);

    if (n != NGX_AQ_UUID_LEN || !ngx_aq_uuid_valid((u_char *) s, n)) {
        rc = ngx_aq_json_bad_queue_id;
        goto done;
    }

    ngx_strlow(queue_id, (u_char *) s, NGX_AQ_UUID_LEN);
    queue_id[NGX_AQ_UUID_LEN] = '\0';

    rc = ngx_aq_json_ok;

done:

    json_decref(root);

    return rc;
}


/* 8-4-4-4-12 hexadecimal digits, either case */

ngx_int_t
ngx_aq_uuid_valid(u_char *p, size_t len)
{
    u_char      c;
    ngx_uint_t  i;

    if (len != NGX_AQ_UUID_LEN) {
        return 0;
    }

    for (i = 0; i < NGX_AQ_UUID_LEN; i++) {
        c = p[i];

        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-') {
                return 0;
            }

            continue;
        }

        c |= 0x20;

        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return 0;
        }
    }

    return 1;
}
