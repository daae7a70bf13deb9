
/*
 * The claim: {"queue_id": "<uuid>"} -> the next item of the queue, or the
 * one the key already holds there.
 */


#include "ngx_aq.h"


static const ngx_aq_error_t *ngx_aq_claim_parse(ngx_http_request_t *r,
    ngx_aq_ctx_t *ctx, u_char *body, size_t len);
static ngx_int_t ngx_aq_claim_respond(ngx_http_request_t *r,
    ngx_aq_ctx_t *ctx, PGresult *res);
static ngx_uint_t ngx_aq_claim_joins(ngx_aq_query_t *first,
    ngx_aq_query_t *q);
static void ngx_aq_claim_batch_params(ngx_aq_query_t **qs, ngx_uint_t n,
    u_char *buf, const char **values);
static ngx_uint_t ngx_aq_claim_batch_fits(PGresult *res, ngx_uint_t n);
static ngx_uint_t ngx_aq_claim_batch_rerun(PGresult *res, ngx_uint_t i);
static ngx_uint_t ngx_aq_claim_retryable(PGresult *res);
static ngx_uint_t ngx_aq_claim_again(ngx_aq_query_t *q, PGresult *res);


/* the claim's columns, in the single claim and the batch alike */
#define NGX_AQ_CLAIM_KEY_OK       0
#define NGX_AQ_CLAIM_QUEUE_OK     1
#define NGX_AQ_CLAIM_ID           2
#define NGX_AQ_CLAIM_OVERLAP      8
#define NGX_AQ_CLAIM_COMPLETED    9
#define NGX_AQ_CLAIM_AGAIN        10
#define NGX_AQ_CLAIM_NEXT_LEASE   11
#define NGX_AQ_CLAIM_WIDE         12
#define NGX_AQ_CLAIM_COLUMNS      13

/* the lean claim's statements: a claim that may wait has its own */
#define ngx_aq_claim_lean(stmt)                                              \
    ((stmt) == NGX_AQ_STMT_CLAIM || (stmt) == NGX_AQ_STMT_CLAIM_WAIT)

/* what may join a batch (unless single: ngx_aq_claim_again) */
#define ngx_aq_claim_batches(stmt)                                           \
    (ngx_aq_claim_lean(stmt) || (stmt) == NGX_AQ_STMT_CLAIM_WIDE)


static const ngx_aq_rules_t  ngx_aq_claim_rules = {
    NGX_AQ_STMT_CLAIM_BATCH,
    ngx_aq_claim_joins,
    ngx_aq_claim_batch_params,
    ngx_aq_claim_batch_fits,
    ngx_aq_claim_batch_rerun,
    ngx_aq_claim_retryable,
    ngx_aq_claim_again
};


const ngx_aq_action_t  ngx_aq_claim_action = {
    "claim",
    NGX_AQ_STMT_CLAIM,
    ngx_aq_claim_parse,
    ngx_aq_claim_respond,
    &ngx_aq_claim_rules
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

    /*
     * Prefer: wait=N (ngx_aq_wait.c): a claim that may wait wants to know,
     * should it take nothing, when the queue's next lease ends
     */

    ngx_aq_wait_prefer(r, ctx);

    if (alcf->claim_wide) {
        /*
         * where every key is flagged (Citus): the lean claim would say so;
         * a batch still serves the keys without exclusions in the queue
         */
        ctx->query.stmt = NGX_AQ_STMT_CLAIM_WIDE;

    } else if (ctx->waiter.applied) {
        ctx->query.stmt = NGX_AQ_STMT_CLAIM_WAIT;
    }

    return NULL;
}


/*
 * Columns: key_ok, queue_ok, id, queue_id, payload, version, claimed_at,
 * lease_expires_at, the queue's overlap, the item's completed slots, again
 * (ngx_aq_claim_again), the milliseconds to the queue's next lease end
 * (without an item).  The answer:
 *
 * {"success":true,"item":{"id":..,"queue_id":..,"payload":..,"version":..,
 * "claimed_at":..,"lease_expires_at":..,"overlap":{"required":..,
 * "completed":..}}}; the payload is PostgreSQL's own JSON text of the
 * jsonb, copied as it is (no number loses precision).
 */

