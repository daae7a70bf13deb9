
/*
 * A pool of PostgreSQL connections (ngx_aq_conn.c), one per worker and per
 * configured database, and the bounded list of queries waiting for one.
 *
 * The pool knows no statement: a query names its statement by number, and
 * the rules of its statement (q->rules, ngx_aq_claim.c for the claim) say
 * whether several queries may go as one statement, how, how the answer is
 * shared out, and which failures running it again removes.
 *
 * A connection goes back to the pool only when its results are all read
 * and it is idle outside a transaction; after a timeout or an error it is
 * closed instead (a reused dirty socket would hand the next request the
 * previous answer).  A query that reached PostgreSQL is never retried
 * elsewhere unless its rules say that the failure undid it: it may have
 * committed.  A query whose sending failed is retried, as nothing was sent
 * in full.
 *
 * A request owns its query and, on cleanup, detaches it
 * (ngx_aq_pool_cancel): late results are then read and dropped, and the
 * connection is reused.
 */


#include "ngx_aq_conn.h"


static ngx_int_t ngx_aq_pool_enqueue(ngx_aq_pool_t *pool, ngx_aq_query_t *q);
static ngx_int_t ngx_aq_pool_connect(ngx_aq_pool_t *pool);
static ngx_int_t ngx_aq_pool_run(ngx_aq_conn_t *ac, ngx_aq_query_t **qs,
    ngx_uint_t n);
static void ngx_aq_pool_batch_done(ngx_aq_conn_t *ac, PGresult *res);
static ngx_int_t ngx_aq_pool_rerun(ngx_aq_conn_t *ac, PGresult *res,
    ngx_aq_query_t *q);
static void ngx_aq_pool_dispatch(ngx_aq_pool_t *pool);
static ngx_uint_t ngx_aq_pool_gather(ngx_aq_pool_t *pool,
    ngx_aq_query_t **qs);
static void ngx_aq_pool_requeue(ngx_aq_pool_t *pool, ngx_aq_query_t *q);
static void ngx_aq_pool_closed(ngx_aq_pool_t *pool, ngx_uint_t connecting);
static void ngx_aq_pool_fail_waiting(ngx_aq_pool_t *pool,
    ngx_uint_t outcome);
static void ngx_aq_query_wait_handler(ngx_event_t *ev);
static void ngx_aq_query_finish(ngx_aq_query_t *q, PGresult *res,
    ngx_uint_t outcome);


