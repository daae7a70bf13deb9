
/*
 * The claim: bearer key -> request body -> one prepared statement on a
 * pooled connection -> the JSON answer.
 *
 * Until the body is read everything is refused cheaply: a missing or
 * malformed key gets 401 and an announced oversized body 413 before a byte
 * of it is read, and neither costs a database round trip.
 */


#include "ngx_aq.h"


typedef struct {
    ngx_http_request_t       *request;
    ngx_aq_query_t            query;
    u_char                    digest[NGX_AQ_DIGEST_LEN];
    u_char                    queue_id[NGX_AQ_UUID_LEN + 1];
    u_char                    lease[NGX_INT64_LEN + 1];
    u_char                    key_prefix[NGX_AQ_KEY_PUBLIC_LEN];
} ngx_aq_claim_ctx_t;


static ngx_int_t ngx_aq_claim_reject(ngx_http_request_t *r,
    ngx_uint_t status, const char *code, const char *message);
static void ngx_aq_claim_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_aq_claim_read_body(ngx_http_request_t *r,
    size_t max, u_char **body, size_t *len);
static ngx_int_t ngx_aq_claim_query(ngx_http_request_t *r,
    ngx_aq_claim_ctx_t *ctx);
static void ngx_aq_claim_cleanup(void *data);
static void ngx_aq_claim_done(ngx_aq_query_t *q, PGresult *res,
    ngx_uint_t outcome);
static ngx_int_t ngx_aq_claim_respond(ngx_http_request_t *r, PGresult *res,
    ngx_uint_t outcome);
static ngx_int_t ngx_aq_claim_send_item(ngx_http_request_t *r,
    PGresult *res);


ngx_int_t
ngx_aq_claim_start(ngx_http_request_t *r)
{
    ngx_int_t                              rc;
    ngx_str_t                             *authorization;
    ngx_aq_claim_ctx_t                    *ctx;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_aq_claim_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;

    authorization = r->headers_in.authorization
                    ? &r->headers_in.authorization->value : NULL;

    switch (ngx_aq_key_parse(authorization, ctx->digest, ctx->key_prefix)) {

    case ngx_aq_key_missing:
        return ngx_aq_claim_reject(r, NGX_HTTP_UNAUTHORIZED,
                                   "missing_api_key",
                                   "an Authorization: Bearer header with an "
                                   "API key is required");

    case ngx_aq_key_bad_scheme:
        return ngx_aq_claim_reject(r, NGX_HTTP_UNAUTHORIZED,
                                   "invalid_authorization",
                                   "the Authorization header must be "
                                   "Bearer <api key>");

    case ngx_aq_key_malformed:
        return ngx_aq_claim_reject(r, NGX_HTTP_UNAUTHORIZED,
                                   "invalid_api_key",
                                   "the API key is invalid, revoked or "
                                   "expired");

    default: /* ngx_aq_key_ok */
        break;
    }

    if (r->headers_in.content_length_n > (off_t) alcf->max_body_size) {
        return ngx_aq_claim_reject(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                   "body_too_large",
                                   "the request body is too large");
    }

    ngx_http_set_ctx(r, ctx, ngx_http_annotation_queue_module);

    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r, ngx_aq_claim_body_handler);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


static ngx_int_t
ngx_aq_claim_reject(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message)
{
    ngx_int_t  rc;

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    return ngx_aq_send_error(r, status, code, message);
}


