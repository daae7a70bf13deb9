
/*
 * Every answer of the module is JSON:
 *
 *   {"success": true, "item": {...}}
 *   {"success": false, "error": {"code": "<snake_case>", "message": "..."}}
 *
 * with the headers an error calls for (WWW-Authenticate, Allow, Retry-After).
 * Errors nginx itself answers in the module's locations (a chunked body
 * over client_max_body_size, limit_req, an internal error) are rewritten
 * into the same JSON by a header and body filter.
 */


#include "ngx_aq.h"


static ngx_int_t ngx_aq_add_header(ngx_http_request_t *r, ngx_str_t *key,
    ngx_str_t *value);
static ngx_int_t ngx_aq_error_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_aq_error_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static const ngx_aq_error_t *ngx_aq_error_for_status(ngx_uint_t status);


static ngx_http_output_header_filter_pt  ngx_aq_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_aq_next_body_filter;


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
    ngx_int_t      rc;
    ngx_aq_ctx_t  *ctx;

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

    ctx = ngx_aq_request_ctx(r);

    if (ctx) {
        ctx->answered = 1;

        ngx_aq_status_count(r, ctx);

        if (ctx->limit && ngx_aq_limit_headers(r, ctx) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    return ngx_aq_send_body(r, body, len);
}


ngx_int_t
ngx_aq_send_body(ngx_http_request_t *r, u_char *body, size_t len)
{
    ngx_buf_t    *b;
    ngx_chain_t   out;

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
ngx_aq_send_error(ngx_http_request_t *r, const ngx_aq_error_t *err)
{
    u_char        *body, *p;
    size_t         len;
    ngx_str_t     *value;
    ngx_aq_ctx_t  *ctx;

    ctx = ngx_aq_request_ctx(r);
    if (ctx) {
        ctx->outcome = err->code;
        ctx->error = err;
    }

    switch (err->status) {

    case NGX_HTTP_UNAUTHORIZED:
        value = (err == &ngx_aq_err_invalid_api_key)
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

    case NGX_HTTP_TOO_MANY_REQUESTS:
        /* Retry-After comes with the RateLimit headers */
        if (ctx && ctx->limit) {
            break;
        }

        /* fall through */

    case NGX_HTTP_SERVICE_UNAVAILABLE:
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

    len = sizeof("{\"success\":false,\"error\":{\"code\":\"\","
                 "\"message\":\"\"}}")
          - 1 + ngx_strlen(err->code) + ngx_strlen(err->message);

    body = ngx_pnalloc(r->pool, len);
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_sprintf(body,
                    "{\"success\":false,\"error\":{\"code\":\"%s\","
                    "\"message\":\"%s\"}}",
                    err->code, err->message);

    return ngx_aq_send_json(r, err->status, body, p - body);
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


ngx_int_t
ngx_aq_error_filter_init(ngx_conf_t *cf)
{
    ngx_aq_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_aq_error_header_filter;

    ngx_aq_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_aq_error_body_filter;

    return NGX_OK;
}


/*
 * An error status in one of the module's locations whose answer is not the
 * module's own: nginx's page is replaced by the JSON of that status.
 */

static ngx_int_t
ngx_aq_error_header_filter(ngx_http_request_t *r)
{
    ngx_aq_ctx_t                          *ctx;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    if (r != r->main || r->headers_out.status < NGX_HTTP_BAD_REQUEST) {
        return ngx_aq_next_header_filter(r);
    }

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    if (alcf == NULL || alcf->action == NULL) {
        return ngx_aq_next_header_filter(r);
    }

    ctx = ngx_aq_request_ctx(r);

    if (ctx && ctx->answered) {
        return ngx_aq_next_header_filter(r);
    }

    if (ctx == NULL) {
        ctx = ngx_pcalloc(r->pool, sizeof(ngx_aq_ctx_t));
        if (ctx == NULL) {
            return NGX_ERROR;
        }

        ctx->request = r;
        ctx->action = alcf->action;

        ngx_http_set_ctx(r, ctx, ngx_http_annotation_queue_module);
    }

    ctx->replace = 1;
    ctx->error = ngx_aq_error_for_status(r->headers_out.status);
    ctx->outcome = ctx->error->code;

    ngx_aq_status_count(r, ctx);

    if ((r->headers_out.status == NGX_HTTP_SERVICE_UNAVAILABLE
         || r->headers_out.status == NGX_HTTP_TOO_MANY_REQUESTS)
        && ngx_aq_add_header(r, &ngx_aq_retry_after, &ngx_aq_one) != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* an answer of these locations is never for a cache, nginx's neither */

    if (ngx_aq_add_header(r, &ngx_aq_cache_control, &ngx_aq_no_store)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    r->headers_out.content_type = ngx_aq_content_type;
    r->headers_out.content_type_len = ngx_aq_content_type.len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n =
        sizeof("{\"success\":false,\"error\":{\"code\":\"\",\"message\":\"\"}}")
        - 1 + ngx_strlen(ctx->error->code) + ngx_strlen(ctx->error->message);

    if (r->headers_out.content_length) {
        r->headers_out.content_length->hash = 0;
        r->headers_out.content_length = NULL;
    }

    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_etag(r);

    return ngx_aq_next_header_filter(r);
}


static ngx_int_t
ngx_aq_error_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    u_char        *body, *p;
    size_t         len;
    ngx_buf_t     *b;
    ngx_chain_t    out, *cl;
    ngx_aq_ctx_t  *ctx;

    ctx = ngx_aq_request_ctx(r);

    if (ctx == NULL || !ctx->replace) {
        return ngx_aq_next_body_filter(r, in);
    }

    /* drop nginx's page; the JSON goes out once, with its last buffer */

    for (cl = in; cl; cl = cl->next) {
        cl->buf->pos = cl->buf->last;

        if (cl->buf->in_file) {
            cl->buf->file_pos = cl->buf->file_last;
        }

        if (!cl->buf->last_buf) {
            continue;
        }

        ctx->replace = 0;

        len = sizeof("{\"success\":false,\"error\":{\"code\":\"\","
                     "\"message\":\"\"}}")
              - 1 + ngx_strlen(ctx->error->code)
              + ngx_strlen(ctx->error->message);

        body = ngx_pnalloc(r->pool, len);
        b = ngx_calloc_buf(r->pool);

        if (body == NULL || b == NULL) {
            return NGX_ERROR;
        }

        p = ngx_sprintf(body,
                        "{\"success\":false,\"error\":{\"code\":\"%s\","
                        "\"message\":\"%s\"}}",
                        ctx->error->code, ctx->error->message);

        b->pos = body;
        b->last = p;
        b->memory = 1;
        b->last_buf = 1;
        b->last_in_chain = 1;

        out.buf = b;
        out.next = NULL;

        return ngx_aq_next_body_filter(r, &out);
    }

    return NGX_OK;
}


static const ngx_aq_error_t *
ngx_aq_error_for_status(ngx_uint_t status)
{
    switch (status) {

    case NGX_HTTP_BAD_REQUEST:
        return &ngx_aq_err_bad_request;

    case NGX_HTTP_FORBIDDEN:
        /* allow, deny, auth_request, ... */
        return &ngx_aq_err_forbidden;

    case NGX_HTTP_NOT_FOUND:
        return &ngx_aq_err_not_found;

    case NGX_HTTP_NOT_ALLOWED:
        return &ngx_aq_err_method_not_allowed;

    case NGX_HTTP_REQUEST_TIME_OUT:
        return &ngx_aq_err_request_timeout;

    case NGX_HTTP_REQUEST_ENTITY_TOO_LARGE:
        return &ngx_aq_err_body_too_large;

    case NGX_HTTP_TOO_MANY_REQUESTS:
        /* limit_req or limit_conn with 429: not per key */
        return &ngx_aq_err_too_many_requests;

    case NGX_HTTP_SERVICE_UNAVAILABLE:
        /* not the database's: limit_req, limit_conn, ... */
        return &ngx_aq_err_service_unavailable;

    case NGX_HTTP_GATEWAY_TIME_OUT:
        return &ngx_aq_err_query_timeout;

    default:
        return &ngx_aq_err_internal;
    }
}