ngx_int_t
ngx_aq_pool_init(ngx_aq_pool_t *pool, ngx_cycle_t *cycle)
{
    ngx_uint_t  i;

    pool->conns = ngx_pcalloc(cycle->pool,
                              pool->size * sizeof(ngx_aq_conn_t));
    if (pool->conns == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < pool->size; i++) {
        pool->conns[i].pool = pool;

        pool->conns[i].params = ngx_pnalloc(cycle->pool,
                                            NGX_AQ_BATCH_PARAMS_LEN);
        if (pool->conns[i].params == NULL) {
            return NGX_ERROR;
        }
    }

    ngx_queue_init(&pool->idle);
    ngx_queue_init(&pool->waiting);
    pool->log = cycle->log;

    /*
     * The counters the pool works with are the worker's own; the status
     * page's copy in shared memory is only ever written, never trusted.
     */

    pool->st = &pool->local;
    ngx_memzero(&pool->local, sizeof(ngx_aq_stats_t));

    ngx_aq_status_attach(cycle, pool);

    if (ngx_aq_wait_init(pool, cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    /*
     * The server bounds each statement too: a query the worker gave up on
     * does not run on.  Either at connect, in the "options" startup
     * parameter, which comes before the user's conninfo so that an
     * "options" there takes precedence (poolers refuse it), or in the
     * statement's own round trip (ngx_aq_conn_send()).
     */

    *ngx_snprintf((u_char *) pool->options, sizeof(pool->options) - 1,
                  "-c statement_timeout=%M", pool->query_timeout) = '\0';

    *ngx_snprintf((u_char *) pool->timeout, sizeof(pool->timeout) - 1,
                  "%M", pool->query_timeout) = '\0';

    return NGX_OK;
}


void
ngx_aq_pool_done(ngx_aq_pool_t *pool)
{
    ngx_uint_t  i;

    if (pool->conns == NULL) {
        return;
    }

    ngx_aq_wait_done(pool);

    ngx_aq_pool_fail_waiting(pool, NGX_AQ_QUERY_UNAVAILABLE);

    for (i = 0; i < pool->size; i++) {
        if (pool->conns[i].state != ngx_aq_conn_closed) {
            ngx_aq_pool_conn_error(&pool->conns[i], NGX_AQ_QUERY_UNAVAILABLE);
        }
    }
}


/*
 * Sends q on an idle connection or queues it for the next free one.
 * NGX_OK: q->handler will be called later, never from here;
 * NGX_BUSY: the wait list is full; NGX_DECLINED: no connection can be had.
 */

ngx_int_t
ngx_aq_pool_send(ngx_aq_pool_t *pool, ngx_aq_query_t *q)
{
    ngx_int_t  rc;

    rc = ngx_aq_pool_enqueue(pool, q);

    ngx_aq_status_publish(pool);

    return rc;
}


static ngx_int_t
ngx_aq_pool_enqueue(ngx_aq_pool_t *pool, ngx_aq_query_t *q)
{
    ngx_aq_conn_t  *ac;

    q->pool = pool;
    q->conn = NULL;

    while (!ngx_queue_empty(&pool->idle)) {
        ac = ngx_queue_data(ngx_queue_head(&pool->idle), ngx_aq_conn_t,
                            queue);
        ngx_queue_remove(&ac->queue);
        pool->st->idle--;

        if (ngx_aq_pool_run(ac, &q, 1) == NGX_OK) {
            return NGX_OK;
        }

        /* the connection was found broken and closed: try the next */
    }

    if (pool->st->connecting <= pool->st->waiting
        && pool->st->open < pool->size)
    {
        (void) ngx_aq_pool_connect(pool);
    }

    if (pool->st->open == 0) {
        return NGX_DECLINED;
    }

    /*
     * The wait list bounds the queries waiting for busy connections; a
     * query may always wait for a connection being opened for it.
     */

    if (pool->st->waiting >= pool->max_waiting
        && pool->st->waiting >= pool->st->connecting)
    {
        return NGX_BUSY;
    }

    q->wait.handler = ngx_aq_query_wait_handler;
    q->wait.data = q;
    q->wait.log = q->log;

    /* time enough for a connection to be made and a query ahead to end */

    ngx_add_timer(&q->wait, pool->connect_timeout + pool->query_timeout);

    ngx_queue_insert_tail(&pool->waiting, &q->queue);
    pool->st->waiting++;
    q->state = ngx_aq_query_waiting;

    return NGX_OK;
}


/* the request is gone: forget it, let the connection finish on its own */

void
ngx_aq_pool_cancel(ngx_aq_query_t *q)
{
    switch (q->state) {

    case ngx_aq_query_waiting:
        ngx_queue_remove(&q->queue);
        q->pool->st->waiting--;

        if (q->wait.timer_set) {
            ngx_del_timer(&q->wait);
        }

        break;

    case ngx_aq_query_sent:
        if (q->conn) {
            q->conn->queries[q->row] = NULL;
            q->conn = NULL;
        }

        break;

    default:
        q->state = ngx_aq_query_done;
        return;
    }

    q->state = ngx_aq_query_done;

    ngx_aq_status_publish(q->pool);
}


/* opens a closed connection of the pool, if one is left */

static ngx_int_t
ngx_aq_pool_connect(ngx_aq_pool_t *pool)
{
    ngx_uint_t  i;

    for (i = 0; i < pool->size; i++) {
        if (pool->conns[i].state == ngx_aq_conn_closed) {
            return ngx_aq_conn_connect(&pool->conns[i]);
        }
    }

    return NGX_BUSY;
}


/*
 * Runs qs on ac, a connection taken out of the idle list: one query alone,
 * or several as their rules' batch statement, whose answer has a row for
 * each, in the order of qs.  NGX_DECLINED: nothing reached PostgreSQL in
 * full, the connection is closed, and the queries may go elsewhere.
 */

static ngx_int_t
ngx_aq_pool_run(ngx_aq_conn_t *ac, ngx_aq_query_t **qs, ngx_uint_t n)
{
    ngx_int_t              rc;
    ngx_uint_t             i;
    const char            *values[NGX_AQ_MAX_PARAMS];
    const ngx_aq_rules_t  *rules;

    if (n == 1) {
        rc = ngx_aq_conn_send(ac, qs[0]->stmt, qs[0]->values, qs[0]->lengths,
                              qs[0]->formats);

    } else {
        rules = qs[0]->rules;
        rules->batch_params(qs, n, ac->params, values);

        rc = ngx_aq_conn_send(ac, rules->batch, values, NULL, NULL);
    }

    if (rc != NGX_OK) {
        return NGX_DECLINED;
    }

    for (i = 0; i < n; i++) {
        ac->queries[i] = qs[i];
        qs[i]->conn = ac;
        qs[i]->row = i;
        qs[i]->state = ngx_aq_query_sent;
    }

    ac->nqueries = n;
    ac->batch = (n > 1);

    return NGX_OK;
}


/* a connection is open, or done with its statement and clean: reuse it */

void
ngx_aq_pool_conn_ready(ngx_aq_conn_t *ac)
{
    if (ac->listen) {
        ngx_aq_wait_listener_ready(ac);
        return;
    }

    if (ngx_exiting && ngx_queue_empty(&ac->pool->waiting)) {
        /* an old worker after a reload: nothing more will come */
        ac->state = ngx_aq_conn_busy;
        ngx_aq_conn_close(ac);
        return;
    }

    if (ngx_aq_conn_park(ac) != NGX_OK) {
        /* closed: past its lifetime, or nginx could not watch it */
        ngx_aq_pool_closed(ac->pool, 0);
        return;
    }

    ngx_aq_pool_dispatch(ac->pool);
}


/* the statement on ac was answered: res, or NULL when it gave no result */

void
ngx_aq_pool_conn_done(ngx_aq_conn_t *ac, PGresult *res)
{
    ngx_aq_pool_t   *pool;
    ngx_aq_query_t  *q;

    if (ac->listen) {
        ngx_aq_wait_listener_done(ac, res);
        return;
    }

    pool = ac->pool;

    if (ac->batch) {
        ngx_aq_pool_batch_done(ac, res);
        return;
    }

    q = ac->queries[0];
    ac->nqueries = 0;

    if (q && ngx_aq_pool_rerun(ac, res, q)) {
        return;
    }

    /*
     * Only a connection that ended its exchange cleanly is reused; after an
     * error it is closed, so that the next query starts on a fresh session
     * with its statements prepared again.
     */

    if (res != NULL
        && PQresultStatus(res) == PGRES_TUPLES_OK
        && ngx_aq_conn_clean(ac))
    {
        ngx_aq_pool_conn_ready(ac);

    } else {
        ngx_aq_conn_close(ac);
        ngx_aq_pool_closed(pool, 0);
    }

    if (q) {
        ngx_aq_query_finish(q, res, NGX_AQ_QUERY_OK);
    }

    if (res) {
        PQclear(res);
    }
}


/*
 * A batch's answer: a row per query, by the rules of its statement.  A
 * query its row says to run alone (a claim the batch left without an
 * item), and every query of a batch that failed in a way running it again
 * removes, go back to the head of the wait list, to run alone.  An answer
 * of another shape than the rules expect is never answered by position:
 * every query of the batch fails (no result: 500), the cause logged once.
 */

static void
ngx_aq_pool_batch_done(ngx_aq_conn_t *ac, PGresult *res)
{
    ngx_uint_t             i, n, ok, tuples, rerun, answer[NGX_AQ_BATCH_MAX];
    ngx_aq_pool_t         *pool;
    ngx_aq_query_t        *q, *qs[NGX_AQ_BATCH_MAX];
    const ngx_aq_rules_t  *rules;

    pool = ac->pool;
    n = ac->nqueries;

    ngx_memcpy(qs, ac->queries, n * sizeof(ngx_aq_query_t *));
    ac->nqueries = 0;
    ac->batch = 0;

    /* the rules are the same for every query of a batch (gather) */

    rules = NULL;

    for (i = 0; i < n; i++) {
        if (qs[i]) {
            rules = qs[i]->rules;
            break;
        }
    }

    tuples = (res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK);
    ok = 0;
    rerun = 0;

    if (rules) {
        ok = tuples && rules->batch_fits(res, n);
        rerun = rules->retryable(res);
    }

    if (tuples && rules && !ok) {
        ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                      "annotation queue: a batch of %ui queries returned "
                      "%d rows of %d columns, failing all of them",
                      n, PQntuples(res), PQnfields(res));
    }

    for (i = n; i-- > 0; /* void */) {
        q = qs[i];
        answer[i] = 0;

        if (q == NULL) {
            continue;
        }

        if (rerun || (ok && rules->batch_rerun(res, i))) {
            ngx_aq_pool_requeue(pool, q);
            continue;
        }

        answer[i] = 1;
    }

    if ((tuples || rerun) && ngx_aq_conn_clean(ac)) {
        ngx_aq_pool_conn_ready(ac);

    } else {
        ngx_aq_conn_close(ac);
        ngx_aq_pool_closed(pool, 0);
    }

    for (i = 0; i < n; i++) {
        if (answer[i]) {
            /* of a wrong shape: 500 internal_error, logged above */
            ngx_aq_query_finish(qs[i], (tuples && !ok) ? NULL : res,
                                (tuples && !ok) ? NGX_AQ_QUERY_FAILED
                                                : NGX_AQ_QUERY_OK);
        }
    }

    if (res) {
        PQclear(res);
    }
}


/*
 * A query that failed in a way its rules say running it again removes
 * (nothing of it was committed) is run again, once, on the same
 * connection; one whose answer says it committed a step and must run again
 * (a claim that marked a slot failed), as often as it says so: each time
 * is a step no later run takes again.  1: the query is taken care of; 0:
 * res is its answer.
 */

static ngx_int_t
ngx_aq_pool_rerun(ngx_aq_conn_t *ac, PGresult *res, ngx_aq_query_t *q)
{
    ngx_int_t       rc;
    ngx_aq_pool_t  *pool;

    if (q->rules == NULL || !ngx_aq_conn_clean(ac)) {
        return 0;
    }

    if (q->rules->again(q, res)) {
        /* a step nearer its answer each time: no limit */

        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ac->c->log, 0,
                       "annotation queue: statement asks to run again");

    } else if (!q->retried && q->rules->retryable(res)) {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ac->c->log, 0,
                       "annotation queue: statement rolled back (%s), "
                       "running it again",
                       PQresultErrorField(res, PG_DIAG_SQLSTATE));
        q->retried = 1;

    } else {
        return 0;
    }

    PQclear(res);

    if (ngx_aq_pool_run(ac, &q, 1) == NGX_OK) {
        return 1;
    }

    /* that connection broke and is closed: the query goes back to the pool */

    pool = q->pool;
    rc = ngx_aq_pool_send(pool, q);

    ngx_aq_pool_closed(pool, 0);

    if (rc != NGX_OK) {
        ngx_aq_query_finish(q, NULL, rc == NGX_BUSY
                                     ? NGX_AQ_QUERY_SATURATED
                                     : NGX_AQ_QUERY_UNAVAILABLE);
    }

    return 1;
}


