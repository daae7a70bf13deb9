
/*
 * The flow every endpoint shares: bearer key -> request body -> one prepared
 * statement on a pooled connection -> the JSON answer.  The endpoint's
 * action (ngx_aq_claim.c, ngx_aq_item.c) parses its body, names its
 * statement and answers its result row.
 *
 * Until the body is read everything is refused cheaply: a missing or
 * malformed key gets 401 and an announced oversized body 413 before a byte
 * of it is read, and neither costs a database round trip.
 */


#include "ngx_aq.h"


static ngx_int_t ngx_aq_request_reject(ngx_http_request_t *r,
    const ngx_aq_error_t *err);
static void ngx_aq_request_body_handler(ngx_http_request_t *r);
static void ngx_aq_request_body_reader(ngx_http_request_t *r);
static ngx_int_t ngx_aq_request_read_body(ngx_http_request_t *r,
    size_t max, u_char **body, size_t *len);
static ngx_int_t ngx_aq_request_query(ngx_http_request_t *r,
    ngx_aq_ctx_t *ctx);
static void ngx_aq_request_cleanup(void *data);
static void ngx_aq_request_done(ngx_aq_query_t *q, PGresult *res,
    ngx_uint_t outcome);
static ngx_int_t ngx_aq_request_respond(ngx_http_request_t *r,
    ngx_aq_ctx_t *ctx, PGresult *res, ngx_uint_t outcome);


/*
 * nginx's own readers of a request body, which ngx_aq_request_body_reader
 * stands in front of: the same function for every HTTP/1 request, and
 * another for every HTTP/2 stream
 */
static ngx_http_event_handler_pt  ngx_aq_request_nginx_body_reader;
#if (NGX_HTTP_V2)
static ngx_http_event_handler_pt  ngx_aq_request_nginx_v2_body_reader;
#endif


ngx_int_t
ngx_aq_request_start(ngx_http_request_t *r, const ngx_aq_action_t *action)
{
    ngx_int_t                              rc;
    ngx_str_t                             *authorization;
    ngx_aq_ctx_t                          *ctx;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_aq_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
    ctx->action = action;

    ngx_http_set_ctx(r, ctx, ngx_http_annotation_queue_module);

    if (!(r->method & NGX_HTTP_POST)) {
        return ngx_aq_request_reject(r, &ngx_aq_err_method_not_allowed);
    }

    authorization = r->headers_in.authorization
                    ? &r->headers_in.authorization->value : NULL;

    switch (ngx_aq_key_parse(authorization, ctx->digest, ctx->key_prefix)) {

    case ngx_aq_key_missing:
        return ngx_aq_request_reject(r, &ngx_aq_err_missing_api_key);

    case ngx_aq_key_bad_scheme:
        return ngx_aq_request_reject(r, &ngx_aq_err_invalid_authorization);

    case ngx_aq_key_malformed:
        return ngx_aq_request_reject(r, &ngx_aq_err_invalid_api_key);

    default: /* ngx_aq_key_ok */
        ctx->key = 1;
        break;
    }

    if (ngx_aq_limit_check(r, ctx) == NGX_BUSY) {
        return ngx_aq_request_reject(r, &ngx_aq_err_rate_limited);
    }

    if (r->headers_in.content_length_n > (off_t) alcf->max_body_size) {
        return ngx_aq_request_reject(r, &ngx_aq_err_body_too_large);
    }

    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r, ngx_aq_request_body_handler);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    if (rc == NGX_AGAIN && r->read_event_handler != ngx_aq_request_body_reader)
    {
        /* the body is still coming: see to its timeout */

#if (NGX_HTTP_V2)
        if (r->stream) {
            ngx_aq_request_nginx_v2_body_reader = r->read_event_handler;

        } else
#endif
        {
            ngx_aq_request_nginx_body_reader = r->read_event_handler;
        }

        r->read_event_handler = ngx_aq_request_body_reader;
    }

    return NGX_DONE;
}


/*
 * When client_body_timeout expires, nginx closes the connection (resets
 * the HTTP/2 stream) without a word (its 408 only shows in the access
 * log).  Here the client gets the
 * 408 as nginx's other errors in these locations, made JSON by the error
 * filter (request_timeout), and the connection closes after it.  Every
 * other read goes to nginx's reader, which hands the complete body to
 * ngx_aq_request_body_handler.
 */