static ngx_int_t
ngx_aq_claim_respond(ngx_http_request_t *r, ngx_aq_ctx_t *ctx,
    PGresult *res)
{
    int          i, row;
    size_t       len;
    u_char      *body, *p;
    ngx_int_t    rc, next_lease;
    ngx_str_t    v[8];

    static const char  *names[] = {
        "{\"success\":true,\"item\":{\"id\":\"",
        "\",\"queue_id\":\"",
        "\",\"payload\":",
        ",\"version\":",
        ",\"claimed_at\":\"",
        "\",\"lease_expires_at\":\"",
        "\",\"overlap\":{\"required\":",
        ",\"completed\":"
    };

    /* a batch answers several requests, a row each */

    row = ctx->query.row;

    if (PQnfields(res) != NGX_AQ_CLAIM_COLUMNS) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "annotation queue: the claim returned %d columns",
                      PQnfields(res));
        return ngx_aq_send_error(r, &ngx_aq_err_internal);
    }

    if (PQgetvalue(res, row, NGX_AQ_CLAIM_QUEUE_OK)[0] != 't') {
        return ngx_aq_send_error(r, &ngx_aq_err_queue_not_found);
    }

    if (PQgetisnull(res, row, NGX_AQ_CLAIM_ID)) {

        /* a claim that may wait parks instead (ngx_aq_wait.c) */

        next_lease = -1;

        if (!PQgetisnull(res, row, NGX_AQ_CLAIM_NEXT_LEASE)) {
            next_lease = ngx_atoi((u_char *) PQgetvalue(res, row,
                                                    NGX_AQ_CLAIM_NEXT_LEASE),
                                  PQgetlength(res, row,
                                              NGX_AQ_CLAIM_NEXT_LEASE));
        }

        rc = ngx_aq_wait_empty(r, ctx, next_lease);

        if (rc == NGX_DONE) {
            /* answered later: the request lives on */
            r->main->count++;
            return NGX_DONE;
        }

        if (ngx_aq_wait_answer(r, ctx, 0) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (rc == NGX_BUSY) {
            return ngx_aq_send_error(r, &ngx_aq_err_pool_saturated);
        }

        if (rc == NGX_ERROR) {
            return ngx_aq_send_error(r, &ngx_aq_err_database_unavailable);
        }

        return ngx_aq_send_error(r, &ngx_aq_err_no_items_available);
    }

    len = sizeof("}}}") - 1;

    for (i = 0; i < 8; i++) {
        v[i].data = (u_char *) PQgetvalue(res, row, i + 2);
        v[i].len = PQgetlength(res, row, i + 2);
        len += ngx_strlen(names[i]) + v[i].len;
    }

    body = ngx_pnalloc(r->pool, len);
    if (body == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = body;

    for (i = 0; i < 8; i++) {
        p = ngx_cpymem(p, names[i], ngx_strlen(names[i]));
        p = ngx_cpymem(p, v[i].data, v[i].len);
    }

    p = ngx_cpymem(p, "}}}", sizeof("}}}") - 1);

    /* the item id, for $annotation_queue_item */

    ctx->item_id.data = body + ngx_strlen(names[0]);
    ctx->item_id.len = v[0].len;
    ctx->outcome = "claimed";

    if (ngx_aq_wait_answer(r, ctx, 1) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_aq_send_json(r, NGX_HTTP_OK, body, p - body);
}


/*
 * Claims of one queue and one lease run as one statement (ngx_aq_sql.h,
 * NGX_AQ_CLAIM_BATCH_SQL), whatever their keys.
 */

static ngx_uint_t
ngx_aq_claim_joins(ngx_aq_query_t *first, ngx_aq_query_t *q)
{
    /*
     * a claim the lean claim sent to the wide one runs alone (q->single);
     * one that may wait joins (the batch never answers 409: a claim that
     * got nothing from it runs its own statement), as does one that is
     * wide from the start (annotation_queue_claim_wide)
     */

    return ngx_aq_claim_batches(first->stmt)
           && ngx_aq_claim_batches(q->stmt)
           && ngx_strcmp(q->values[1], first->values[1]) == 0
           && ngx_strcmp(q->values[2], first->values[2]) == 0;
}


/* $1 the array of the claims' key digests, in hex; $2, $3 the first's */

static void
ngx_aq_claim_batch_params(ngx_aq_query_t **qs, ngx_uint_t n, u_char *buf,
    const char **values)
{
    u_char      *p;
    ngx_uint_t   i;

    p = buf;
    *p++ = '{';

    for (i = 0; i < n; i++) {
        if (i) {
            *p++ = ',';
        }

        p = ngx_hex_dump(p, (u_char *) qs[i]->values[0], NGX_AQ_DIGEST_LEN);
    }

    *p++ = '}';
    *p = '\0';

    values[0] = (const char *) buf;
    values[1] = qs[0]->values[1];
    values[2] = qs[0]->values[2];
}


/* a row of the claim's columns per request, in the order of the array */

static ngx_uint_t
ngx_aq_claim_batch_fits(PGresult *res, ngx_uint_t n)
{
    return (ngx_uint_t) PQntuples(res) == n
           && PQnfields(res) == NGX_AQ_CLAIM_COLUMNS;
}


/*
 * A valid key in a queue of its organisation that the batch left without
 * an item (the batch's candidates ran out, or another claim of the same
 * key took its row): the single claim decides, alone.
 */

static ngx_uint_t
ngx_aq_claim_batch_rerun(PGresult *res, ngx_uint_t i)
{
    return PQgetvalue(res, i, NGX_AQ_CLAIM_KEY_OK)[0] == 't'
           && PQgetvalue(res, i, NGX_AQ_CLAIM_QUEUE_OK)[0] == 't'
           && PQgetisnull(res, i, NGX_AQ_CLAIM_ID);
}


/*
 * A claim that failed with one of these rolled back, so nothing of it was
 * committed, and it failed because of another transaction at the same
 * instant, which a claim run again does not meet:
 *
 *   23505  unique_violation: another claim of the same key committed first
 *          (items_holder_idx); run again, the claim resumes that item;
 *   40P01  deadlock_detected: two batches that share keys each waited for
 *          the other's new holder entry;
 *   40001  serialization_failure.
 */

static ngx_uint_t
ngx_aq_claim_retryable(PGresult *res)
{
    char  *sqlstate;

    if (res == NULL || PQresultStatus(res) != PGRES_FATAL_ERROR) {
        return 0;
    }

    sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);

    if (sqlstate == NULL) {
        return 0;
    }

    return ngx_strcmp(sqlstate, "23505") == 0
           || ngx_strcmp(sqlstate, "40P01") == 0
           || ngx_strcmp(sqlstate, "40001") == 0;
}


/*
 * The claim runs again when its answer says:
 *
 *   wide   the lean claim met a queue of overlap > 1 or with a retry
 *          limit, or a key with exclusions: the wide claim answers (it
 *          never says wide itself), alone;
 *   again  it met a slot whose lease expired for the last time its queue
 *          allows, marked it failed and took nothing: that is committed,
 *          and it runs again for the next candidate (each run fails a slot
 *          at most once, so the runs end).
 */

static ngx_uint_t
ngx_aq_claim_again(ngx_aq_query_t *q, PGresult *res)
{
    if (res == NULL
        || PQresultStatus(res) != PGRES_TUPLES_OK
        || PQntuples(res) != 1
        || PQnfields(res) != NGX_AQ_CLAIM_COLUMNS)
    {
        return 0;
    }

    if (PQgetvalue(res, 0, NGX_AQ_CLAIM_WIDE)[0] == 't'
        && ngx_aq_claim_lean(q->stmt))
    {
        q->stmt = NGX_AQ_STMT_CLAIM_WIDE;
        q->single = 1;
        return 1;
    }

    return PQgetvalue(res, 0, NGX_AQ_CLAIM_AGAIN)[0] == 't';
}
