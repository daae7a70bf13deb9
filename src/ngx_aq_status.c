
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
 *
 * A status location may also show queues (annotation_queue_status_queues):
 * their slots by state and the age of their oldest available slot, from
 * annotation_queue.queue_stats().  Each worker keeps its own copy and reads
 * it again only when a page is asked for and its copy is older than the
 * interval: the request that finds it so starts one read through the
 * location's pool, and it and every page request coming meanwhile wait for
 * that read.  A read that fails leaves the last good numbers, marked
 * (annotation_queue_queue_read_ok 0) with their age: the page answers all
 * the same.  Nothing is read when nobody asks; a claim never reads.
 */


#include "ngx_aq.h"


static ngx_int_t ngx_aq_status_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static u_char *ngx_aq_status_metric(u_char *p, ngx_uint_t m,
    ngx_uint_t pool, ngx_uint_t worker, ngx_aq_stats_t *st);
static ngx_int_t ngx_aq_status_send(ngx_http_request_t *r);
static ngx_int_t ngx_aq_status_read(ngx_aq_status_queues_t *qs);
static void ngx_aq_status_read_done(ngx_aq_query_t *q, PGresult *res,
    ngx_uint_t outcome);
static const char *ngx_aq_status_read_result(ngx_aq_status_queues_t *qs,
    PGresult *res, ngx_uint_t outcome);
static void ngx_aq_status_wait_cleanup(void *data);
static u_char *ngx_aq_status_queue_metrics(u_char *p,
    ngx_aq_status_queues_t *qs);


/* a page request waiting for its worker's read of the queues */
typedef struct {
    ngx_queue_t               queue;
    ngx_http_request_t       *request;
    ngx_uint_t                waiting;
} ngx_aq_status_wait_t;


/* the queue statistics' statement answers no endpoint: never counted */

static const char  *ngx_aq_status_endpoints[NGX_AQ_NSTMTS] = {
    "claim", "extend", "release", "complete", "claim", "skip", "status"
};

static const char  *ngx_aq_status_successes[NGX_AQ_NSTMTS] = {
    "claimed", "extended", "released", "completed", "claimed", "skipped",
    "read"
};

/* annotation_queue_queue_items{state}, in the columns' order */

static const char  *ngx_aq_status_states[NGX_AQ_QUEUE_STATES] = {
    "available", "claimed", "expired", "completed", "failed"
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
    ngx_int_t                              rc;
    ngx_aq_status_wait_t                  *w;
    ngx_http_cleanup_t                    *cln;
    ngx_aq_status_queues_t                *qs;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);

    if (rc != NGX_OK) {
        return rc;
    }

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    qs = alcf->queue_stats;

    if (qs == NULL) {
        return ngx_aq_status_send(r);
    }

    /* at most one read an interval, whether it succeeded or not */

    if (!qs->running
        && (!qs->tried || ngx_current_msec - qs->started >= qs->interval))
    {
        if (ngx_aq_status_read(qs) != NGX_OK) {
            return ngx_aq_status_send(r);
        }
    }

    if (!qs->running) {
        return ngx_aq_status_send(r);
    }

    /* the read is under way: wait for it */

    w = ngx_pcalloc(r->pool, sizeof(ngx_aq_status_wait_t));
    cln = ngx_http_cleanup_add(r, 0);

    if (w == NULL || cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    w->request = r;
    w->waiting = 1;
    ngx_queue_insert_tail(&qs->waiting, &w->queue);

    cln->handler = ngx_aq_status_wait_cleanup;
    cln->data = w;

    /* notice a client that goes away meanwhile */
    r->read_event_handler = ngx_http_test_reading;

    r->main->count++;

    return NGX_DONE;
}


/* the request ends before the read (its client went away): forget it */

static void
ngx_aq_status_wait_cleanup(void *data)
{
    ngx_aq_status_wait_t  *w = data;

    if (w->waiting) {
        ngx_queue_remove(&w->queue);
        w->waiting = 0;
    }
}


/*
 * Starts a read of the location's queues.  NGX_OK: it runs and
 * ngx_aq_status_read_done() will be called; otherwise it failed at once
 * (logged) and the page answers with what it has.
 */

