
/*
 * Long-polling claims: a claim with "Prefer: wait=N" (RFC 7240) that finds
 * nothing claimable waits up to N seconds (capped by
 * annotation_queue_max_wait) for an item, instead of answering 409 at once.
 *
 * A waiting request holds nothing but its place: no pool connection, no
 * query.  It parks in its queue's FIFO (a per-worker tree of the queues
 * that have waiters, per pool) and is woken, to run its claim again
 * through the pool, by
 *
 *   - a notification of its queue: the database runs
 *     pg_notify('annotation_queue', <queue id>) whenever an item slot is
 *     left available (sql/006_workflows.sql); a LISTEN connection per
 *     worker and pool reads them from the event loop;
 *   - the timer at the earliest lease end the queue's last claim told of
 *     (the claim's column 11): expired leases notify nobody;
 *   - the listener's own changes: when LISTEN starts (a claim sent before
 *     it may have missed a notification), when it is lost (one may be lost
 *     with it), and when the worker exits (every waiter claims once more
 *     and is answered).
 *
 * A wake-up flags the first waiters of the queue; the flagged ones run, in
 * FIFO order, at most pool size of a queue at once.  A woken claim that
 * gets an item wakes the next two (one notification of a transaction may
 * stand for many items, so that a chain grows to the pool's size while
 * items last); one that gets 409 goes back to its place, at the head, and
 * its chain ends.  No wake-up is lost: each queue counts its notifications
 * (seq); a claim whose 409 comes back after the count moved, or that was
 * sent before LISTEN was on and comes back after, runs again at once.
 */


#include "ngx_aq_conn.h"


#define NGX_AQ_WAIT_LISTEN_SQL    "LISTEN annotation_queue"
#define NGX_AQ_WAIT_BACKOFF_MIN   100
#define NGX_AQ_WAIT_BACKOFF_MAX   5000
#define NGX_AQ_WAIT_LEASE_SLACK   20
#define NGX_AQ_WAIT_MAX_SECONDS   1000000


typedef struct {
    ngx_aq_pool_t             shadow;     /* first: its connection's pool */
    ngx_aq_pool_t            *pool;       /* the claims' */
    ngx_rbtree_t              tree;       /* of ngx_aq_wqueue_t */
    ngx_rbtree_node_t         sentinel;
    ngx_queue_t               queues;     /* the same, for walks */
    ngx_uint_t                nqueues;
    ngx_event_t               retry;
    ngx_msec_t                backoff;
    ngx_uint_t                ticket;
    unsigned                  listening:1;
} ngx_aq_listener_t;


struct ngx_aq_wqueue_s {
    ngx_str_node_t            node;       /* key: the queue id */
    ngx_queue_t               queue;      /* in listener->queues */
    u_char                    id[NGX_AQ_UUID_LEN];
    ngx_aq_listener_t        *listener;
    ngx_queue_t               waiters;    /* parked, by ticket */
    ngx_uint_t                refs;       /* requests attached */
    ngx_uint_t                inflight;   /* woken claims running */
    ngx_uint_t                flagged;    /* parked waiters woken */
    ngx_uint_t                seq;        /* wake-ups seen */
    ngx_event_t               lease;
    ngx_msec_t                lease_at;
    unsigned                  dispatching:1;
};


static ngx_int_t ngx_aq_wait_parse(u_char *p, u_char *last);
static ngx_aq_listener_t *ngx_aq_wait_listener(ngx_http_request_t *r);
static void ngx_aq_wait_listen_start(ngx_aq_listener_t *l);
static void ngx_aq_wait_listen_retry(ngx_event_t *ev);
static void ngx_aq_wait_listen_lost(ngx_aq_listener_t *l);
static void ngx_aq_wait_notified(ngx_aq_listener_t *l, PGconn *pg);
static void ngx_aq_wait_wake_all(ngx_aq_listener_t *l);
static void ngx_aq_wait_flag(ngx_aq_wqueue_t *wq, ngx_uint_t n);
static void ngx_aq_wait_dispatch(ngx_aq_wqueue_t *wq);
static ngx_int_t ngx_aq_wait_wake(ngx_aq_ctx_t *ctx);
static void ngx_aq_wait_park(ngx_aq_ctx_t *ctx);
static void ngx_aq_wait_unpark(ngx_aq_ctx_t *ctx);
static void ngx_aq_wait_release(ngx_aq_wqueue_t *wq);
static void ngx_aq_wait_timeout(ngx_event_t *ev);
static void ngx_aq_wait_lease_handler(ngx_event_t *ev);
static ngx_int_t ngx_aq_wait_header(ngx_http_request_t *r,
    ngx_aq_ctx_t *ctx);