/* the connection failed: close it and tell its queries, if any */

void
ngx_aq_pool_conn_error(ngx_aq_conn_t *ac, ngx_uint_t outcome)
{
    ngx_uint_t       connecting, i, n;
    ngx_aq_pool_t   *pool;
    ngx_aq_query_t  *qs[NGX_AQ_BATCH_MAX];

    if (ac->listen) {
        ngx_aq_wait_listener_error(ac);
        return;
    }

    pool = ac->pool;
    connecting = (ac->state == ngx_aq_conn_resolving
                  || ac->state == ngx_aq_conn_connecting
                  || ac->state == ngx_aq_conn_preparing);

    n = ac->nqueries;
    ngx_memcpy(qs, ac->queries, n * sizeof(ngx_aq_query_t *));
    ac->nqueries = 0;
    ac->batch = 0;

    ngx_aq_conn_close(ac);

    for (i = 0; i < n; i++) {
        if (qs[i]) {
            ngx_aq_query_finish(qs[i], NULL, outcome);
        }
    }

    ngx_aq_pool_closed(pool, connecting);
}


/* hands idle connections to the queries waiting for one */

static void
ngx_aq_pool_dispatch(ngx_aq_pool_t *pool)
{
    ngx_uint_t       i, n;
    ngx_aq_conn_t   *ac;
    ngx_aq_query_t  *qs[NGX_AQ_BATCH_MAX];

    while (!ngx_queue_empty(&pool->waiting) && !ngx_queue_empty(&pool->idle))
    {
        ac = ngx_queue_data(ngx_queue_head(&pool->idle), ngx_aq_conn_t,
                            queue);

        ngx_queue_remove(&ac->queue);
        pool->st->idle--;

        n = ngx_aq_pool_gather(pool, qs);

        if (ngx_aq_pool_run(ac, qs, n) == NGX_OK) {
            for (i = 0; i < n; i++) {
                if (qs[i]->wait.timer_set) {
                    ngx_del_timer(&qs[i]->wait);
                }
            }

            continue;
        }

        /* that connection was broken and is closed: they keep their place */

        while (n) {
            n--;
            ngx_queue_insert_head(&pool->waiting, &qs[n]->queue);
            pool->st->waiting++;
        }
    }

    if (!ngx_queue_empty(&pool->waiting) && ngx_queue_empty(&pool->idle)) {
        ngx_aq_pool_closed(pool, 0);
    }
}