static void
ngx_aq_claim_body_handler(ngx_http_request_t *r)
{
    size_t                                 len;
    u_char                                *body;
    ngx_int_t                              rc;
    ngx_aq_claim_ctx_t                    *ctx;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);
    ctx = ngx_http_get_module_ctx(r, ngx_http_annotation_queue_module);

    rc = ngx_aq_claim_read_body(r, alcf->max_body_size, &body, &len);

    if (rc == NGX_DECLINED) {
        r->keepalive = 0;
        ngx_http_finalize_request(r,
            ngx_aq_send_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                              "body_too_large",
                              "the request body is too large"));
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    switch (ngx_aq_json_parse_claim(body, len, ctx->queue_id)) {

    case ngx_aq_json_invalid:
        rc = ngx_aq_send_error(r, NGX_HTTP_BAD_REQUEST, "invalid_json",
                               "the request body is not valid JSON");
        break;

    case ngx_aq_json_not_object:
        rc = ngx_aq_send_error(r, NGX_HTTP_BAD_REQUEST, "invalid_request",
                               "the request body must be a JSON object");
        break;

    case ngx_aq_json_missing_queue_id:
        rc = ngx_aq_send_error(r, NGX_HTTP_BAD_REQUEST, "missing_queue_id",
                               "queue_id is required");
        break;

    case ngx_aq_json_bad_queue_id:
        rc = ngx_aq_send_error(r, NGX_HTTP_BAD_REQUEST, "invalid_queue_id",
                               "queue_id must be a UUID string");
        break;

    default: /* ngx_aq_json_ok */
        rc = ngx_aq_claim_query(r, ctx);

        if (rc == NGX_DONE) {
            /* the answer comes from ngx_aq_claim_done() */
            return;
        }

        break;
    }

    ngx_http_finalize_request(r, rc);
}


/*
 * The body in one piece: in memory as read, or read back from the temporary
 * file nginx wrote it to.  NGX_DECLINED: longer than max.
 */

static ngx_int_t
ngx_aq_claim_read_body(ngx_http_request_t *r, size_t max, u_char **body,
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

        p = ngx_cpymem(p, b->pos, b->last - b->pos);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_aq_claim_query(ngx_http_request_t *r, ngx_aq_claim_ctx_t *ctx)
{
    ngx_aq_query_t                        *q;
    ngx_http_cleanup_t                    *cln;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_aq_claim_cleanup;
    cln->data = ctx;

    *ngx_sprintf(ctx->lease, "%M", alcf->lease) = '\0';

    q = &ctx->query;

    q->values[0] = (const char *) ctx->digest;
    q->lengths[0] = NGX_AQ_DIGEST_LEN;
    q->formats[0] = 1;
    q->values[1] = (const char *) ctx->queue_id;
    q->values[2] = (const char *) ctx->lease;

    q->handler = ngx_aq_claim_done;
    q->data = ctx;
    q->log = r->connection->log;

    switch (ngx_aq_pool_send(alcf->pool, q)) {

    case NGX_OK:
        /* notice a client that goes away while the claim runs */
        r->read_event_handler = ngx_http_test_reading;
        return NGX_DONE;

    case NGX_BUSY:
        return ngx_aq_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "pool_saturated",
                                 "too many claims are waiting for a "
                                 "database connection, retry later");

    default:
        return ngx_aq_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "database_unavailable",
                                 "the database is unavailable, retry later");
    }
}


/*
 * The request ends (answered, timed out, or its client went away): the
 * pool must not call back into it.  A claim already sent still completes in
 * PostgreSQL; its item comes back to the queue when the lease expires, or
 * to the same key at its next claim.
 */

static void
ngx_aq_claim_cleanup(void *data)
{
    ngx_aq_claim_ctx_t  *ctx = data;

    ngx_aq_pool_cancel(&ctx->query);
}


static void
ngx_aq_claim_done(ngx_aq_query_t *q, PGresult *res, ngx_uint_t outcome)
{
    ngx_connection_t    *c;
    ngx_http_request_t  *r;
    ngx_aq_claim_ctx_t  *ctx;

    ctx = q->data;
    r = ctx->request;
    c = r->connection;

    ngx_http_finalize_request(r, ngx_aq_claim_respond(r, res, outcome));
    ngx_http_run_posted_requests(c);
}