static void ngx_aq_wait_count_wakeup(ngx_aq_pool_t *pool);


static ngx_str_t  ngx_aq_preference_applied =
    ngx_string("Preference-Applied");


/*
 * Per worker: the listener of a pool, its connection of its own in a
 * "pool" of one (the shadow), so that ngx_aq_conn.c connects it as any
 * other (host lists, DNS, timeouts); nothing is opened until a claim
 * waits.
 */

ngx_int_t
ngx_aq_wait_init(ngx_aq_pool_t *pool, ngx_cycle_t *cycle)
{
    ngx_aq_pool_t      *sh;
    ngx_aq_listener_t  *l;

    l = ngx_pcalloc(cycle->pool, sizeof(ngx_aq_listener_t));
    if (l == NULL) {
        return NGX_ERROR;
    }

    sh = &l->shadow;

    *sh = *pool;

    sh->conninfo = pool->listen_conninfo;
    sh->hosts = pool->listen_hosts;
    sh->host_timeout = pool->listen_host_timeout;
    sh->resolver = pool->listen_resolver;
    sh->size = 1;
    sh->max_waiting = 0;
    sh->idle_timeout = 0;
    sh->max_lifetime = 0;
    sh->prepare = 0;
    sh->statement_timeout = NGX_AQ_TIMEOUT_OFF;
    sh->st = &sh->local;
    sh->shared = NULL;
    sh->listener = NULL;
    ngx_memzero(&sh->local, sizeof(ngx_aq_stats_t));
    ngx_queue_init(&sh->idle);
    ngx_queue_init(&sh->waiting);

    sh->conns = ngx_pcalloc(cycle->pool, sizeof(ngx_aq_conn_t));
    if (sh->conns == NULL) {
        return NGX_ERROR;
    }

    sh->conns[0].pool = sh;
    sh->conns[0].listen = 1;

    l->pool = pool;
    ngx_rbtree_init(&l->tree, &l->sentinel, ngx_str_rbtree_insert_value);
    ngx_queue_init(&l->queues);

    l->retry.handler = ngx_aq_wait_listen_retry;
    l->retry.data = l;
    l->retry.log = cycle->log;

    pool->listener = l;

    return NGX_OK;
}


void
ngx_aq_wait_done(ngx_aq_pool_t *pool)
{
    ngx_aq_listener_t  *l;

    l = pool->listener;

    if (l == NULL) {
        return;
    }

    if (l->retry.timer_set) {
        ngx_del_timer(&l->retry);
    }

    l->listening = 0;

    ngx_aq_conn_close(&l->shadow.conns[0]);
}


/*
 * Prefer (RFC 7240): a comma-separated list of preferences, each a token,
 * "=" and a value (BWS around it; a token or a quoted string), then
 * parameters after ";".  Names are case-insensitive; of a preference given
 * twice the first counts; a wait that is not a number is ignored.
 */