/*
 * Takes the head of the wait list and, when its rules batch, the queries
 * waiting behind it that their rules let join it: they go as one
 * statement, one commit.
 */

static ngx_uint_t
ngx_aq_pool_gather(ngx_aq_pool_t *pool, ngx_aq_query_t **qs)
{
    ngx_uint_t       n, scanned;
    ngx_queue_t     *qn, *next;
    ngx_aq_query_t  *q, *first;

    qn = ngx_queue_head(&pool->waiting);
    first = ngx_queue_data(qn, ngx_aq_query_t, queue);

    ngx_queue_remove(qn);
    pool->st->waiting--;

    qs[0] = first;
    n = 1;

    if (first->rules == NULL || first->single) {
        return n;
    }

    scanned = 0;

    for (qn = ngx_queue_head(&pool->waiting);
         qn != ngx_queue_sentinel(&pool->waiting)
         && n < NGX_AQ_BATCH_MAX
         && scanned < 4 * NGX_AQ_BATCH_MAX;
         qn = next)
    {
        next = ngx_queue_next(qn);
        scanned++;

        q = ngx_queue_data(qn, ngx_aq_query_t, queue);

        if (q->rules != first->rules
            || q->single
            || !first->rules->joins(first, q))
        {
            continue;
        }

        ngx_queue_remove(qn);
        pool->st->waiting--;

        qs[n++] = q;
    }

    return n;
}