static void
ngx_aq_request_body_reader(ngx_http_request_t *r)
{
    ngx_connection_t  *c;

    c = r->connection;

    if (!c->read->timedout) {
#if (NGX_HTTP_V2)
        if (r->stream) {
            ngx_aq_request_nginx_v2_body_reader(r);
            return;
        }
#endif
        ngx_aq_request_nginx_body_reader(r);
        return;
    }

    ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT,
                  "client timed out sending the request body");

    c->read->timedout = 0;

#if (NGX_HTTP_V2)
    if (r->stream) {
        /* the rest of the stream's DATA is dropped, the answer goes out */
        r->stream->skip_data = 1;
    }
#endif

    r->keepalive = 0;
    r->lingering_close = 1;
    r->read_event_handler = ngx_http_block_reading;

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    ngx_http_finalize_request(r,
              ngx_http_special_response_handler(r, NGX_HTTP_REQUEST_TIME_OUT));
}


ngx_aq_ctx_t *
ngx_aq_request_ctx(ngx_http_request_t *r)
{
    return ngx_http_get_module_ctx(r, ngx_http_annotation_queue_module);
}


static ngx_int_t
ngx_aq_request_reject(ngx_http_request_t *r, const ngx_aq_error_t *err)
{
    ngx_int_t  rc;

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    return ngx_aq_send_error(r, err);
}


static void
ngx_aq_request_body_handler(ngx_http_request_t *r)
{
    size_t                                 len;
    u_char                                *body;
    ngx_int_t                              rc;
    ngx_aq_ctx_t                          *ctx;
    const ngx_aq_error_t                  *err;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);
    ctx = ngx_aq_request_ctx(r);

    rc = ngx_aq_request_read_body(r, alcf->max_body_size, &body, &len);

    if (rc == NGX_DECLINED) {
        ngx_http_finalize_request(r,
                            ngx_aq_send_error(r, &ngx_aq_err_body_too_large));
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    /* the endpoint's statement; its parse may choose a variant */
    ctx->query.stmt = ctx->action->stmt;

    err = ctx->action->parse(r, ctx, body, len);

    if (err) {
        ngx_http_finalize_request(r, ngx_aq_send_error(r, err));
        return;
    }

    rc = ngx_aq_request_query(r, ctx);

    if (rc == NGX_DONE) {
        /* the answer comes from ngx_aq_request_done() */
        return;
    }

    ngx_http_finalize_request(r, rc);
}


/*
 * The body in one piece: in memory as read, or read back from the temporary
 * file nginx wrote it to.  NGX_DECLINED: longer than max.
 */

