
/*
 * The claim: {"queue_id": "<uuid>"} -> the next item of the queue, or the
 * one the key already holds there.
 */


#include "ngx_aq.h"


static const ngx_aq_error_t *ngx_aq_claim_parse(ngx_http_request_t *r,
    ngx_aq_ctx_t *ctx, u_char *body, size_t len);
static ngx_int_t ngx_aq_claim_respond(ngx_http_request_t *r,
    ngx_aq_ctx_t *ctx, PGresult *res);


const ngx_aq_action_t  ngx_aq_claim_action = {
    "claim",
    NGX_AQ_STMT_CLAIM,
    ngx_aq_claim_parse,
    ngx_aq_claim_respond
};


static const ngx_aq_error_t *
ngx_aq_claim_parse(ngx_http_request_t *r, ngx_aq_ctx_t *ctx, u_char *body,
    size_t len)
{
    const ngx_aq_error_t                  *err;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    err = ngx_aq_json_parse_claim(r->pool, body, len, ctx->id);
    if (err) {
        return err;
    }

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    *ngx_sprintf(ctx->lease, "%M", alcf->lease) = '\0';

    ctx->query.values[1] = (const char *) ctx->id;
    ctx->query.values[2] = (const char *) ctx->lease;

    return NULL;
}


/*
 * Columns: key_ok, queue_ok, id, queue_id, payload, version, claimed_at,
 * lease_expires_at.  The answer:
 *
 * {"success":true,"item":{"id":..,"queue_id":..,"payload":..,"version":..,
 * "claimed_at":..,"lease_expires_at":..}}; the payload is PostgreSQL's own
 * JSON text of the jsonb, copied as it is (no number loses precision).
 */

static ngx_int_t
ngx_aq_claim_respond(ngx_http_request_t *r, ngx_aq_ctx_t *ctx,
    PGresult *res)
{
    int          i, row;
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

    /* a batch answers several requests, a row each */

    row = ctx->query.row;

    if (PQnfields(res) != 8) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "annotation queue: the claim returned %d columns",
                      PQnfields(res));
        return ngx_aq_send_error(r, &ngx_aq_err_internal);
    }

    if (PQgetvalue(res, row, 1)[0] != 't') {
        return ngx_aq_send_error(r, &ngx_aq_err_queue_not_found);
    }

    if (PQgetisnull(res, row, 2)) {
        return ngx_aq_send_error(r, &ngx_aq_err_no_items_available);
    }

    len = sizeof("\"}}") - 1;

    for (i = 0; i < 6; i++) {
        v[i].data = (u_char *) PQgetvalue(res, row, i + 2);
        v[i].len = PQgetlength(res, row, i + 2);
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

    /* the item id, for $annotation_queue_item */

    ctx->item_id.data = body + ngx_strlen(names[0]);
    ctx->item_id.len = v[0].len;
    ctx->outcome = "claimed";

    return ngx_aq_send_json(r, NGX_HTTP_OK, body, p - body);
}