/* back to the head of the wait list, to run alone */

static void
ngx_aq_pool_requeue(ngx_aq_pool_t *pool, ngx_aq_query_t *q)
{
    q->conn = NULL;
    q->single = 1;
    q->row = 0;
    q->state = ngx_aq_query_waiting;

    ngx_queue_insert_head(&pool->waiting, &q->queue);
    pool->st->waiting++;

    ngx_add_timer(&q->wait, pool->connect_timeout + pool->query_timeout);
}


/*
 * A connection went away.  If queries wait and fewer connections are on
 * their way than queries, open one, but not after a failed connect (no
 * storm of attempts against a server that is down); when no connection is
 * left at all, the waiting queries fail now rather than at their timeout.
 */

static void
ngx_aq_pool_closed(ngx_aq_pool_t *pool, ngx_uint_t connecting)
{
    if (!connecting
        && pool->st->waiting > pool->st->connecting
        && pool->st->open < pool->size)
    {
        (void) ngx_aq_pool_connect(pool);
    }

    if (pool->st->open == 0) {
        ngx_aq_pool_fail_waiting(pool, NGX_AQ_QUERY_UNAVAILABLE);
    }
}


static void
ngx_aq_pool_fail_waiting(ngx_aq_pool_t *pool, ngx_uint_t outcome)
{
    ngx_aq_query_t  *q;

    while (!ngx_queue_empty(&pool->waiting)) {
        q = ngx_queue_data(ngx_queue_head(&pool->waiting), ngx_aq_query_t,
                           queue);

        ngx_queue_remove(&q->queue);
        pool->st->waiting--;

        if (q->wait.timer_set) {
            ngx_del_timer(&q->wait);
        }

        ngx_aq_query_finish(q, NULL, outcome);
    }
}


static void
ngx_aq_query_wait_handler(ngx_event_t *ev)
{
    ngx_aq_pool_t   *pool;
    ngx_aq_query_t  *q;

    q = ev->data;

    ngx_log_error(NGX_LOG_WARN, ev->log, 0,
                  "annotation queue: no PostgreSQL connection became free "
                  "in time");

    ngx_queue_remove(&q->queue);
    q->pool->st->waiting--;

    pool = q->pool;

    ngx_aq_query_finish(q, NULL, NGX_AQ_QUERY_SATURATED);

    ngx_aq_status_publish(pool);
}


static void
ngx_aq_query_finish(ngx_aq_query_t *q, PGresult *res, ngx_uint_t outcome)
{
    q->state = ngx_aq_query_done;
    q->conn = NULL;

    q->handler(q, res, outcome);
}
