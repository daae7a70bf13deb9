
/*
 * The status page (annotation_queue_status): every worker's pools, and
 * their sums, in Prometheus' text format.
 *
 * Each worker has a slot per pool in a shared memory zone ([pool][worker]),
 * found by the worker's number, and any worker reads all of them.  The
 * answer counters are added to the slot atomically, by whichever process
 * answers: after a reload the new worker with a number and the old one,
 * still finishing its requests, add to the same slot, so that the counters
 * go on, every answer counted once.  The gauges (connections, waiting) are
 * copied into the slot by its owner after every change: a reload's new
 * worker writes its pid there and takes over; the old worker stops
 * publishing its gauges (it never writes the pid again).
 */


#include "ngx_aq.h"


static ngx_int_t ngx_aq_status_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static u_char *ngx_aq_status_metric(u_char *p, ngx_uint_t m,
    ngx_uint_t pool, ngx_uint_t worker, ngx_aq_stats_t *st);


static const char  *ngx_aq_status_endpoints[NGX_AQ_NSTMTS] = {
    "claim", "extend", "release", "complete", "claim", "skip"
};

static const char  *ngx_aq_status_successes[NGX_AQ_NSTMTS] = {
    "claimed", "extended", "released", "completed", "claimed", "skipped"
};

/* the outcome labels, by NGX_AQ_OUTCOME_* (0, the successes: above) */

static const char  *ngx_aq_status_outcomes[NGX_AQ_NOUTCOMES] = {
    NULL,
#define NGX_AQ_STATUS_LABEL(name, status, code, message, counter)            \
    code,
    NGX_AQ_ERRORS(NGX_AQ_STATUS_LABEL)
#undef NGX_AQ_STATUS_LABEL
};


static ngx_str_t  ngx_aq_status_zone_name =
    ngx_string("annotation_queue_status");


/* postconfiguration: a slot per pool and worker, once pools exist */

ngx_int_t
ngx_aq_status_add_zone(ngx_conf_t *cf)
{
    size_t                                  size;
    ngx_core_conf_t                        *ccf;
    ngx_shm_zone_t                         *shm_zone;
    ngx_http_annotation_queue_main_conf_t  *amcf;

    amcf = ngx_http_conf_get_module_main_conf(cf,
                                          ngx_http_annotation_queue_module);

    if (amcf->pools == NULL || amcf->pools->nelts == 0) {
        return NGX_OK;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cf->cycle->conf_ctx,
                                           ngx_core_module);

    amcf->workers = (ccf->worker_processes == NGX_CONF_UNSET
                     || ccf->worker_processes <= 0)
                    ? 1 : (ngx_uint_t) ccf->worker_processes;

    size = amcf->pools->nelts * amcf->workers * sizeof(ngx_aq_stats_t)
           + 8 * ngx_pagesize;

    shm_zone = ngx_shared_memory_add(cf, &ngx_aq_status_zone_name, size,
                                     &ngx_http_annotation_queue_module);
    if (shm_zone == NULL) {
        return NGX_ERROR;
    }

    if (shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "shared memory zone \"%V\" is the status page's",
                           &ngx_aq_status_zone_name);
        return NGX_ERROR;
    }

    shm_zone->init = ngx_aq_status_init_zone;
    shm_zone->data = amcf;

    return NGX_OK;
}


/*
 * The slots were sized at postconfiguration by worker_processes as it was
 * then: a worker_processes after the http block would leave workers
 * without a slot (and off the page).
 */

ngx_int_t
ngx_aq_status_init_module(ngx_cycle_t *cycle)
{
    ngx_uint_t                              workers;
    ngx_core_conf_t                        *ccf;
    ngx_http_annotation_queue_main_conf_t  *amcf;

    amcf = ngx_http_cycle_get_module_main_conf(cycle,
                                           ngx_http_annotation_queue_module);

    if (amcf == NULL || amcf->stats == NULL) {
        return NGX_OK;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    workers = (ccf->worker_processes <= 0)
              ? 1 : (ngx_uint_t) ccf->worker_processes;

    if (workers != amcf->workers) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "\"worker_processes\" must come before the \"http\" "
                      "block when annotation queue locations are configured");
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_aq_status_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_annotation_queue_main_conf_t  *oamcf = data;

    size_t                                  size;
    ngx_slab_pool_t                        *shpool;
    ngx_http_annotation_queue_main_conf_t  *amcf;

    amcf = shm_zone->data;

    if (oamcf) {
        /* a reload with the same pools and workers: counters go on */
        amcf->stats = oamcf->stats;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        amcf->stats = shpool->data;
        return NGX_OK;
    }

    size = amcf->pools->nelts * amcf->workers * sizeof(ngx_aq_stats_t);

    amcf->stats = ngx_slab_calloc(shpool, size);
    if (amcf->stats == NULL) {
        return NGX_ERROR;
    }

    shpool->data = amcf->stats;

    return NGX_OK;
}