void
ngx_aq_wait_prefer(ngx_http_request_t *r, ngx_aq_ctx_t *ctx)
{
    ngx_int_t                              n;
    ngx_uint_t                             i, max;
    ngx_list_part_t                       *part;
    ngx_table_elt_t                       *h;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    ctx->waiter.applied = 0;

    max = alcf->max_wait / 1000;

    if (max == 0 || ngx_exiting) {
        return;
    }

    part = &r->headers_in.headers.part;
    h = part->elts;
    n = -1;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len != sizeof("Prefer") - 1
            || ngx_strncasecmp(h[i].key.data, (u_char *) "Prefer",
                               sizeof("Prefer") - 1) != 0)
        {
            continue;
        }

        n = ngx_aq_wait_parse(h[i].value.data,
                              h[i].value.data + h[i].value.len);

        if (n != -2) {
            break;
        }

        n = -1;
    }

    if (n <= 0) {
        return;
    }

    ctx->waiter.applied = ngx_min((ngx_uint_t) n, max);
    ctx->waiter.deadline = ngx_current_msec + ctx->waiter.applied * 1000;
}


/*
 * The seconds of the first "wait" preference of one Prefer header: -1 when
 * it is malformed (ignored), -2 when the header has none.
 */

static ngx_int_t
ngx_aq_wait_parse(u_char *p, u_char *last)
{
    u_char      *name;
    ngx_int_t    n;
    ngx_uint_t   wait, valid, quoted, digits;

    static const char  tchar[] = "!#$%&'*+-.^_`|~";

    for ( ;; ) {

        while (p < last && (*p == ' ' || *p == '\t' || *p == ',')) {
            p++;
        }

        if (p == last) {
            return -2;
        }

        name = p;

        while (p < last
               && ((*p >= '0' && *p <= '9')
                   || ((*p | 0x20) >= 'a' && (*p | 0x20) <= 'z')
                   || (*p && ngx_strlchr((u_char *) tchar,
                                         (u_char *) tchar + sizeof(tchar) - 1,
                                         *p))))
        {
            p++;
        }

        wait = (p - name == 4 && ngx_strncasecmp(name, (u_char *) "wait", 4)
                                 == 0);

        while (p < last && (*p == ' ' || *p == '\t')) {
            p++;
        }

        n = 0;
        valid = 0;

        if (p < last && *p == '=') {
            p++;

            while (p < last && (*p == ' ' || *p == '\t')) {
                p++;
            }

            quoted = (p < last && *p == '"');
            if (quoted) {
                p++;
            }

            digits = 0;

            while (p < last && *p >= '0' && *p <= '9') {
                if (n < NGX_AQ_WAIT_MAX_SECONDS) {
                    n = n * 10 + (*p - '0');
                }

                digits++;
                p++;
            }

            valid = (digits > 0);

            if (quoted) {
                if (p < last && *p == '"') {
                    p++;

                } else {
                    valid = 0;
                }
            }

            if (p < last && *p != ' ' && *p != '\t' && *p != ';' && *p != ',')
            {
                valid = 0;
            }
        }

        /* the rest of this preference: its parameters */

        while (p < last && *p != ',') {
            if (*p == '"') {
                for (p++; p < last && *p != '"'; p++) {
                    if (*p == '\\' && p + 1 < last) {
                        p++;
                    }
                }

                if (p == last) {
                    break;
                }
            }

            p++;
        }

        if (wait) {
            return valid ? n : -1;
        }
    }
}


static ngx_aq_listener_t *
ngx_aq_wait_listener(ngx_http_request_t *r)
{
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    return alcf->pool ? alcf->pool->listener : NULL;
}


/*
 * A claim that may wait is about to be sent: it joins its queue (found or
 * made) and notes the queue's count of wake-ups and whether LISTEN is on.
 * The first such claim of a pool opens the listener.
 */

