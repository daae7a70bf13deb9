
/*
 * What a holder does with a claimed item, each with the version its claim
 * returned:
 *
 *   extend     {"item_id", "version"}            the lease starts again
 *   release    {"item_id", "version"}            back to the queue now
 *   complete   {"item_id", "version", "result"}  done, with a result object
 *   skip       {"item_id", "version"}            back to the queue, never
 *                                                to this key again
 *
 * Each also takes the item's "queue_id": the statement then names the
 * queue in every scan of items (NGX_AQ_STMT_*_QUEUE), which Citus needs to
 * route it to the one worker that holds the queue; an item of another
 * queue is then unknown (404).  Without it, the statement finds the item
 * by its id alone, as on plain PostgreSQL it always could.
 *
 * A version that no longer matches, or an item the key no longer holds,
 * answers 409 stale_claim; an item unknown to the key's organisation, 404.
 */


#include "ngx_aq.h"


static const ngx_aq_error_t *ngx_aq_item_parse(ngx_http_request_t *r,
    ngx_aq_ctx_t *ctx, u_char *body, size_t len);
static ngx_int_t ngx_aq_item_respond(ngx_http_request_t *r,
    ngx_aq_ctx_t *ctx, PGresult *res);


const ngx_aq_action_t  ngx_aq_extend_action = {
    "extend",
    NGX_AQ_STMT_EXTEND,
    ngx_aq_item_parse,
    ngx_aq_item_respond,
    NULL
};


const ngx_aq_action_t  ngx_aq_release_action = {
    "release",
    NGX_AQ_STMT_RELEASE,
    ngx_aq_item_parse,
    ngx_aq_item_respond,
    NULL
};


const ngx_aq_action_t  ngx_aq_complete_action = {
    "complete",
    NGX_AQ_STMT_COMPLETE,
    ngx_aq_item_parse,
    ngx_aq_item_respond,
    NULL
};


const ngx_aq_action_t  ngx_aq_skip_action = {
    "skip",
    NGX_AQ_STMT_SKIP,
    ngx_aq_item_parse,
    ngx_aq_item_respond,
    NULL
};


static const ngx_aq_error_t *
ngx_aq_item_parse(ngx_http_request_t *r, ngx_aq_ctx_t *ctx, u_char *body,
    size_t len)
{
    ngx_aq_query_t                        *q;
    const ngx_aq_error_t                  *err;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    err = ngx_aq_json_parse_item(r->pool, body, len,
                                 ctx->action == &ngx_aq_complete_action,
                                 ctx->id, ctx->version, ctx->queue_id,
                                 &ctx->result);
    if (err) {
        return err;
    }

    ctx->item_id.data = ctx->id;
    ctx->item_id.len = NGX_AQ_UUID_LEN;

    q = &ctx->query;

    q->values[1] = (const char *) ctx->id;
    q->values[2] = (const char *) ctx->version;

    if (ctx->action == &ngx_aq_extend_action) {
        alcf = ngx_http_get_module_loc_conf(r,
                                            ngx_http_annotation_queue_module);

        *ngx_sprintf(ctx->lease, "%M", alcf->lease) = '\0';
        q->values[3] = (const char *) ctx->lease;

    } else if (ctx->action == &ngx_aq_complete_action) {
        /* NULL: no result */
        q->values[3] = (const char *) ctx->result.data;
    }

    if (ctx->queue_id[0] == '\0') {
        return NULL;
    }

    switch (ctx->action->stmt) {

    case NGX_AQ_STMT_EXTEND:
        q->stmt = NGX_AQ_STMT_EXTEND_QUEUE;
        break;

    case NGX_AQ_STMT_RELEASE:
        q->stmt = NGX_AQ_STMT_RELEASE_QUEUE;
        break;

    case NGX_AQ_STMT_COMPLETE:
        q->stmt = NGX_AQ_STMT_COMPLETE_QUEUE;
        break;

    default: /* NGX_AQ_STMT_SKIP */
        q->stmt = NGX_AQ_STMT_SKIP_QUEUE;
        break;
    }

    q->values[4] = (const char *) ctx->queue_id;

    return NULL;
}


/*
 * Columns: key_ok, item_ok, id, queue_id, status, version,
 * lease_expires_at.  The answer:
 *
 * {"success":true,"item":{"id":..,"queue_id":..,"status":..,"version":..,
 * "lease_expires_at":.. or null}}
 */

static ngx_int_t
ngx_aq_item_respond(ngx_http_request_t *r, ngx_aq_ctx_t *ctx,
    PGresult *res)
{
    size_t   len;
    u_char  *body, *p;

    if (PQnfields(res) != 7) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "annotation queue: %s returned %d columns",
                      ctx->action->name, PQnfields(res));
        return ngx_aq_send_error(r, &ngx_aq_err_internal);
    }

    if (PQgetvalue(res, 0, 1)[0] != 't') {
        return ngx_aq_send_error(r, &ngx_aq_err_item_not_found);
    }

    if (PQgetisnull(res, 0, 2)) {
        return ngx_aq_send_error(r, &ngx_aq_err_stale_claim);
    }

    len = sizeof("{\"success\":true,\"item\":{\"id\":\"\",\"queue_id\":\"\","
                 "\"status\":\"\",\"version\":,\"lease_expires_at\":\"\"}}")
          - 1
          + PQgetlength(res, 0, 2) + PQgetlength(res, 0, 3)
          + PQgetlength(res, 0, 4) + PQgetlength(res, 0, 5)
          + (PQgetisnull(res, 0, 6) ? sizeof("null") - 1
                                    : (size_t) PQgetlength(res, 0, 6));

    body = ngx_pnalloc(r->pool, len);
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_sprintf(body,
                    "{\"success\":true,\"item\":{\"id\":\"%s\","
                    "\"queue_id\":\"%s\",\"status\":\"%s\",\"version\":%s,"
                    "\"lease_expires_at\":",
                    PQgetvalue(res, 0, 2), PQgetvalue(res, 0, 3),
                    PQgetvalue(res, 0, 4), PQgetvalue(res, 0, 5));

    if (PQgetisnull(res, 0, 6)) {
        p = ngx_cpymem(p, "null", sizeof("null") - 1);

    } else {
        p = ngx_sprintf(p, "\"%s\"", PQgetvalue(res, 0, 6));
    }

    p = ngx_cpymem(p, "}}", sizeof("}}") - 1);

    ctx->outcome = (ctx->action == &ngx_aq_extend_action) ? "extended"
                   : (ctx->action == &ngx_aq_release_action) ? "released"
                   : (ctx->action == &ngx_aq_skip_action) ? "skipped"
                   : "completed";

    return ngx_aq_send_json(r, NGX_HTTP_OK, body, p - body);
}