static ngx_int_t
ngx_aq_status_read(ngx_aq_status_queues_t *qs)
{
    ngx_int_t        rc;
    ngx_time_t      *tp;
    ngx_aq_query_t  *q;

    tp = ngx_timeofday();

    qs->tried = 1;
    qs->started = ngx_current_msec;
    qs->start_sec = tp->sec;
    qs->start_msec = tp->msec;

    q = &qs->query;

    ngx_memzero(q, sizeof(ngx_aq_query_t));

    q->stmt = NGX_AQ_STMT_QUEUE_STATS;
    q->values[0] = (const char *) qs->param.data;
    q->handler = ngx_aq_status_read_done;
    q->data = qs;
    q->log = ngx_cycle->log;

    rc = ngx_aq_pool_send(qs->pool, q);

    if (rc == NGX_OK) {
        qs->running = 1;
        return NGX_OK;
    }

    qs->failed = 1;

    ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                  "annotation queue: the status page could not read its "
                  "queues: %s",
                  rc == NGX_BUSY ? "the pool's wait list is full"
                                 : "no PostgreSQL connection");

    return NGX_ERROR;
}


static void
ngx_aq_status_read_done(ngx_aq_query_t *q, PGresult *res, ngx_uint_t outcome)
{
    const char              *err;
    ngx_queue_t              waiting, *qn;
    ngx_connection_t        *c;
    ngx_http_request_t      *r;
    ngx_aq_status_wait_t    *w;
    ngx_aq_status_queues_t  *qs;

    qs = q->data;

    qs->running = 0;

    err = ngx_aq_status_read_result(qs, res, outcome);

    if (err == NULL) {
        qs->failed = 0;
        qs->has_read = 1;
        qs->read = qs->started;
        qs->read_sec = qs->start_sec;
        qs->read_msec = qs->start_msec;

    } else {
        qs->failed = 1;

        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "annotation queue: the status page could not read its "
                      "queues: %s", err);
    }

    /* the page requests that waited, answered in the order they came */

    if (ngx_queue_empty(&qs->waiting)) {
        return;
    }

    waiting = qs->waiting;
    waiting.next->prev = &waiting;
    waiting.prev->next = &waiting;
    ngx_queue_init(&qs->waiting);

    while (!ngx_queue_empty(&waiting)) {
        qn = ngx_queue_head(&waiting);
        ngx_queue_remove(qn);

        w = ngx_queue_data(qn, ngx_aq_status_wait_t, queue);
        w->waiting = 0;

        r = w->request;
        c = r->connection;

        ngx_http_finalize_request(r, ngx_aq_status_send(r));
        ngx_http_run_posted_requests(c);
    }
}


/* the read's numbers into qs->queues: NULL, or what went wrong */

static const char *
ngx_aq_status_read_result(ngx_aq_status_queues_t *qs, PGresult *res,
    ngx_uint_t outcome)
{
    char                  *v, *end;
    off_t                  n;
    double                 age;
    ngx_uint_t             i, j, nqueues;
    ngx_aq_queue_stats_t  *st;

    switch (outcome) {

    case NGX_AQ_QUERY_OK:
        break;

    case NGX_AQ_QUERY_TIMEDOUT:
        return "query timed out";

    case NGX_AQ_QUERY_SATURATED:
        return "no PostgreSQL connection became free in time";

    case NGX_AQ_QUERY_FAILED:
        return "internal error";

    default: /* NGX_AQ_QUERY_UNAVAILABLE */
        return "database unavailable";
    }

    if (res == NULL) {
        return "no result";
    }

    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        v = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        return v ? v : PQresStatus(PQresultStatus(res));
    }

    nqueues = qs->queues->nelts;

    if (PQntuples(res) != (int) nqueues
        || PQnfields(res) != NGX_AQ_QUEUE_STATES + 1)
    {
        return "queue_stats() answered rows or columns of another number "
               "than asked";
    }

    /* all checked before any is copied: a page never shows half a read */

    for (i = 0; i < nqueues; i++) {
        for (j = 0; j < NGX_AQ_QUEUE_STATES; j++) {
            v = PQgetvalue(res, i, j);

            if (ngx_atoof((u_char *) v, ngx_strlen(v)) == NGX_ERROR) {
                return "queue_stats() answered a count that is no number";
            }
        }
    }

    st = qs->queues->elts;

    for (i = 0; i < nqueues; i++) {
        for (j = 0; j < NGX_AQ_QUEUE_STATES; j++) {
            v = PQgetvalue(res, i, j);
            n = ngx_atoof((u_char *) v, ngx_strlen(v));
            st[i].slots[j] = (int64_t) n;
        }

        age = 0;

        if (!PQgetisnull(res, i, NGX_AQ_QUEUE_STATES)) {
            v = PQgetvalue(res, i, NGX_AQ_QUEUE_STATES);
            age = strtod(v, &end);

            /* a slot enqueued after the read began; or no number at all */

            if (end == v || !(age > 0)) {
                age = 0;
            }
        }

        st[i].oldest = age;
    }

    return NULL;
}