void
ngx_aq_wait_attach(ngx_http_request_t *r, ngx_aq_ctx_t *ctx)
{
    uint32_t            hash;
    ngx_str_t           id;
    ngx_aq_waiter_t    *w;
    ngx_aq_wqueue_t    *wq;
    ngx_aq_listener_t  *l;

    w = &ctx->waiter;

    if (w->applied == 0) {
        return;
    }

    wq = w->wq;

    if (wq == NULL) {
        l = ngx_aq_wait_listener(r);

        if (l == NULL) {
            w->applied = 0;
            return;
        }

        id.data = ctx->id;
        id.len = NGX_AQ_UUID_LEN;
        hash = ngx_crc32_short(id.data, id.len);

        wq = (ngx_aq_wqueue_t *) ngx_str_rbtree_lookup(&l->tree, &id, hash);

        if (wq == NULL) {
            wq = ngx_calloc(sizeof(ngx_aq_wqueue_t), r->connection->log);
            if (wq == NULL) {
                w->applied = 0;
                return;
            }

            ngx_memcpy(wq->id, ctx->id, NGX_AQ_UUID_LEN);
            wq->node.str.data = wq->id;
            wq->node.str.len = NGX_AQ_UUID_LEN;
            wq->node.node.key = hash;
            wq->listener = l;
            ngx_queue_init(&wq->waiters);

            wq->lease.handler = ngx_aq_wait_lease_handler;
            wq->lease.data = wq;
            wq->lease.log = l->pool->log;
            wq->lease.cancelable = 1;

            ngx_rbtree_insert(&l->tree, &wq->node.node);
            ngx_queue_insert_tail(&l->queues, &wq->queue);
            l->nqueues++;
        }

        wq->refs++;
        w->wq = wq;

        w->timer.handler = ngx_aq_wait_timeout;
        w->timer.data = ctx;
        w->timer.log = r->connection->log;

        if (w->deadline > ngx_current_msec) {
            ngx_add_timer(&w->timer, w->deadline - ngx_current_msec);
        }

        ngx_aq_wait_listen_start(l);
    }

    w->seq = wq->seq;
    w->listening = wq->listener->listening;
}


/*
 * The claim found nothing (about to answer 409).  NGX_DONE: the request
 * waits on, parked or claiming again; NGX_DECLINED: answer the 409 now;
 * NGX_BUSY, NGX_ERROR: a claim run again could not be sent (503).
 */

ngx_int_t
ngx_aq_wait_empty(ngx_http_request_t *r, ngx_aq_ctx_t *ctx,
    ngx_int_t next_lease)
{
    ngx_msec_t          at;
    ngx_aq_waiter_t    *w;
    ngx_aq_wqueue_t    *wq;
    ngx_aq_listener_t  *l;

    w = &ctx->waiter;
    wq = w->wq;

    if (wq == NULL) {
        return NGX_DECLINED;
    }

    l = wq->listener;

    /* the earliest lease end known of the queue: a wake-up then */

    if (next_lease >= 0) {
        at = ngx_current_msec + next_lease + NGX_AQ_WAIT_LEASE_SLACK;

        if (!wq->lease.timer_set || (ngx_msec_int_t) (at - wq->lease_at) < 0)
        {
            wq->lease_at = at;
            ngx_add_timer(&wq->lease, next_lease + NGX_AQ_WAIT_LEASE_SLACK);
        }
    }

    if (w->woken) {
        /* its chain ends here */
        w->woken = 0;
        wq->inflight--;
    }

    if (ngx_exiting
        || (ngx_msec_int_t) (w->deadline - ngx_current_msec) <= 0)
    {
        ngx_aq_wait_dispatch(wq);
        return NGX_DECLINED;
    }

    if (w->seq != wq->seq || (!w->listening && l->listening)) {

        /* a wake-up came while it ran: it may have missed an item */

        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "annotation queue: woken while claiming, again");

        return ngx_aq_wait_wake(ctx);
    }

    ngx_aq_wait_park(ctx);
    ngx_aq_wait_dispatch(wq);

    return NGX_DONE;
}


/*
 * The claim is answered with an item (item) or another answer of the
 * claim: Preference-Applied, and an item passes the wake-up on.
 */

ngx_int_t
ngx_aq_wait_answer(ngx_http_request_t *r, ngx_aq_ctx_t *ctx, ngx_uint_t item)
{
    ngx_aq_waiter_t  *w;
    ngx_aq_wqueue_t  *wq;

    w = &ctx->waiter;
    wq = w->wq;

    if (wq && w->woken) {
        w->woken = 0;
        wq->inflight--;

        if (item) {
            ngx_aq_wait_flag(wq, 2);
        }

        ngx_aq_wait_dispatch(wq);
    }

    return ngx_aq_wait_header(r, ctx);
}


