
/*
 * Request bodies: JSON objects.
 *
 *   claim                 {"queue_id": "<uuid>"}
 *   extend, release       {"item_id": "<uuid>", "version": <integer>}
 *   complete              {"item_id": "<uuid>", "version": <integer>,
 *                          "result": {...}}            (result optional)
 *
 * jansson rejects invalid UTF-8, NUL bytes (escaped or raw), nesting beyond
 * its depth limit and, with JSON_REJECT_DUPLICATES, objects that name a key
 * twice.  Members the endpoint does not know are ignored.
 */


#include "ngx_aq.h"
#include <jansson.h>


static json_t *ngx_aq_json_load(u_char *body, size_t len,
    const ngx_aq_error_t **err);
static const ngx_aq_error_t *ngx_aq_json_uuid(json_t *root, const char *name,
    u_char *uuid, const ngx_aq_error_t *missing,
    const ngx_aq_error_t *invalid);


const ngx_aq_error_t *
ngx_aq_json_parse_claim(u_char *body, size_t len, u_char *queue_id)
{
    json_t                *root;
    const ngx_aq_error_t  *err;

    root = ngx_aq_json_load(body, len, &err);
    if (root == NULL) {
        return err;
    }

    err = ngx_aq_json_uuid(root, "queue_id", queue_id,
                           &ngx_aq_err_missing_queue_id,
                           &ngx_aq_err_invalid_queue_id);

    json_decref(root);

    return err;
}


const ngx_aq_error_t *
ngx_aq_json_parse_item(ngx_pool_t *pool, u_char *body, size_t len,
    ngx_uint_t want_result, u_char *item_id, u_char *version,
    ngx_str_t *result)
{
    char                  *text;
    size_t                 n;
    json_t                *root, *value;
    json_int_t             v;
    const ngx_aq_error_t  *err;

    root = ngx_aq_json_load(body, len, &err);
    if (root == NULL) {
        return err;
    }

    err = ngx_aq_json_uuid(root, "item_id", item_id,
                           &ngx_aq_err_missing_item_id,
                           &ngx_aq_err_invalid_item_id);
    if (err) {
        goto done;
    }

    value = json_object_get(root, "version");

    if (value == NULL) {
        err = &ngx_aq_err_missing_version;
        goto done;
    }

    if (!json_is_integer(value) || json_integer_value(value) < 0) {
        err = &ngx_aq_err_invalid_version;
        goto done;
    }

    v = json_integer_value(value);
    *ngx_sprintf(version, "%L", (int64_t) v) = '\0';

    ngx_str_null(result);

    if (!want_result) {
        goto done;
    }

    value = json_object_get(root, "result");

    if (value == NULL || json_is_null(value)) {
        goto done;
    }

    if (!json_is_object(value)) {
        err = &ngx_aq_err_invalid_result;
        goto done;
    }

    text = json_dumps(value, JSON_COMPACT);
    if (text == NULL) {
        err = &ngx_aq_err_internal;
        goto done;
    }

    n = ngx_strlen(text);

    result->data = ngx_pnalloc(pool, n + 1);

    if (result->data == NULL) {
        err = &ngx_aq_err_internal;

    } else {
        ngx_memcpy(result->data, text, n + 1);
        result->len = n;
    }

    free(text);

done:

    json_decref(root);

    return err;
}


static json_t *
ngx_aq_json_load(u_char *body, size_t len, const ngx_aq_error_t **err)
{
    json_t        *root;
    json_error_t   error;

    root = json_loadb((const char *) body, len,
                      JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &error);
    if (root == NULL) {
        *err = &ngx_aq_err_invalid_json;
        return NULL;
    }

    if (!json_is_object(root)) {
        json_decref(root);
        *err = &ngx_aq_err_invalid_request;
        return NULL;
    }

    *err = NULL;

    return root;
}


/* a member holding a UUID string, copied lowercase and NUL-terminated */

static const ngx_aq_error_t *
ngx_aq_json_uuid(json_t *root, const char *name, u_char *uuid,
    const ngx_aq_error_t *missing, const ngx_aq_error_t *invalid)
{
    json_t  *value;

    value = json_object_get(root, name);

    if (value == NULL) {
        return missing;
    }

    if (!json_is_string(value)
        || !ngx_aq_uuid_valid((u_char *) json_string_value(value),
                              json_string_length(value)))
    {
        return invalid;
    }

    ngx_strlow(uuid, (u_char *) json_string_value(value), NGX_AQ_UUID_LEN);
    uuid[NGX_AQ_UUID_LEN] = '\0';

    return NULL;
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