static ngx_int_t
ngx_aq_status_send(ngx_http_request_t *r)
{
    u_char                                 *body, *p;
    size_t                                  len;
    ngx_int_t                               rc;
    ngx_uint_t                              i, w, s, o, m, npools;
    ngx_aq_pool_t                         **pools;
    ngx_aq_stats_t                         *st, *sums;
    ngx_aq_status_queues_t                 *qs;
    ngx_http_annotation_queue_main_conf_t  *amcf;
    ngx_http_annotation_queue_loc_conf_t   *alcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_annotation_queue_module);
    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    qs = alcf->queue_stats;

    npools = (amcf->pools && amcf->stats) ? amcf->pools->nelts : 0;
    pools = npools ? amcf->pools->elts : NULL;

    len = 1024 + npools * (amcf->workers + 1)
                 * (8 + NGX_AQ_NSTMTS * NGX_AQ_NOUTCOMES)
                 * NGX_AQ_STATUS_LINE_LEN;

    if (qs) {
        len += 1024 + qs->queues->nelts * (NGX_AQ_QUEUE_STATES + 4)
                      * NGX_AQ_STATUS_LINE_LEN;
    }

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

    if (qs) {
        p = ngx_aq_status_queue_metrics(p, qs);
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


/*
 * The queues' numbers, as the worker last read them: each family's HELP
 * and TYPE always, the samples of the numbers once a read succeeded.
 */

static u_char *
ngx_aq_status_queue_metrics(u_char *p, ngx_aq_status_queues_t *qs)
{
    ngx_msec_t             age;
    ngx_uint_t             i, j, n;
    ngx_aq_queue_stats_t  *st;

    st = qs->queues->elts;
    n = qs->has_read ? qs->queues->nelts : 0;

    p = ngx_sprintf(p, "# HELP annotation_queue_queue_items "
                    "Slots of a queue by state, as last read\n"
                    "# TYPE annotation_queue_queue_items gauge\n");

    for (i = 0; i < n; i++) {
        for (j = 0; j < NGX_AQ_QUEUE_STATES; j++) {
            p = ngx_sprintf(p, "annotation_queue_queue_items{queue=\"%s\","
                            "state=\"%s\"} %L\n",
                            st[i].id, ngx_aq_status_states[j],
                            st[i].slots[j]);
        }
    }

    p = ngx_sprintf(p, "# HELP annotation_queue_queue_oldest_available_seconds "
                    "Age of a queue's oldest available slot (0: none), "
                    "as last read\n"
                    "# TYPE annotation_queue_queue_oldest_available_seconds "
                    "gauge\n");

    for (i = 0; i < n; i++) {
        p = ngx_sprintf(p, "annotation_queue_queue_oldest_available_seconds"
                        "{queue=\"%s\"} %.3f\n", st[i].id, st[i].oldest);
    }

    p = ngx_sprintf(p, "# HELP annotation_queue_queue_read_timestamp_seconds "
                    "When the numbers of a queue were read (Unix time)\n"
                    "# TYPE annotation_queue_queue_read_timestamp_seconds "
                    "gauge\n");

    for (i = 0; i < n; i++) {
        p = ngx_sprintf(p, "annotation_queue_queue_read_timestamp_seconds"
                        "{queue=\"%s\"} %T.%03ui\n", st[i].id,
                        qs->read_sec, qs->read_msec);
    }

    p = ngx_sprintf(p, "# HELP annotation_queue_queue_read_age_seconds "
                    "How old the numbers of a queue are\n"
                    "# TYPE annotation_queue_queue_read_age_seconds gauge\n");

    age = ngx_current_msec - qs->read;

    for (i = 0; i < n; i++) {
        p = ngx_sprintf(p, "annotation_queue_queue_read_age_seconds"
                        "{queue=\"%s\"} %M.%03M\n", st[i].id,
                        age / 1000, age % 1000);
    }

    p = ngx_sprintf(p, "# HELP annotation_queue_queue_read_ok "
                    "Whether the last read of a queue's numbers succeeded\n"
                    "# TYPE annotation_queue_queue_read_ok gauge\n");

    for (i = 0; i < qs->queues->nelts; i++) {
        p = ngx_sprintf(p, "annotation_queue_queue_read_ok"
                        "{queue=\"%s\"} %ui\n", st[i].id,
                        (ngx_uint_t) (qs->tried && !qs->failed));
    }

    return p;
}


/* annotation_queue_status_queues uuid ...: checked now, added up */

char *
ngx_aq_status_queues(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_annotation_queue_loc_conf_t *alcf = conf;

    u_char                 id[NGX_AQ_UUID_LEN + 1];
    ngx_str_t             *value;
    ngx_uint_t             i, k;
    ngx_aq_queue_stats_t  *st, *known;

    if (alcf->status_queues == NULL) {
        alcf->status_queues = ngx_array_create(cf->pool, 4,
                                               sizeof(ngx_aq_queue_stats_t));
        if (alcf->status_queues == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {

        if (!ngx_aq_uuid_valid(value[i].data, value[i].len)) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid queue id \"%V\" in \"%V\": "
                               "a uuid (8-4-4-4-12 hexadecimal digits) "
                               "is expected", &value[i], &cmd->name);
            return NGX_CONF_ERROR;
        }

        ngx_strlow(id, value[i].data, NGX_AQ_UUID_LEN);
        id[NGX_AQ_UUID_LEN] = '\0';

        known = alcf->status_queues->elts;

        for (k = 0; k < alcf->status_queues->nelts; k++) {
            if (ngx_strcmp(known[k].id, id) == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "duplicate queue id \"%V\" in \"%V\"",
                                   &value[i], &cmd->name);
                return NGX_CONF_ERROR;
            }
        }

        st = ngx_array_push(alcf->status_queues);
        if (st == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memzero(st, sizeof(ngx_aq_queue_stats_t));
        ngx_memcpy(st->id, id, NGX_AQ_UUID_LEN + 1);
    }

    return NGX_CONF_OK;
}


/* a status location with queues (merged, its pool found): its reader */

ngx_int_t
ngx_aq_status_queues_init(ngx_conf_t *cf,
    ngx_http_annotation_queue_loc_conf_t *alcf)
{
    u_char                  *p;
    ngx_uint_t               i;
    ngx_aq_queue_stats_t    *st;
    ngx_aq_status_queues_t  *qs;

    qs = ngx_pcalloc(cf->pool, sizeof(ngx_aq_status_queues_t));
    if (qs == NULL) {
        return NGX_ERROR;
    }

    qs->queues = alcf->status_queues;
    qs->interval = alcf->status_interval;
    qs->pool = alcf->pool;

    ngx_queue_init(&qs->waiting);

    /* the uuid[] parameter, "{id,id,...}", once and for all */

    qs->param.len = 2 + qs->queues->nelts * (NGX_AQ_UUID_LEN + 1);
    qs->param.data = ngx_pnalloc(cf->pool, qs->param.len + 1);
    if (qs->param.data == NULL) {
        return NGX_ERROR;
    }

    st = qs->queues->elts;
    p = qs->param.data;
    *p++ = '{';

    for (i = 0; i < qs->queues->nelts; i++) {
        if (i) {
            *p++ = ',';
        }

        p = ngx_cpymem(p, st[i].id, NGX_AQ_UUID_LEN);
    }

    *p++ = '}';
    *p = '\0';

    qs->param.len = p - qs->param.data;

    alcf->queue_stats = qs;

    return NGX_OK;
}