static ngx_int_t
ngx_aq_wait_header(ngx_http_request_t *r, ngx_aq_ctx_t *ctx)
{
    u_char           *p;
    ngx_table_elt_t  *h;

    if (ctx->waiter.applied == 0) {
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, sizeof("wait=") - 1 + NGX_INT_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key = ngx_aq_preference_applied;
    h->value.data = p;
    h->value.len = ngx_sprintf(p, "wait=%ui", ctx->waiter.applied) - p;

    return NGX_OK;
}


/* the request ends: it leaves its place, and passes a wake-up on */

void
ngx_aq_wait_cancel(ngx_aq_ctx_t *ctx)
{
    ngx_aq_waiter_t  *w;
    ngx_aq_wqueue_t  *wq;

    w = &ctx->waiter;
    wq = w->wq;

    if (wq == NULL) {
        return;
    }

    if (w->timer.timer_set) {
        ngx_del_timer(&w->timer);
    }

    if (w->parked) {
        if (w->flagged) {
            ngx_aq_wait_flag(wq, 1);
        }

        ngx_aq_wait_unpark(ctx);
    }

    if (w->woken) {
        /* its claim's answer is not known: the next one claims */
        w->woken = 0;
        wq->inflight--;
        ngx_aq_wait_flag(wq, 1);
    }

    w->wq = NULL;

    ngx_aq_wait_dispatch(wq);

    ngx_aq_wait_release(wq);
}


static void
ngx_aq_wait_release(ngx_aq_wqueue_t *wq)
{
    ngx_aq_listener_t  *l;

    if (--wq->refs) {
        return;
    }

    l = wq->listener;

    if (wq->lease.timer_set) {
        ngx_del_timer(&wq->lease);
    }

    ngx_rbtree_delete(&l->tree, &wq->node.node);
    ngx_queue_remove(&wq->queue);
    l->nqueues--;

    ngx_free(wq);
}


/* into the FIFO, at its place: by the ticket of its first park */

static void
ngx_aq_wait_park(ngx_aq_ctx_t *ctx)
{
    ngx_queue_t      *q;
    ngx_aq_waiter_t  *w, *o;
    ngx_aq_wqueue_t  *wq;

    w = &ctx->waiter;
    wq = w->wq;

    if (w->ticket == 0) {
        w->ticket = ++wq->listener->ticket;
        ngx_queue_insert_tail(&wq->waiters, &w->queue);

    } else {
        for (q = ngx_queue_head(&wq->waiters);
             q != ngx_queue_sentinel(&wq->waiters);
             q = ngx_queue_next(q))
        {
            o = ngx_queue_data(q, ngx_aq_waiter_t, queue);

            if (o->ticket > w->ticket) {
                break;
            }
        }

        /* before q: the tail of the list q heads */
        ngx_queue_insert_tail(q, &w->queue);
    }

    w->parked = 1;
    w->flagged = 0;

    wq->listener->pool->st->waiters++;
    ngx_aq_status_publish(wq->listener->pool);
}


static void
ngx_aq_wait_unpark(ngx_aq_ctx_t *ctx)
{
    ngx_aq_waiter_t  *w;
    ngx_aq_wqueue_t  *wq;

    w = &ctx->waiter;
    wq = w->wq;

    ngx_queue_remove(&w->queue);
    w->parked = 0;

    if (w->flagged) {
        w->flagged = 0;
        wq->flagged--;
    }

    wq->listener->pool->st->waiters--;
    ngx_aq_status_publish(wq->listener->pool);
}


/* the first n waiters not yet woken are */

static void
ngx_aq_wait_flag(ngx_aq_wqueue_t *wq, ngx_uint_t n)
{
    ngx_queue_t      *q;
    ngx_aq_waiter_t  *w;

    for (q = ngx_queue_head(&wq->waiters);
         q != ngx_queue_sentinel(&wq->waiters) && n;
         q = ngx_queue_next(q))
    {
        w = ngx_queue_data(q, ngx_aq_waiter_t, queue);

        if (!w->flagged) {
            w->flagged = 1;
            wq->flagged++;
            n--;
        }
    }
}


/* the woken waiters claim, first come first, pool size at once */

static void
ngx_aq_wait_dispatch(ngx_aq_wqueue_t *wq)
{
    ngx_int_t            rc;
    ngx_queue_t         *q;
    ngx_aq_ctx_t        *ctx;
    ngx_aq_waiter_t     *w;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    if (wq->dispatching) {
        /* a request it answered ended: the loop below goes on */
        return;
    }

    wq->dispatching = 1;
    wq->refs++;

    q = ngx_queue_head(&wq->waiters);

    while (q != ngx_queue_sentinel(&wq->waiters)
           && wq->flagged
           && wq->inflight < wq->listener->pool->size)
    {
        w = ngx_queue_data(q, ngx_aq_waiter_t, queue);

        if (!w->flagged) {
            q = ngx_queue_next(q);
            continue;
        }

        ctx = (ngx_aq_ctx_t *) ((u_char *) w
                                - offsetof(ngx_aq_ctx_t, waiter));

        ngx_aq_wait_unpark(ctx);

        rc = ngx_aq_wait_wake(ctx);

        if (rc != NGX_DONE) {
            /* no claim could be sent: the pool's 503 */

            r = ctx->request;
            c = r->connection;

            ngx_http_finalize_request(r, ngx_aq_send_error(r,
                                           rc == NGX_BUSY
                                           ? &ngx_aq_err_pool_saturated
                                           : &ngx_aq_err_database_unavailable));
            ngx_http_run_posted_requests(c);
        }

        q = ngx_queue_head(&wq->waiters);
    }

    wq->dispatching = 0;

    ngx_aq_wait_release(wq);
}


/*
 * Runs the claim of ctx again, through the pool.  NGX_DONE: sent (or
 * waiting for a connection); else answered now: the pool's 503, from the
 * wake-up's event (ngx_aq_wait_dispatch) or to the caller's return.
 */

static ngx_int_t
ngx_aq_wait_wake(ngx_aq_ctx_t *ctx)
{
    ngx_int_t         rc;
    ngx_aq_pool_t    *pool;
    ngx_aq_query_t   *q;
    ngx_aq_waiter_t  *w;
    ngx_aq_wqueue_t  *wq;

    w = &ctx->waiter;
    wq = w->wq;
    pool = wq->listener->pool;
    q = &ctx->query;

    w->woken = 1;
    wq->inflight++;
    w->seq = wq->seq;
    w->listening = wq->listener->listening;

    ngx_aq_wait_count_wakeup(pool);

    q->single = 0;
    q->retried = 0;
    q->row = 0;
    q->state = ngx_aq_query_new;

    ctx->sent = ngx_current_msec;

    rc = ngx_aq_pool_send(pool, q);

    if (rc == NGX_OK) {
        return NGX_DONE;
    }

    w->woken = 0;
    wq->inflight--;

    return rc;
}


static void
ngx_aq_wait_count_wakeup(ngx_aq_pool_t *pool)
{
    if (pool->shared == NULL) {
        pool->st->wakeups++;
        return;
    }

    (void) ngx_atomic_fetch_add(&pool->shared->wakeups, 1);
}


/* the deadline of a parked waiter: 409, Preference-Applied */

static void
ngx_aq_wait_timeout(ngx_event_t *ev)
{
    ngx_aq_ctx_t        *ctx;
    ngx_aq_waiter_t     *w;
    ngx_aq_wqueue_t     *wq;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    ctx = ev->data;
    w = &ctx->waiter;
    wq = w->wq;

    if (!w->parked) {
        /* its claim runs: its answer decides */
        return;
    }

    if (w->flagged) {
        ngx_aq_wait_flag(wq, 1);
    }

    ngx_aq_wait_unpark(ctx);

    r = ctx->request;
    c = r->connection;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, c->log, 0,
                   "annotation queue: the wait ended without an item");

    if (ngx_aq_wait_header(r, ctx) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);

    } else {
        ngx_http_finalize_request(r, ngx_aq_send_error(r,
                                            &ngx_aq_err_no_items_available));
    }

    ngx_http_run_posted_requests(c);
}