void
ngx_aq_status_attach(ngx_cycle_t *cycle, ngx_aq_pool_t *pool)
{
    ngx_aq_stats_t                         *slot;
    ngx_http_annotation_queue_main_conf_t  *amcf;

    amcf = ngx_http_cycle_get_module_main_conf(cycle,
                                           ngx_http_annotation_queue_module);

    pool->local.pid = ngx_pid;
    pool->shared = NULL;

    if (amcf->stats == NULL || ngx_worker >= amcf->workers) {
        return;
    }

    slot = &amcf->stats[pool->index * amcf->workers + ngx_worker];

    slot->pid = ngx_pid;
    pool->shared = slot;

    ngx_aq_status_publish(pool);
}


/* the gauges, by the slot's owner; the pid and the counters are left alone */

void
ngx_aq_status_publish(ngx_aq_pool_t *pool)
{
    ngx_aq_stats_t  *slot;

    slot = pool->shared;

    if (slot == NULL || slot->pid != (ngx_atomic_t) ngx_pid) {
        return;
    }

    slot->open = pool->local.open;
    slot->connecting = pool->local.connecting;
    slot->idle = pool->local.idle;
    slot->waiting = pool->local.waiting;
    slot->waiters = pool->local.waiters;
}


void
ngx_aq_status_count(ngx_http_request_t *r, ngx_aq_ctx_t *ctx)
{
    ngx_uint_t                             s, o;
    ngx_aq_pool_t                         *pool;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    pool = alcf->pool;

    if (pool == NULL || pool->st == NULL) {
        return;
    }

    s = ctx->action->stmt;
    o = ctx->error ? ctx->error->outcome : 0;

    if (pool->shared == NULL) {
        pool->st->answers[s][o]++;
        return;
    }

    /* the slot's owner may be a newer worker: add, never copy */

    (void) ngx_atomic_fetch_add(&pool->shared->answers[s][o], 1);

    ngx_aq_status_publish(pool);
}


#define NGX_AQ_STATUS_LINE_LEN  192


/*
 * The text format wants each metric's lines together: one pass per
 * metric, each over the pools, their workers, and the sum ("all").
 */