static ngx_int_t
ngx_aq_claim_respond(ngx_http_request_t *r, PGresult *res,
    ngx_uint_t outcome)
{
    char  *sqlstate;

    switch (outcome) {

    case NGX_AQ_QUERY_OK:
        break;

    case NGX_AQ_QUERY_TIMEDOUT:
        return ngx_aq_send_error(r, NGX_HTTP_GATEWAY_TIME_OUT,
                                 "query_timeout",
                                 "the database did not answer in time");

    case NGX_AQ_QUERY_SATURATED:
        return ngx_aq_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "pool_saturated",
                                 "no database connection became free in "
                                 "time, retry later");

    default: /* NGX_AQ_QUERY_UNAVAILABLE */
        return ngx_aq_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                 "database_unavailable",
                                 "the database is unavailable, retry later");
    }

    if (res == NULL) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "annotation queue: the claim returned no result");
        return ngx_aq_send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal_error", "internal error");
    }

    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);

        if (sqlstate && ngx_strcmp(sqlstate, "57014") == 0) {
            /* statement_timeout */
            return ngx_aq_send_error(r, NGX_HTTP_GATEWAY_TIME_OUT,
                                     "query_timeout",
                                     "the database did not answer in time");
        }

        if (sqlstate
            && (ngx_strncmp(sqlstate, "08", 2) == 0
                || ngx_strncmp(sqlstate, "53", 2) == 0
                || ngx_strncmp(sqlstate, "57P", 3) == 0))
        {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "annotation queue: claim failed: %s",
                          PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY));

            return ngx_aq_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                     "database_unavailable",
                                     "the database is unavailable, retry "
                                     "later");
        }

        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "annotation queue: claim failed: %s %s",
                      sqlstate ? sqlstate : "",
                      PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY)
                      ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY)
                      : PQresStatus(PQresultStatus(res)));

        return ngx_aq_send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal_error", "internal error");
    }

    if (PQntuples(res) != 1 || PQnfields(res) != 8) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "annotation queue: the claim returned %d rows "
                      "of %d columns", PQntuples(res), PQnfields(res));
        return ngx_aq_send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                 "internal_error", "internal error");
    }

    if (PQgetvalue(res, 0, 0)[0] != 't') {
        return ngx_aq_send_error(r, NGX_HTTP_UNAUTHORIZED, "invalid_api_key",
                                 "the API key is invalid, revoked or "
                                 "expired");
    }

    if (PQgetvalue(res, 0, 1)[0] != 't') {
        return ngx_aq_send_error(r, NGX_HTTP_NOT_FOUND, "queue_not_found",
                                 "no such queue");
    }

    if (PQgetisnull(res, 0, 2)) {
        return ngx_aq_send_error(r, NGX_HTTP_CONFLICT, "no_items_available",
                                 "no items available or all items already "
                                 "claimed");
    }

    return ngx_aq_claim_send_item(r, res);
}


/*
 * {"success":true,"item":{"id":..,"queue_id":..,"payload":..,"version":..,
 * "claimed_at":..,"lease_expires_at":..}}; the payload is PostgreSQL's own
 * JSON text of the jsonb, copied as it is (no number loses precision).
 */

static ngx_int_t
ngx_aq_claim_send_item(ngx_http_request_t *r, PGresult *res)
{
    int          i;
    size_t       len;
    u_char      *body, *p;
    ngx_str_t    v[6];

    static const char  *names[] = {
        "{\"success\":true,\"item\":{\"id\":\"",
        "\",\"queue_id\":\"",
        "\",\"payload\":",
        ",\"version\":",
        ",\"claimed_at\":\"",
        "\",\"lease_expires_at\":\""
    };

    len = sizeof("\"}}") - 1;

    for (i = 0; i < 6; i++) {
        v[i].data = (u_char *) PQgetvalue(res, 0, i + 2);
        v[i].len = PQgetlength(res, 0, i + 2);
        len += ngx_strlen(names[i]) + v[i].len;
    }

    body = ngx_pnalloc(r->pool, len);
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = body;

    for (i = 0; i < 6; i++) {
        p = ngx_cpymem(p, names[i], ngx_strlen(names[i]));
        p = ngx_cpymem(p, v[i].data, v[i].len);
    }

    p = ngx_cpymem(p, "\"}}", sizeof("\"}}") - 1);

    return ngx_aq_send_json(r, NGX_HTTP_OK, body, p - body);
}