/* the earliest known lease end of the queue passed: its head claims */

static void
ngx_aq_wait_lease_handler(ngx_event_t *ev)
{
    ngx_aq_wqueue_t  *wq;

    wq = ev->data;

    wq->seq++;
    ngx_aq_wait_flag(wq, 1);
    ngx_aq_wait_dispatch(wq);
}


/* ---- the listener ---------------------------------------------------- */


static void
ngx_aq_wait_listen_start(ngx_aq_listener_t *l)
{
    ngx_int_t       rc;
    ngx_aq_conn_t  *ac;

    ac = &l->shadow.conns[0];

    if (ac->state != ngx_aq_conn_closed || l->retry.timer_set || ngx_exiting)
    {
        return;
    }

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, l->pool->log, 0,
                   "annotation queue: opening the LISTEN connection");

    rc = ngx_aq_conn_connect(ac);

    if (rc != NGX_OK) {
        ngx_aq_conn_close(ac);
        ngx_aq_wait_listen_lost(l);
    }
}


static void
ngx_aq_wait_listen_retry(ngx_event_t *ev)
{
    ngx_aq_listener_t  *l;

    l = ev->data;

    if (ngx_exiting) {
        ngx_aq_wait_wake_all(l);
        return;
    }

    if (l->nqueues == 0) {
        /* nobody waits: the next waiter opens it */
        return;
    }

    ngx_aq_wait_listen_start(l);
}


