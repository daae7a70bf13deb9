
/*
 * Request bodies: JSON objects.
 *
 *   claim                 {"queue_id": "<uuid>"}
 *   extend, release, skip {"item_id": "<uuid>", "version": <integer>}
 *   complete              {"item_id": "<uuid>", "version": <integer>,
 *                          "result": {...}}            (result optional)
 *
 * The item's endpoints also take an optional "queue_id": "<uuid>", the
 * item's queue (needed on Citus, see ngx_aq_item.c).
 *
 * jansson rejects invalid UTF-8, NUL bytes (escaped or raw), nesting beyond
 * its depth limit and, with JSON_REJECT_DUPLICATES, objects that name a key
 * twice.  Numbers are decoded as doubles (JSON_DECODE_INT_AS_REAL), so that
 * an integer beyond 64 bits is valid JSON here too; a result object is
 * never re-encoded: PostgreSQL takes it from the body's own text, numbers
 * exact.  Members the endpoint does not know are ignored.
 *
 * jansson allocates from the request's pool while it parses (its allocator
 * is swapped in for the parse and restored after it): no heap allocation
 * per request, nothing to free on any path.
 */


#include "ngx_aq.h"
#include <jansson.h>


static void ngx_aq_json_enter(ngx_pool_t *pool);
static void ngx_aq_json_leave(void);
static void *ngx_aq_json_alloc(size_t size);
static void ngx_aq_json_free(void *p);
static json_t *ngx_aq_json_load(u_char *body, size_t len,
    const ngx_aq_error_t **err);
static const ngx_aq_error_t *ngx_aq_json_uuid(json_t *root, const char *name,
    u_char *uuid, const ngx_aq_error_t *missing,
    const ngx_aq_error_t *invalid);


static ngx_pool_t        *ngx_aq_json_pool;
static json_malloc_t      ngx_aq_json_saved_malloc;
static json_free_t        ngx_aq_json_saved_free;


const ngx_aq_error_t *
ngx_aq_json_parse_claim(ngx_pool_t *pool, u_char *body, size_t len,
    u_char *queue_id)
{
    json_t                *root;
    const ngx_aq_error_t  *err;

    ngx_aq_json_enter(pool);

    root = ngx_aq_json_load(body, len, &err);

    if (root) {
        err = ngx_aq_json_uuid(root, "queue_id", queue_id,
                               &ngx_aq_err_missing_queue_id,
                               &ngx_aq_err_invalid_queue_id);
        json_decref(root);
    }

    ngx_aq_json_leave();

    return err;
}


const ngx_aq_error_t *
ngx_aq_json_parse_item(ngx_pool_t *pool, u_char *body, size_t len,
    ngx_uint_t want_result, u_char *item_id, u_char *version,
    u_char *queue_id, ngx_str_t *result)
{
    double                 v;
    json_t                *root, *value;
    const ngx_aq_error_t  *err;

    ngx_aq_json_enter(pool);

    root = ngx_aq_json_load(body, len, &err);
    if (root == NULL) {
        ngx_aq_json_leave();
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

    v = json_is_number(value) ? json_number_value(value) : -1;

    /* an integer a double holds exactly */

    if (v < 0 || v > 9007199254740991.0 || v != (double) (int64_t) v) {
        err = &ngx_aq_err_invalid_version;
        goto done;
    }

    *ngx_sprintf(version, "%L", (int64_t) v) = '\0';

    /* optional: "" when absent */

    queue_id[0] = '\0';

    if (json_object_get(root, "queue_id") != NULL) {
        err = ngx_aq_json_uuid(root, "queue_id", queue_id,
                               &ngx_aq_err_missing_queue_id,
                               &ngx_aq_err_invalid_queue_id);
        if (err) {
            goto done;
        }
    }

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

    /* the whole body, NUL-terminated: the statement takes its "result" */

    result->data = ngx_pnalloc(pool, len + 1);
    if (result->data == NULL) {
        err = &ngx_aq_err_internal;
        goto done;
    }

    *ngx_cpymem(result->data, body, len) = '\0';
    result->len = len;

done:

    json_decref(root);

    ngx_aq_json_leave();

    return err;
}


static void
ngx_aq_json_enter(ngx_pool_t *pool)
{
    json_get_alloc_funcs(&ngx_aq_json_saved_malloc, &ngx_aq_json_saved_free);
    json_set_alloc_funcs(ngx_aq_json_alloc, ngx_aq_json_free);

    ngx_aq_json_pool = pool;
}


static void
ngx_aq_json_leave(void)
{
    json_set_alloc_funcs(ngx_aq_json_saved_malloc, ngx_aq_json_saved_free);

    ngx_aq_json_pool = NULL;
}


static void *
ngx_aq_json_alloc(size_t size)
{
    return ngx_palloc(ngx_aq_json_pool, size);
}


/* the pool frees it all with the request */

static void
ngx_aq_json_free(void *p)
{
}


static json_t *
ngx_aq_json_load(u_char *body, size_t len, const ngx_aq_error_t **err)
{
    json_t        *root;
    json_error_t   error;

    /*
     * jansson stops at a raw NUL byte as at the end of the input, and
     * takes what came before it; PostgreSQL would read the body that far
     */

    if (ngx_strlchr(body, body + len, '\0') != NULL) {
        *err = &ngx_aq_err_invalid_json;
        return NULL;
    }

    root = json_loadb((const char *) body, len,
                      JSON_DECODE_ANY | JSON_REJECT_DUPLICATES
                      | JSON_DECODE_INT_AS_REAL, &error);
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

        if (c >= '0' && c <= '9') {
            continue;
        }

        /* not c |= 0x20 on everything: it makes 0x10-0x19 digits */

        c |= 0x20;

        if (c < 'a' || c > 'f') {
            return 0;
        }
    }

    return 1;
}
