
/*
 * Every answer of the module is JSON:
 *
 *   {"success": true, "item": {...}}
 *   {"success": false, "error": {"code": "<snake_case>", "message": "..."}}
 *
 * with the headers an error calls for (WWW-Authenticate, Allow, Retry-After).
 */


#include "ngx_aq.h"


static ngx_int_t ngx_aq_add_header(ngx_http_request_t *r, ngx_str_t *key,
    ngx_str_t *value);


static ngx_str_t  ngx_aq_content_type = ngx_string("application/json");
static ngx_str_t  ngx_aq_cache_control = ngx_string("Cache-Control");
static ngx_str_t  ngx_aq_no_store = ngx_string("no-store");
static ngx_str_t  ngx_aq_www_authenticate = ngx_string("WWW-Authenticate");
static ngx_str_t  ngx_aq_bearer =
    ngx_string("Bearer realm=\"annotation_queue\"");
static ngx_str_t  ngx_aq_bearer_invalid =
    ngx_string("Bearer realm=\"annotation_queue\", error=\"invalid_token\"");
static ngx_str_t  ngx_aq_allow = ngx_string("Allow");
static ngx_str_t  ngx_aq_post = ngx_string("POST");
static ngx_str_t  ngx_aq_retry_after = ngx_string("Retry-After");
static ngx_str_t  ngx_aq_one = ngx_string("1");


ngx_int_t
ngx_aq_send_json(ngx_http_request_t *r, ngx_uint_t status, u_char *body,
    size_t len)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    r->headers_out.status = status;
    r->headers_out.content_type = ngx_aq_content_type;
    r->headers_out.content_type_len = ngx_aq_content_type.len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n = len;

    if (ngx_aq_add_header(r, &ngx_aq_cache_control, &ngx_aq_no_store)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = body;
    b->last = body + len;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


ngx_int_t
ngx_aq_send_error(ngx_http_request_t *r, ngx_uint_t status, const char *code,
    const char *message)
{
    u_char     *body, *p;
    size_t      len;
    ngx_str_t  *value;

    switch (status) {

    case NGX_HTTP_UNAUTHORIZED:
        value = (ngx_strcmp(code, "invalid_api_key") == 0)
                ? &ngx_aq_bearer_invalid : &ngx_aq_bearer;

        if (ngx_aq_add_header(r, &ngx_aq_www_authenticate, value) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        break;

    case NGX_HTTP_NOT_ALLOWED:
        if (ngx_aq_add_header(r, &ngx_aq_allow, &ngx_aq_post) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        break;

    case NGX_HTTP_SERVICE_UNAVAILABLE:
    case NGX_HTTP_TOO_MANY_REQUESTS:
        if (ngx_aq_add_header(r, &ngx_aq_retry_after, &ngx_aq_one) != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        break;

    case NGX_HTTP_REQUEST_ENTITY_TOO_LARGE:
        /* the rest of the body is not read: close after the answer */
        r->keepalive = 0;
        break;

    default:
        break;
    }

    /* code and message are the module's own ASCII: nothing to escape */

    len = sizeof("{\"success\":false,\"error\":{\"code\":\"\",\"message\":\"\"}}")
          - 1 + ngx_strlen(code) + ngx_strlen(message);

    body = ngx_pnalloc(r->pool, len);
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_sprintf(body,
                    "{\"success\":false,\"error\":{\"code\":\"%s\","
                    "\"message\":\"%s\"}}",
                    code, message);

    return ngx_aq_send_json(r, status, body, p - body);
}


static ngx_int_t
ngx_aq_add_header(ngx_http_request_t *r, ngx_str_t *key, ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key = *key;
    h->value = *value;

    return NGX_OK;
}