/* connected: LISTEN */

void
ngx_aq_wait_listener_ready(ngx_aq_conn_t *ac)
{
    ngx_aq_listener_t  *l;

    l = (ngx_aq_listener_t *) ac->pool;

    if (ngx_exiting) {
        ac->state = ngx_aq_conn_busy;
        ngx_aq_conn_close(ac);
        ngx_aq_wait_listen_lost(l);
        return;
    }

    if (ngx_aq_conn_send_sql(ac, NGX_AQ_WAIT_LISTEN_SQL) != NGX_OK) {
        ngx_aq_wait_listen_lost(l);
    }
}


/* LISTEN answered: from now on no notification is missed */

void
ngx_aq_wait_listener_done(ngx_aq_conn_t *ac, PGresult *res)
{
    ngx_aq_listener_t  *l;

    l = (ngx_aq_listener_t *) ac->pool;

    if (res == NULL
        || PQresultStatus(res) != PGRES_COMMAND_OK
        || !ngx_aq_conn_clean(ac))
    {
        ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                      "annotation queue: LISTEN failed: %*s",
                      ngx_aq_pg_error_len(res ? PQresultErrorMessage(res)
                                              : PQerrorMessage(ac->pg)),
                      res ? PQresultErrorMessage(res)
                          : PQerrorMessage(ac->pg));

        if (res) {
            PQclear(res);
        }

        ngx_aq_conn_close(ac);
        ngx_aq_wait_listen_lost(l);
        return;
    }

    PQclear(res);

    if (ngx_exiting) {
        ngx_aq_conn_close(ac);
        ngx_aq_wait_listen_lost(l);
        return;
    }

    /* idle, reading: no timer, in the shadow pool's idle list */

    if (ngx_aq_conn_park(ac) != NGX_OK) {
        ngx_aq_wait_listen_lost(l);
        return;
    }

    ngx_log_error(NGX_LOG_INFO, ac->c->log, 0,
                  "annotation queue: listening for available items");

    l->listening = 1;
    l->backoff = 0;

    /* a claim sent before may have missed a notification */

    ngx_aq_wait_wake_all(l);

    ngx_aq_wait_notified(l, ac->pg);
}