ngx_int_t
ngx_aq_status_handler(ngx_http_request_t *r)
{
    u_char                                 *body, *p;
    size_t                                  len;
    ngx_int_t                               rc;
    ngx_uint_t                              i, w, s, o, m, npools;
    ngx_aq_pool_t                         **pools;
    ngx_aq_stats_t                         *st, *sums;
    ngx_http_annotation_queue_main_conf_t  *amcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    amcf = ngx_http_get_module_main_conf(r, ngx_http_annotation_queue_module);

    npools = (amcf->pools && amcf->stats) ? amcf->pools->nelts : 0;
    pools = npools ? amcf->pools->elts : NULL;

    len = 1024 + npools * (amcf->workers + 1)
                 * (8 + NGX_AQ_NSTMTS * NGX_AQ_NOUTCOMES)
                 * NGX_AQ_STATUS_LINE_LEN;

    body = ngx_pnalloc(r->pool, len);
    sums = ngx_pcalloc(r->pool, (npools + 1) * sizeof(ngx_aq_stats_t));

    if (body == NULL || sums == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    for (i = 0; i < npools; i++) {
        for (w = 0; w < amcf->workers; w++) {
            st = &amcf->stats[i * amcf->workers + w];

            sums[i].pid |= st->pid;
            sums[i].open += st->open;
            sums[i].connecting += st->connecting;
            sums[i].idle += st->idle;
            sums[i].waiting += st->waiting;
            sums[i].waiters += st->waiters;
            sums[i].wakeups += st->wakeups;

            for (s = 0; s < NGX_AQ_NSTMTS; s++) {
                for (o = 0; o < NGX_AQ_NOUTCOMES; o++) {
                    sums[i].answers[s][o] += st->answers[s][o];
                }
            }
        }
    }

    p = body;

    for (m = 0; m < 6; m++) {

        switch (m) {

        case 0:
            p = ngx_sprintf(p, "# HELP annotation_queue_pool_size "
                            "Connections a pool may open per worker\n"
                            "# TYPE annotation_queue_pool_size gauge\n");

            for (i = 0; i < npools; i++) {
                p = ngx_sprintf(p, "annotation_queue_pool_size"
                                "{pool=\"%ui\"} %ui\n", i, pools[i]->size);
            }

            continue;

        case 1:
            p = ngx_sprintf(p, "# HELP annotation_queue_connections "
                            "PostgreSQL connections of a pool, by state\n"
                            "# TYPE annotation_queue_connections gauge\n");
            break;

        case 2:
            p = ngx_sprintf(p, "# HELP annotation_queue_waiting "
                            "Requests waiting for a free connection\n"
                            "# TYPE annotation_queue_waiting gauge\n");
            break;

        case 4:
            p = ngx_sprintf(p, "# HELP annotation_queue_claim_waiters "
                            "Claims waiting for an item (Prefer: wait)\n"
                            "# TYPE annotation_queue_claim_waiters gauge\n");
            break;

        case 5:
            p = ngx_sprintf(p, "# HELP annotation_queue_claim_wakeups_total "
                            "Claims of waiting requests run again\n"
                            "# TYPE annotation_queue_claim_wakeups_total "
                            "counter\n");
            break;

        default:
            p = ngx_sprintf(p, "# HELP annotation_queue_answers_total "
                            "Answers by endpoint and outcome\n"
                            "# TYPE annotation_queue_answers_total "
                            "counter\n");
            break;
        }

        for (i = 0; i < npools; i++) {
            for (w = 0; w < amcf->workers; w++) {
                st = &amcf->stats[i * amcf->workers + w];

                if (st->pid) {
                    p = ngx_aq_status_metric(p, m, i, w, st);
                }
            }

            p = ngx_aq_status_metric(p, m, i, NGX_CONF_UNSET_UINT, &sums[i]);
        }
    }

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = p - body;
    ngx_str_set(&r->headers_out.content_type, "text/plain; version=0.0.4");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    return ngx_aq_send_body(r, body, p - body);
}


/* metric m of one worker's slot, or of the sum (worker NGX_CONF_UNSET_UINT) */

static u_char *
ngx_aq_status_metric(u_char *p, ngx_uint_t m, ngx_uint_t pool,
    ngx_uint_t worker, ngx_aq_stats_t *st)
{
    u_char       id[2 * NGX_INT_T_LEN + sizeof(",worker=\"\"")];
    ngx_uint_t   s, o;
    const char  *outcome;

    if (worker == NGX_CONF_UNSET_UINT) {
        ngx_sprintf(id, "%ui\",worker=\"all%Z", pool);

    } else {
        ngx_sprintf(id, "%ui\",worker=\"%ui%Z", pool, worker);
    }

    switch (m) {

    case 1:
        return ngx_sprintf(p,
                    "annotation_queue_connections{pool=\"%s\","
                    "state=\"idle\"} %uA\n"
                    "annotation_queue_connections{pool=\"%s\","
                    "state=\"busy\"} %uA\n"
                    "annotation_queue_connections{pool=\"%s\","
                    "state=\"connecting\"} %uA\n",
                    id, st->idle,
                    id, st->open - st->connecting - st->idle,
                    id, st->connecting);

    case 2:
        return ngx_sprintf(p, "annotation_queue_waiting{pool=\"%s\"} %uA\n",
                           id, st->waiting);

    case 4:
        return ngx_sprintf(p,
                           "annotation_queue_claim_waiters{pool=\"%s\"} %uA\n",
                           id, st->waiters);

    case 5:
        return ngx_sprintf(p, "annotation_queue_claim_wakeups_total"
                           "{pool=\"%s\"} %uA\n", id, st->wakeups);

    default:
        break;
    }

    for (s = 0; s < NGX_AQ_NSTMTS; s++) {
        for (o = 0; o < NGX_AQ_NOUTCOMES; o++) {

            if (st->answers[s][o] == 0) {
                continue;
            }

            outcome = o ? ngx_aq_status_outcomes[o]
                        : ngx_aq_status_successes[s];

            p = ngx_sprintf(p,
                            "annotation_queue_answers_total{pool=\"%s\","
                            "endpoint=\"%s\",outcome=\"%s\"} %uA\n",
                            id, ngx_aq_status_endpoints[s], outcome,
                            st->answers[s][o]);
        }
    }

    return p;
}