static ngx_int_t
ngx_aq_request_read_body(ngx_http_request_t *r, size_t max, u_char **body,
    size_t *len)
{
    off_t         size;
    u_char       *p;
    ssize_t       n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    *body = (u_char *) "";
    *len = 0;

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return NGX_OK;
    }

    size = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        size += ngx_buf_size(cl->buf);
    }

    if (size > (off_t) max) {
        return NGX_DECLINED;
    }

    cl = r->request_body->bufs;
    b = cl->buf;

    if (cl->next == NULL && !b->in_file) {
        *body = b->pos;
        *len = b->last - b->pos;
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, (size_t) size + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    *body = p;
    *len = (size_t) size;

    for ( /* void */ ; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file) {
            n = ngx_read_file(b->file, p, (size_t) (b->file_last - b->file_pos),
                              b->file_pos);

            if (n != b->file_last - b->file_pos) {
                return NGX_ERROR;
            }

            p += n;
            continue;
        }

        if (b->last > b->pos) {
            p = ngx_cpymem(p, b->pos, b->last - b->pos);
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_aq_request_query(ngx_http_request_t *r, ngx_aq_ctx_t *ctx)
{
    ngx_aq_query_t                        *q;
    ngx_http_cleanup_t                    *cln;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_aq_request_cleanup;
    cln->data = ctx;

    q = &ctx->query;

    q->rules = ctx->action->rules;
    q->values[0] = (const char *) ctx->digest;
    q->lengths[0] = NGX_AQ_DIGEST_LEN;
    q->formats[0] = 1;
    q->handler = ngx_aq_request_done;
    q->data = ctx;
    q->log = r->connection->log;

    ctx->sent = ngx_current_msec;
    ctx->db = 1;

    /* a claim that may wait joins its queue's waiters (ngx_aq_wait.c) */
    ngx_aq_wait_attach(r, ctx);

    switch (ngx_aq_pool_send(alcf->pool, q)) {

    case NGX_OK:
        /* notice a client that goes away while the query runs */
        r->read_event_handler = ngx_http_test_reading;
        return NGX_DONE;

    case NGX_BUSY:
        return ngx_aq_send_error(r, &ngx_aq_err_pool_saturated);

    default:
        return ngx_aq_send_error(r, &ngx_aq_err_database_unavailable);
    }
}


/*
 * The request ends (answered, timed out, or its client went away): the
 * pool must not call back into it.  A query already sent still completes in
 * PostgreSQL; a claimed item comes back to the queue when its lease
 * expires, or to the same key at its next claim.
 */

static void
ngx_aq_request_cleanup(void *data)
{
    ngx_aq_ctx_t  *ctx = data;

    ngx_aq_pool_cancel(&ctx->query);
    ngx_aq_wait_cancel(ctx);
}


static void
ngx_aq_request_done(ngx_aq_query_t *q, PGresult *res, ngx_uint_t outcome)
{
    ngx_aq_ctx_t        *ctx;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    ctx = q->data;
    r = ctx->request;
    c = r->connection;

    /* a claim that waited: the time of each of its claims */
    ctx->db_time += ngx_current_msec - ctx->sent;

    ngx_http_finalize_request(r, ngx_aq_request_respond(r, ctx, res,
                                                        outcome));
    ngx_http_run_posted_requests(c);
}


static ngx_int_t
ngx_aq_request_respond(ngx_http_request_t *r, ngx_aq_ctx_t *ctx,
    PGresult *res, ngx_uint_t outcome)
{
    char  *sqlstate, *message;

    switch (outcome) {

    case NGX_AQ_QUERY_OK:
        break;

    case NGX_AQ_QUERY_TIMEDOUT:
        return ngx_aq_send_error(r, &ngx_aq_err_query_timeout);

    case NGX_AQ_QUERY_SATURATED:
        return ngx_aq_send_error(r, &ngx_aq_err_wait_timeout);

    case NGX_AQ_QUERY_FAILED:
        return ngx_aq_send_error(r, &ngx_aq_err_internal);

    default: /* NGX_AQ_QUERY_UNAVAILABLE */
        return ngx_aq_send_error(r, &ngx_aq_err_database_unavailable);
    }

    if (res == NULL) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "annotation queue: %s returned no result",
                      ctx->action->name);
        return ngx_aq_send_error(r, &ngx_aq_err_internal);
    }

    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        message = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);

        if (sqlstate == NULL) {
            sqlstate = "";
        }

        if (message == NULL) {
            message = PQresStatus(PQresultStatus(res));
        }

        /* statement_timeout, or a cancel by the operator */

        if (ngx_strcmp(sqlstate, "57014") == 0) {
            return ngx_aq_send_error(r, &ngx_aq_err_query_timeout);
        }

        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "annotation queue: %s failed: %s %s%s",
                      ctx->action->name, sqlstate, message,
                      ngx_strcmp(sqlstate, "26000") == 0
                      ? " (behind a pooler in transaction mode, set "
                        "\"annotation_queue_prepare off\")"
                      : "");

        /*
         * connection exceptions, shutdowns, too many connections, a server
         * that is (or became) a standby, and a session without the
         * module's statements (a pooler that lent another one): nothing
         * ran, the connection is closed, and the next one may do
         */

        if (ngx_strncmp(sqlstate, "08", 2) == 0
            || ngx_strncmp(sqlstate, "53", 2) == 0
            || ngx_strncmp(sqlstate, "57P", 3) == 0
            || ngx_strcmp(sqlstate, "25006") == 0
            || ngx_strcmp(sqlstate, "26000") == 0)
        {
            return ngx_aq_send_error(r, &ngx_aq_err_database_unavailable);
        }

        return ngx_aq_send_error(r, &ngx_aq_err_internal);
    }

    if (PQntuples(res) <= ctx->query.row || PQnfields(res) < 3) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "annotation queue: %s returned %d rows of %d columns",
                      ctx->action->name, PQntuples(res), PQnfields(res));
        return ngx_aq_send_error(r, &ngx_aq_err_internal);
    }

    /* every statement's first column: was the key live */

    if (PQgetvalue(res, ctx->query.row, 0)[0] != 't') {
        return ngx_aq_send_error(r, &ngx_aq_err_invalid_api_key);
    }

    ngx_aq_limit_learn(r, ctx);

    return ctx->action->respond(r, ctx, res);
}