void
ngx_aq_wait_listener_error(ngx_aq_conn_t *ac)
{
    ngx_aq_conn_close(ac);
    ngx_aq_wait_listen_lost((ngx_aq_listener_t *) ac->pool);
}


/* the LISTEN connection is readable: notifications, or its end */

void
ngx_aq_wait_listener_read(ngx_aq_conn_t *ac)
{
    PGresult           *res;
    ngx_aq_listener_t  *l;

    l = (ngx_aq_listener_t *) ac->pool;

    if (ac->c->close) {
        /* the worker exits */
        ngx_aq_conn_close(ac);
        ngx_aq_wait_listen_lost(l);
        return;
    }

    if (!PQconsumeInput(ac->pg) || PQstatus(ac->pg) != CONNECTION_OK) {
        ngx_log_error(NGX_LOG_WARN, ac->c->log, 0,
                      "annotation queue: the LISTEN connection was lost: "
                      "%*s", ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                      PQerrorMessage(ac->pg));
        ngx_aq_conn_close(ac);
        ngx_aq_wait_listen_lost(l);
        return;
    }

    while (!PQisBusy(ac->pg)) {
        res = PQgetResult(ac->pg);
        if (res == NULL) {
            break;
        }

        PQclear(res);
    }

    ngx_aq_wait_notified(l, ac->pg);
}


/*
 * The listener is closed (lost, failed, or the worker exits): a waiter
 * may have missed a notification, so every waiter claims once more; it
 * opens again after a pause, growing while it fails.
 */

static void
ngx_aq_wait_listen_lost(ngx_aq_listener_t *l)
{
    ngx_uint_t  was;

    was = l->listening;
    l->listening = 0;

    if (ngx_exiting) {
        ngx_aq_wait_wake_all(l);
        return;
    }

    l->backoff = l->backoff ? ngx_min(2 * l->backoff, NGX_AQ_WAIT_BACKOFF_MAX)
                            : NGX_AQ_WAIT_BACKOFF_MIN;

    if (!l->retry.timer_set) {
        l->retry.cancelable = (l->nqueues == 0);
        ngx_add_timer(&l->retry, l->backoff);
    }

    if (was) {
        ngx_aq_wait_wake_all(l);
    }
}


static void
ngx_aq_wait_notified(ngx_aq_listener_t *l, PGconn *pg)
{
    uint32_t          hash;
    ngx_str_t         id;
    PGnotify         *n;
    ngx_aq_wqueue_t  *wq;

    while ((n = PQnotifies(pg)) != NULL) {

        if (n->extra && ngx_strlen(n->extra) == NGX_AQ_UUID_LEN) {
            id.data = (u_char *) n->extra;
            id.len = NGX_AQ_UUID_LEN;
            hash = ngx_crc32_short(id.data, id.len);

            wq = (ngx_aq_wqueue_t *) ngx_str_rbtree_lookup(&l->tree, &id,
                                                           hash);

            ngx_log_debug2(NGX_LOG_DEBUG_HTTP, l->pool->log, 0,
                           "annotation queue: notified of %V%s", &id,
                           wq ? "" : ", nobody waits");

            if (wq) {
                wq->seq++;
                ngx_aq_wait_flag(wq, 1);
                ngx_aq_wait_dispatch(wq);
            }
        }

        PQfreemem(n);
    }
}


static void
ngx_aq_wait_wake_all(ngx_aq_listener_t *l)
{
    ngx_queue_t      *q, *next;
    ngx_aq_wqueue_t  *wq;

    for (q = ngx_queue_head(&l->queues);
         q != ngx_queue_sentinel(&l->queues);
         q = next)
    {
        wq = ngx_queue_data(q, ngx_aq_wqueue_t, queue);

        wq->refs++;

        wq->seq++;
        ngx_aq_wait_flag(wq, (ngx_uint_t) -1);
        ngx_aq_wait_dispatch(wq);

        next = ngx_queue_next(q);
        ngx_aq_wait_release(wq);
    }
}
