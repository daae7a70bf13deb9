
/*
 * A pool of non-blocking PostgreSQL connections, one per worker and per
 * configured database.
 *
 * Each connection is a PGconn whose socket is wrapped in an nginx
 * connection.  Its life: closed -> connecting (PQconnectStart and
 * PQconnectPoll, under the connect timer) -> preparing (PQsendPrepare of
 * every statement in one pipeline: one round trip, still under the connect
 * timer) -> idle <-> busy (PQsendQueryPrepared, PQflush, PQconsumeInput,
 * PQgetResult until NULL, under the query timer).  Nothing here ever waits:
 * every wait is an event or a timer.
 *
 * Events are registered level-triggered, so that data libpq left in the
 * kernel's buffer (PQconsumeInput reads at most what fits in its buffer)
 * always wakes the worker again; with SSL, bytes already decrypted by
 * OpenSSL are drained before waiting.
 *
 * A query waits in a bounded list for a free connection.  A connection goes
 * back to the pool only when its results are all read and it is idle
 * outside a transaction; after a timeout or an error it is closed instead
 * (a reused dirty socket would hand the next request the previous answer).
 * A query that reached PostgreSQL is never retried elsewhere: it may have
 * committed.  A query whose sending failed is retried, as nothing was sent
 * in full.
 *
 * Ownership: the pool owns the PGconn and the nginx connection; PQfinish
 * closes the socket, so nginx forgets it first.  A request owns its query
 * and, on cleanup, detaches it (ngx_aq_pool_cancel): late results are then
 * read and dropped, and the connection is reused.
 */


#include "ngx_aq.h"
#include "ngx_aq_sql.h"
#include <openssl/ssl.h>
#include <sys/stat.h>


typedef enum {
    ngx_aq_conn_closed = 0,
    ngx_aq_conn_connecting,
    ngx_aq_conn_preparing,
    ngx_aq_conn_idle,
    ngx_aq_conn_busy
} ngx_aq_conn_state_e;


struct ngx_aq_conn_s {
    ngx_queue_t               queue;
    ngx_aq_pool_t            *pool;
    PGconn                   *pg;
    ngx_connection_t         *c;
    ino_t                     ino;
    ngx_aq_query_t           *query;
    ngx_aq_query_t           *batch[NGX_AQ_BATCH_MAX];
    ngx_uint_t                nbatch;
    u_char                   *digests;   /* the batch's $1 */
    PGresult                 *result;
    ngx_aq_conn_state_e       state;
    ngx_uint_t                prepared;
    ngx_uint_t                nulls;     /* ends of statements, pipelined */

    unsigned                  pipeline:1;
    unsigned                  skip:1;    /* set_config()'s row comes first */

    unsigned                  want_read:1;
    unsigned                  want_write:1;
};


static ngx_int_t ngx_aq_conn_connect(ngx_aq_pool_t *pool);
static void ngx_aq_conn_connect_poll(ngx_aq_conn_t *ac);
static void ngx_aq_conn_prepare(ngx_aq_conn_t *ac);
static void ngx_aq_conn_read_prepared(ngx_aq_conn_t *ac);
static void ngx_aq_conn_connected(ngx_aq_conn_t *ac);
static ngx_int_t ngx_aq_conn_send_stmt(ngx_aq_conn_t *ac, ngx_aq_stmt_e n,
    const char *const *values, const int *lengths, const int *formats);
static ngx_int_t ngx_aq_conn_send(ngx_aq_conn_t *ac, ngx_aq_query_t *q);
static ngx_int_t ngx_aq_conn_send_batch(ngx_aq_conn_t *ac,
    ngx_aq_query_t **qs, ngx_uint_t n);
static void ngx_aq_conn_batch_done(ngx_aq_conn_t *ac, PGresult *res);
static ngx_uint_t ngx_aq_pool_gather(ngx_aq_pool_t *pool,
    ngx_aq_query_t **qs);
static void ngx_aq_pool_requeue(ngx_aq_pool_t *pool, ngx_aq_query_t *q);
static ngx_int_t ngx_aq_pool_enqueue(ngx_aq_pool_t *pool, ngx_aq_query_t *q);
static void ngx_aq_conn_handler(ngx_event_t *ev);
static void ngx_aq_conn_process(ngx_event_t *ev);
static void ngx_aq_conn_idle_handler(ngx_aq_conn_t *ac);
static void ngx_aq_conn_read(ngx_aq_conn_t *ac);
static void ngx_aq_conn_done(ngx_aq_conn_t *ac);
static ngx_int_t ngx_aq_conn_raced(ngx_aq_conn_t *ac, PGresult *res,
    ngx_aq_query_t *q);
static ngx_uint_t ngx_aq_claim_retryable(PGresult *res);
static void ngx_aq_conn_ready(ngx_aq_conn_t *ac);
static ngx_int_t ngx_aq_conn_flush(ngx_aq_conn_t *ac);
static ngx_int_t ngx_aq_conn_watch(ngx_aq_conn_t *ac, ngx_uint_t read,
    ngx_uint_t write);
static ngx_int_t ngx_aq_conn_wrap_socket(ngx_aq_conn_t *ac);
static void ngx_aq_conn_release_socket(ngx_aq_conn_t *ac);
static void ngx_aq_conn_error(ngx_aq_conn_t *ac, ngx_uint_t outcome);
static void ngx_aq_conn_close(ngx_aq_conn_t *ac);
static void ngx_aq_pool_dispatch(ngx_aq_pool_t *pool);
static void ngx_aq_pool_closed(ngx_aq_pool_t *pool, ngx_uint_t connecting);
static void ngx_aq_pool_fail_waiting(ngx_aq_pool_t *pool,
    ngx_uint_t outcome);
static void ngx_aq_query_wait_handler(ngx_event_t *ev);
static void ngx_aq_query_finish(ngx_aq_query_t *q, PGresult *res,
    ngx_uint_t outcome);
static size_t ngx_aq_pg_error_len(const char *msg);


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

        pool->conns[i].digests = ngx_pnalloc(cycle->pool,
                                  NGX_AQ_BATCH_MAX * (2 * NGX_AQ_DIGEST_LEN + 1)
                                  + 2);
        if (pool->conns[i].digests == NULL) {
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

    /*
     * The server bounds each statement too: a query the worker gave up on
     * does not run on.  Either at connect, in the "options" startup
     * parameter, which comes before the user's conninfo so that an
     * "options" there takes precedence (poolers refuse it), or in the
     * statement's own round trip (ngx_aq_conn_send_stmt()).
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

    ngx_aq_pool_fail_waiting(pool, NGX_AQ_QUERY_UNAVAILABLE);

    for (i = 0; i < pool->size; i++) {
        if (pool->conns[i].state != ngx_aq_conn_closed) {
            ngx_aq_conn_error(&pool->conns[i], NGX_AQ_QUERY_UNAVAILABLE);
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

        if (ngx_aq_conn_send(ac, q) == NGX_OK) {
            return NGX_OK;
        }

        /* the connection was found broken and closed: try the next */
    }

    if (pool->st->connecting <= pool->st->waiting
        && pool->st->open < pool->size)
    {
        (void) ngx_aq_conn_connect(pool);
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
            if (q->conn->nbatch) {
                q->conn->batch[q->row] = NULL;

            } else {
                q->conn->query = NULL;
            }

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


static ngx_int_t
ngx_aq_conn_connect(ngx_aq_pool_t *pool)
{
    PGconn         *pg;
    ngx_uint_t      i;
    ngx_aq_conn_t  *ac;
    ngx_uint_t      n;
    const char     *keywords[5], *values[5];

    ac = NULL;

    for (i = 0; i < pool->size; i++) {
        if (pool->conns[i].state == ngx_aq_conn_closed) {
            ac = &pool->conns[i];
            break;
        }
    }

    if (ac == NULL) {
        return NGX_BUSY;
    }

    /*
     * Defaults the conninfo may override: it comes last.  GSSAPI encryption
     * is not tried unless asked for: libpq's "prefer" may block in the
     * Kerberos library before the connection starts.
     */

    n = 0;

    if (pool->statement_timeout == NGX_AQ_TIMEOUT_STARTUP) {
        keywords[n] = "options";
        values[n++] = pool->options;
    }

    keywords[n] = "application_name";
    values[n++] = "nginx_annotation_queue";
    keywords[n] = "gssencmode";
    values[n++] = "disable";
    keywords[n] = "dbname";
    values[n++] = (const char *) pool->conninfo.data;
    keywords[n] = NULL;
    values[n] = NULL;

    pg = PQconnectStartParams(keywords, values, 1);

    if (pg == NULL) {
        ngx_log_error(NGX_LOG_ALERT, pool->log, 0,
                      "annotation queue: PQconnectStartParams() failed");
        return NGX_ERROR;
    }

    if (PQstatus(pg) == CONNECTION_BAD) {
        ngx_log_error(NGX_LOG_ERR, pool->log, 0,
                      "annotation queue: could not connect to PostgreSQL: "
                      "%*s", ngx_aq_pg_error_len(PQerrorMessage(pg)),
                      PQerrorMessage(pg));
        PQfinish(pg);
        return NGX_DECLINED;
    }

    ac->pg = pg;
    ac->state = ngx_aq_conn_connecting;
    ac->prepared = 0;
    pool->st->open++;
    pool->st->connecting++;

    if (ngx_aq_conn_wrap_socket(ac) != NGX_OK) {
        ngx_aq_conn_close(ac);
        return NGX_ERROR;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, pool->log, 0,
                   "annotation queue: connecting on fd:%d", ac->c->fd);

    /* after PQconnectStart, wait as if PQconnectPoll asked for writing */

    ac->want_read = 0;
    ac->want_write = 1;

    if (ngx_aq_conn_watch(ac, 0, 1) != NGX_OK) {
        ngx_aq_conn_close(ac);
        return NGX_ERROR;
    }

    ngx_add_timer(ac->c->read, pool->connect_timeout);

    return NGX_OK;
}


static void
ngx_aq_conn_connect_poll(ngx_aq_conn_t *ac)
{
    PostgresPollingStatusType  status;

    status = PQconnectPoll(ac->pg);

    if (status == PGRES_POLLING_FAILED) {
        ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                      "annotation queue: could not connect to PostgreSQL: "
                      "%*s", ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                      PQerrorMessage(ac->pg));
        ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
        return;
    }

    /* libpq may have moved to another socket (host lists, SSL fallback) */

    if (ngx_aq_conn_wrap_socket(ac) != NGX_OK) {
        ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
        return;
    }

    switch (status) {

    case PGRES_POLLING_READING:
        ac->want_read = 1;
        ac->want_write = 0;
        break;

    case PGRES_POLLING_WRITING:
        ac->want_read = 0;
        ac->want_write = 1;
        break;

    default: /* PGRES_POLLING_OK */

        if (PQsetnonblocking(ac->pg, 1) != 0) {
            ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
            return;
        }

        if (!ac->pool->prepare) {
            ngx_aq_conn_connected(ac);
            return;
        }

        /* the connect timer goes on: it bounds preparing too */

        ngx_aq_conn_prepare(ac);
        return;
    }

    if (ngx_aq_conn_watch(ac, ac->want_read, ac->want_write) != NGX_OK) {
        ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
    }
}


/*
 * Prepares every statement in one round trip: the Parse messages of all of
 * them and a Sync go out together in libpq's pipeline mode, and the answers
 * are read by ngx_aq_conn_read_prepared().
 */

static void
ngx_aq_conn_prepare(ngx_aq_conn_t *ac)
{
    ngx_uint_t            i;
    const ngx_aq_stmt_t  *stmt;

    ac->state = ngx_aq_conn_preparing;
    ac->prepared = 0;

    if (!PQenterPipelineMode(ac->pg)) {
        goto failed;
    }

    for (i = 0; i < NGX_AQ_NSTMTS; i++) {
        stmt = &ngx_aq_stmts[i];

        if (!PQsendPrepare(ac->pg, stmt->name, stmt->sql, stmt->nparams,
                           stmt->types))
        {
            goto failed;
        }
    }

    if (!PQpipelineSync(ac->pg)) {
        goto failed;
    }

    if (ngx_aq_conn_flush(ac) != NGX_OK) {
        ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
    }

    return;

failed:

    ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                  "annotation queue: preparing statements failed: %*s",
                  ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                  PQerrorMessage(ac->pg));
    ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
}


/*
 * The answers to the pipeline of ngx_aq_conn_prepare(), in order: for each
 * statement a result and a NULL, then the Sync's PGRES_PIPELINE_SYNC.  A
 * statement that fails makes the rest PGRES_PIPELINE_ABORTED: the first
 * error is logged and the connection closed.
 */

static void
ngx_aq_conn_read_prepared(ngx_aq_conn_t *ac)
{
    ngx_uint_t       nulls;
    PGresult        *res;
    ExecStatusType   status;

    nulls = 0;

    while (!PQisBusy(ac->pg)) {
        res = PQgetResult(ac->pg);

        if (res == NULL) {

            /* the end of one statement's results; never more than those */

            if (++nulls > NGX_AQ_NSTMTS) {
                break;
            }

            continue;
        }

        status = PQresultStatus(res);

        if (status == PGRES_FATAL_ERROR) {
            ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                          "annotation queue: preparing \"%s\" failed: %*s",
                          ngx_aq_stmts[ngx_min(ac->prepared,
                                               NGX_AQ_NSTMTS - 1)].name,
                          ngx_aq_pg_error_len(PQresultErrorMessage(res)),
                          PQresultErrorMessage(res));
            PQclear(res);
            ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
            return;
        }

        PQclear(res);

        if (status == PGRES_COMMAND_OK && ac->prepared < NGX_AQ_NSTMTS) {
            ac->prepared++;
            continue;
        }

        if (status == PGRES_PIPELINE_SYNC
            && ac->prepared == NGX_AQ_NSTMTS
            && PQexitPipelineMode(ac->pg))
        {
            ngx_aq_conn_connected(ac);
            return;
        }

        break;
    }

    if (PQisBusy(ac->pg)) {
        return;    /* the rest of the answers is still on its way */
    }

    ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                  "annotation queue: preparing \"%s\" failed: %*s",
                  ngx_aq_stmts[ngx_min(ac->prepared, NGX_AQ_NSTMTS - 1)].name,
                  ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                  PQerrorMessage(ac->pg));

    ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
}


static void
ngx_aq_conn_connected(ngx_aq_conn_t *ac)
{
    if (ac->c->read->timer_set) {
        ngx_del_timer(ac->c->read);
    }

    ac->pool->st->connecting--;

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ac->c->log, 0,
                   "annotation queue: connection ready on fd:%d", ac->c->fd);

    ngx_aq_conn_ready(ac);
}


/*
 * Sends one statement: the prepared one, or its text as an unnamed
 * statement (annotation_queue_prepare off).  With the statement timeout
 * set locally, a set_config() goes before it in one pipeline: both run in
 * the implicit transaction their Sync ends, so the setting bounds this
 * statement alone (PostgreSQL starts each Execute's timeout afresh) and
 * leaves the session, or a pooler's server connection, as it was.
 */

static ngx_int_t
ngx_aq_conn_send_stmt(ngx_aq_conn_t *ac, ngx_aq_stmt_e n,
    const char *const *values, const int *lengths, const int *formats)
{
    const char           *timeout;
    ngx_aq_pool_t        *pool;
    const ngx_aq_stmt_t  *stmt;

    pool = ac->pool;
    stmt = &ngx_aq_stmts[n];

    ac->pipeline = 0;
    ac->skip = 0;
    ac->nulls = 0;

    if (pool->statement_timeout == NGX_AQ_TIMEOUT_LOCAL) {
        timeout = pool->timeout;

        if (!PQenterPipelineMode(ac->pg)
            || !PQsendQueryParams(ac->pg, NGX_AQ_SET_TIMEOUT_SQL, 1, NULL,
                                  &timeout, NULL, NULL, 0))
        {
            return NGX_ERROR;
        }

        ac->pipeline = 1;
        ac->skip = 1;
    }

    if (pool->prepare) {
        if (!PQsendQueryPrepared(ac->pg, stmt->name, stmt->nparams, values,
                                 lengths, formats, 0))
        {
            return NGX_ERROR;
        }

    } else {
        if (!PQsendQueryParams(ac->pg, stmt->sql, stmt->nparams, stmt->types,
                               values, lengths, formats, 0))
        {
            return NGX_ERROR;
        }
    }

    if (ac->pipeline && !PQpipelineSync(ac->pg)) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * Sends q on ac, a connection taken out of the idle list.
 * NGX_OK: sent, the connection is busy with q;
 * NGX_DECLINED: nothing reached PostgreSQL in full, the connection is
 * closed, and q may go elsewhere.
 */

static ngx_int_t
ngx_aq_conn_send(ngx_aq_conn_t *ac, ngx_aq_query_t *q)
{
    ac->state = ngx_aq_conn_busy;
    ac->c->idle = 0;

    if (ngx_aq_conn_send_stmt(ac, q->stmt, q->values, q->lengths,
                              q->formats)
        != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, ac->c->log, 0,
                      "annotation queue: sending the query failed, "
                      "closing the connection: %*s",
                      ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                      PQerrorMessage(ac->pg));
        ngx_aq_conn_close(ac);
        return NGX_DECLINED;
    }

    /*
     * The Sync message ends what libpq sends: if a flush fails, PostgreSQL
     * has not received it, and the implicit transaction cannot commit.
     */

    if (ngx_aq_conn_flush(ac) != NGX_OK) {
        ngx_log_error(NGX_LOG_WARN, ac->c->log, 0,
                      "annotation queue: sending the query failed, "
                      "closing the connection: %*s",
                      ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                      PQerrorMessage(ac->pg));
        ngx_aq_conn_close(ac);
        return NGX_DECLINED;
    }

    ac->query = q;
    q->conn = ac;
    q->state = ngx_aq_query_sent;

    ngx_add_timer(ac->c->read, ac->pool->query_timeout);

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ac->c->log, 0,
                   "annotation queue: query sent on fd:%d", ac->c->fd);

    return NGX_OK;
}


/*
 * Sends the claims of several requests for one queue as one statement:
 * $1 is the array of their key digests, in hex.
 */

static ngx_int_t
ngx_aq_conn_send_batch(ngx_aq_conn_t *ac, ngx_aq_query_t **qs, ngx_uint_t n)
{
    u_char      *p;
    ngx_uint_t   i;
    const char  *values[3];

    ac->state = ngx_aq_conn_busy;
    ac->c->idle = 0;

    p = ac->digests;
    *p++ = '{';

    for (i = 0; i < n; i++) {
        if (i) {
            *p++ = ',';
        }

        p = ngx_hex_dump(p, (u_char *) qs[i]->values[0], NGX_AQ_DIGEST_LEN);
    }

    *p++ = '}';
    *p = '\0';

    values[0] = (const char *) ac->digests;
    values[1] = qs[0]->values[1];
    values[2] = qs[0]->values[2];

    if (ngx_aq_conn_send_stmt(ac, NGX_AQ_STMT_CLAIM_BATCH, values, NULL, NULL)
        != NGX_OK
        || ngx_aq_conn_flush(ac) != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, ac->c->log, 0,
                      "annotation queue: sending the claims failed, "
                      "closing the connection: %*s",
                      ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                      PQerrorMessage(ac->pg));
        ngx_aq_conn_close(ac);
        return NGX_DECLINED;
    }

    for (i = 0; i < n; i++) {
        ac->batch[i] = qs[i];
        qs[i]->conn = ac;
        qs[i]->row = i;
        qs[i]->state = ngx_aq_query_sent;
    }

    ac->nbatch = n;

    ngx_add_timer(ac->c->read, ac->pool->query_timeout);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ac->c->log, 0,
                   "annotation queue: %ui claims sent on fd:%d",
                   n, ac->c->fd);

    return NGX_OK;
}


static void
ngx_aq_conn_handler(ngx_event_t *ev)
{
    ngx_aq_pool_t     *pool;
    ngx_connection_t  *c;

    c = ev->data;
    pool = ((ngx_aq_conn_t *) c->data)->pool;

    ngx_aq_conn_process(ev);

    ngx_aq_status_publish(pool);
}


static void
ngx_aq_conn_process(ngx_event_t *ev)
{
    ngx_connection_t  *c;
    ngx_aq_conn_t     *ac;

    c = ev->data;
    ac = c->data;

    if (c->read->timedout
        && (ac->state == ngx_aq_conn_connecting
            || ac->state == ngx_aq_conn_preparing))
    {
        ngx_log_error(NGX_LOG_ERR, c->log, NGX_ETIMEDOUT,
                      "annotation queue: connecting to PostgreSQL "
                      "timed out%s",
                      ac->state == ngx_aq_conn_preparing
                      ? " while preparing statements" : "");
        ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
        return;
    }

    switch (ac->state) {

    case ngx_aq_conn_connecting:

        /* PQconnectPoll must only be called when the socket is ready */

        if (ev->write ? ac->want_write : ac->want_read) {
            ngx_aq_conn_connect_poll(ac);
        }

        return;

    case ngx_aq_conn_preparing:
    case ngx_aq_conn_busy:

        if (c->read->timedout) {
            ngx_log_error(NGX_LOG_ERR, c->log, NGX_ETIMEDOUT,
                          "annotation queue: PostgreSQL query timed out, "
                          "closing the connection");
            ngx_aq_conn_error(ac, NGX_AQ_QUERY_TIMEDOUT);
            return;
        }

        if (ev->write) {
            if (ngx_aq_conn_flush(ac) != NGX_OK) {
                ngx_log_error(NGX_LOG_ERR, c->log, 0,
                              "annotation queue: sending to PostgreSQL "
                              "failed: %*s",
                              ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                              PQerrorMessage(ac->pg));
                ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
            }

            return;
        }

        ngx_aq_conn_read(ac);
        return;

    case ngx_aq_conn_idle:
        if (!ev->write) {
            ngx_aq_conn_idle_handler(ac);
        }

        return;

    default:
        return;
    }
}


/*
 * An idle connection has nothing to say: anything it reads is the server
 * going away (a FATAL message, then end of file) or a worker shutting down.
 */

static void
ngx_aq_conn_idle_handler(ngx_aq_conn_t *ac)
{
    PGresult          *res;
    ngx_connection_t  *c;

    c = ac->c;

    if (c->close) {
        ngx_aq_conn_close(ac);
        return;
    }

    if (PQconsumeInput(ac->pg) && PQstatus(ac->pg) == CONNECTION_OK) {

        while (!PQisBusy(ac->pg)) {
            res = PQgetResult(ac->pg);
            if (res == NULL) {
                return;
            }

            PQclear(res);
        }

        return;
    }

    ngx_log_error(NGX_LOG_INFO, c->log, 0,
                  "annotation queue: PostgreSQL closed an idle connection: "
                  "%*s", ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                  PQerrorMessage(ac->pg));

    ngx_aq_conn_close(ac);
}


static void
ngx_aq_conn_read(ngx_aq_conn_t *ac)
{
    SSL       *ssl;
    PGresult  *res;

    ssl = PQsslStruct(ac->pg, "OpenSSL");

    do {
        if (!PQconsumeInput(ac->pg)) {
            ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                          "annotation queue: reading from PostgreSQL "
                          "failed: %*s",
                          ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                          PQerrorMessage(ac->pg));
            ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
            return;
        }

    } while (PQisBusy(ac->pg) && ssl && SSL_pending(ssl) > 0);

    if (ac->state == ngx_aq_conn_preparing) {
        ngx_aq_conn_read_prepared(ac);
        return;
    }

    while (!PQisBusy(ac->pg)) {
        res = PQgetResult(ac->pg);

        if (res == NULL) {
            if (!ac->pipeline) {
                ngx_aq_conn_done(ac);
                return;
            }

            /* a statement's end: two, an error at most one more */

            if (++ac->nulls > 3) {
                ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                              "annotation queue: PostgreSQL's answer "
                              "lacks the end of its pipeline");
                ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
                return;
            }

            continue;
        }

        if (ac->pipeline) {
            switch (PQresultStatus(res)) {

            case PGRES_PIPELINE_SYNC:
                PQclear(res);

                if (!PQexitPipelineMode(ac->pg)) {
                    ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                                  "annotation queue: leaving pipeline "
                                  "mode failed: %*s",
                                  ngx_aq_pg_error_len(
                                      PQerrorMessage(ac->pg)),
                                  PQerrorMessage(ac->pg));
                    ngx_aq_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
                    return;
                }

                ac->pipeline = 0;
                ngx_aq_conn_done(ac);
                return;

            case PGRES_PIPELINE_ABORTED:

                /* the statement after a set_config() that failed */

                PQclear(res);
                continue;

            case PGRES_TUPLES_OK:
                if (ac->skip) {
                    ac->skip = 0;
                    PQclear(res);
                    continue;
                }

                break;

            default:
                break;
            }

            ac->skip = 0;
        }

        /*
         * The statement's rows come first; an error after them is the
         * commit failing (a deferred constraint, a serialization failure):
         * nothing was claimed, so the error is the answer.
         */

        if (ac->result == NULL) {
            ac->result = res;

        } else if (PQresultStatus(res) == PGRES_FATAL_ERROR
                   && PQresultStatus(ac->result) != PGRES_FATAL_ERROR)
        {
            PQclear(ac->result);
            ac->result = res;

        } else {
            PQclear(res);
        }
    }

    /* the rest of the answer is still on its way: the read event stays */
}


static void
ngx_aq_conn_done(ngx_aq_conn_t *ac)
{
    PGresult        *res;
    ngx_aq_pool_t   *pool;
    ngx_aq_query_t  *q;

    pool = ac->pool;
    res = ac->result;
    q = ac->query;

    ac->result = NULL;
    ac->query = NULL;

    if (ac->c->read->timer_set) {
        ngx_del_timer(ac->c->read);
    }

    if (ac->nbatch) {
        ngx_aq_conn_batch_done(ac, res);
        return;
    }

    if (q && ngx_aq_conn_raced(ac, res, q)) {
        return;
    }

    /*
     * Only a connection that ended its exchange cleanly is reused; after an
     * error it is closed, so that the next claim starts on a fresh session
     * with its statement prepared again.
     */

    if (res != NULL
        && PQresultStatus(res) == PGRES_TUPLES_OK
        && PQtransactionStatus(ac->pg) == PQTRANS_IDLE)
    {
        ngx_aq_conn_ready(ac);

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
 * A batch's answer: a row per request.  A request the batch left without an
 * item, and every request of a batch that rolled back for a reason a claim
 * run alone does not meet (ngx_aq_claim_retryable()), runs the single claim
 * next.  A result of another shape than a row of 8 columns per request is
 * never answered by position: every request of the batch fails (500), and
 * the cause is logged once here.
 */

static void
ngx_aq_conn_batch_done(ngx_aq_conn_t *ac, PGresult *res)
{
    ngx_uint_t       i, n, ok, tuples, raced, answer[NGX_AQ_BATCH_MAX];
    ngx_aq_pool_t   *pool;
    ngx_aq_query_t  *q, *qs[NGX_AQ_BATCH_MAX];

    pool = ac->pool;
    n = ac->nbatch;

    ngx_memcpy(qs, ac->batch, n * sizeof(ngx_aq_query_t *));
    ac->nbatch = 0;

    tuples = (res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK);

    ok = (tuples
          && (ngx_uint_t) PQntuples(res) == n
          && PQnfields(res) == 8);

    if (tuples && !ok) {
        ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                      "annotation queue: a batch of %ui claims returned "
                      "%d rows of %d columns, failing all of them",
                      n, PQntuples(res), PQnfields(res));
    }

    raced = ngx_aq_claim_retryable(res);

    for (i = n; i-- > 0; /* void */) {
        q = qs[i];
        answer[i] = 0;

        if (q == NULL) {
            continue;
        }

        if (raced
            || (ok
                && PQgetvalue(res, i, 0)[0] == 't'
                && PQgetvalue(res, i, 1)[0] == 't'
                && PQgetisnull(res, i, 2)))
        {
            ngx_aq_pool_requeue(pool, q);
            continue;
        }

        answer[i] = 1;
    }

    if ((tuples || raced) && PQtransactionStatus(ac->pg) == PQTRANS_IDLE) {
        ngx_aq_conn_ready(ac);

    } else {
        ngx_aq_conn_close(ac);
        ngx_aq_pool_closed(pool, 0);
    }

    for (i = 0; i < n; i++) {
        if (answer[i]) {
            /* no result: the request answers 500 internal_error */
            ngx_aq_query_finish(qs[i], (tuples && !ok) ? NULL : res,
                                NGX_AQ_QUERY_OK);
        }
    }

    if (res) {
        PQclear(res);
    }
}


/*
 * A single claim rolled back for a reason that running it again removes
 * (ngx_aq_claim_retryable()): it is run again, once, on the same
 * connection.  Two claims of one key ran at once and the other committed
 * first: this one now resumes the other's item.
 */

static ngx_int_t
ngx_aq_conn_raced(ngx_aq_conn_t *ac, PGresult *res, ngx_aq_query_t *q)
{
    ngx_int_t       rc;
    ngx_aq_pool_t  *pool;

    if (q->retried
        || q->stmt != NGX_AQ_STMT_CLAIM
        || !ngx_aq_claim_retryable(res)
        || PQtransactionStatus(ac->pg) != PQTRANS_IDLE)
    {
        return 0;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ac->c->log, 0,
                   "annotation queue: claim rolled back (%s), "
                   "running it again",
                   PQresultErrorField(res, PG_DIAG_SQLSTATE));

    PQclear(res);
    q->retried = 1;

    if (ngx_aq_conn_send(ac, q) == NGX_OK) {
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


static void
ngx_aq_conn_ready(ngx_aq_conn_t *ac)
{
    if (ngx_exiting && ngx_queue_empty(&ac->pool->waiting)) {
        /* an old worker after a reload: nothing more will come */
        ac->state = ngx_aq_conn_busy;
        ngx_aq_conn_close(ac);
        return;
    }

    ac->state = ngx_aq_conn_idle;
    ac->c->idle = 1;

    ngx_queue_insert_head(&ac->pool->idle, &ac->queue);
    ac->pool->st->idle++;

    if (ngx_aq_conn_watch(ac, 1, 0) != NGX_OK) {
        ngx_aq_conn_close(ac);
        ngx_aq_pool_closed(ac->pool, 0);
        return;
    }

    ngx_aq_pool_dispatch(ac->pool);
}


static ngx_int_t
ngx_aq_conn_flush(ngx_aq_conn_t *ac)
{
    int  rc;

    rc = PQflush(ac->pg);

    if (rc == -1) {
        return NGX_ERROR;
    }

    /* 1: some data is still queued, wait until the socket takes more */

    return ngx_aq_conn_watch(ac, 1, rc == 1);
}


static ngx_int_t
ngx_aq_conn_watch(ngx_aq_conn_t *ac, ngx_uint_t read, ngx_uint_t write)
{
    ngx_event_t  *rev, *wev;

    rev = ac->c->read;
    wev = ac->c->write;

    if (read && !rev->active) {
        if (ngx_add_event(rev, NGX_READ_EVENT, NGX_LEVEL_EVENT) != NGX_OK) {
            return NGX_ERROR;
        }

    } else if (!read && rev->active) {
        if (ngx_del_event(rev, NGX_READ_EVENT, 0) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (write && !wev->active) {
        if (ngx_add_event(wev, NGX_WRITE_EVENT, NGX_LEVEL_EVENT) != NGX_OK) {
            return NGX_ERROR;
        }

    } else if (!write && wev->active) {
        if (ngx_del_event(wev, NGX_WRITE_EVENT, 0) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * Keeps ac->c wrapping the PGconn's current socket.  A socket libpq has
 * replaced is already closed, and the kernel dropped it from the event set;
 * the same descriptor number may come back for the new socket, so the inode
 * tells them apart.
 */

static ngx_int_t
ngx_aq_conn_wrap_socket(ngx_aq_conn_t *ac)
{
    int                fd;
    ngx_msec_t         timer;
    struct stat        st;
    ngx_connection_t  *c;

    fd = PQsocket(ac->pg);

    if (fd == -1 || fstat(fd, &st) == -1) {
        return NGX_ERROR;
    }

    timer = 0;

    if (ac->c) {
        if (ac->c->fd == fd && ac->ino == st.st_ino) {
            return NGX_OK;
        }

        if (ac->c->read->timer_set) {
            timer = ac->c->read->timer.key - ngx_current_msec;

            if ((ngx_msec_int_t) timer <= 0) {
                timer = 1;
            }
        }

        ngx_aq_conn_release_socket(ac);
    }

    c = ngx_get_connection(fd, ac->pool->log);
    if (c == NULL) {
        return NGX_ERROR;
    }

    c->data = ac;
    c->read->handler = ngx_aq_conn_handler;
    c->write->handler = ngx_aq_conn_handler;
    c->read->log = c->log;
    c->write->log = c->log;
    c->number = ngx_atomic_fetch_add(ngx_connection_counter, 1);

    ac->c = c;
    ac->ino = st.st_ino;

    if (timer) {
        ngx_add_timer(c->read, timer);
    }

    return NGX_OK;
}


/* nginx forgets the socket; the caller lets libpq close it */

static void
ngx_aq_conn_release_socket(ngx_aq_conn_t *ac)
{
    ngx_connection_t  *c;

    c = ac->c;

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    if (ngx_del_conn) {
        ngx_del_conn(c, NGX_CLOSE_EVENT);

    } else {
        if (c->read->active || c->read->disabled) {
            ngx_del_event(c->read, NGX_READ_EVENT, NGX_CLOSE_EVENT);
        }

        if (c->write->active || c->write->disabled) {
            ngx_del_event(c->write, NGX_WRITE_EVENT, NGX_CLOSE_EVENT);
        }
    }

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    c->fd = (ngx_socket_t) -1;
    ngx_free_connection(c);

    ac->c = NULL;
}


/* the connection failed: close it and tell its query, if any */

static void
ngx_aq_conn_error(ngx_aq_conn_t *ac, ngx_uint_t outcome)
{
    ngx_uint_t       connecting, i, n;
    ngx_aq_pool_t   *pool;
    ngx_aq_query_t  *qs[NGX_AQ_BATCH_MAX];

    pool = ac->pool;
    connecting = (ac->state == ngx_aq_conn_connecting
                  || ac->state == ngx_aq_conn_preparing);

    if (ac->nbatch) {
        n = ac->nbatch;
        ngx_memcpy(qs, ac->batch, n * sizeof(ngx_aq_query_t *));
        ac->nbatch = 0;

    } else {
        n = 1;
        qs[0] = ac->query;
    }

    ac->query = NULL;

    ngx_aq_conn_close(ac);

    for (i = 0; i < n; i++) {
        if (qs[i]) {
            ngx_aq_query_finish(qs[i], NULL, outcome);
        }
    }

    ngx_aq_pool_closed(pool, connecting);
}


static void
ngx_aq_conn_close(ngx_aq_conn_t *ac)
{
    ngx_aq_pool_t  *pool;

    pool = ac->pool;

    switch (ac->state) {

    case ngx_aq_conn_closed:
        return;

    case ngx_aq_conn_connecting:
    case ngx_aq_conn_preparing:
        pool->st->connecting--;
        break;

    case ngx_aq_conn_idle:
        ngx_queue_remove(&ac->queue);
        pool->st->idle--;
        break;

    default:
        break;
    }

    if (ac->result) {
        PQclear(ac->result);
        ac->result = NULL;
    }

    if (ac->c) {
        ngx_aq_conn_release_socket(ac);
    }

    PQfinish(ac->pg);
    ac->pg = NULL;

    ac->state = ngx_aq_conn_closed;
    pool->st->open--;
}


/* hands idle connections to the queries waiting for one */

static void
ngx_aq_pool_dispatch(ngx_aq_pool_t *pool)
{
    ngx_int_t        rc;
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

        rc = (n == 1) ? ngx_aq_conn_send(ac, qs[0])
                      : ngx_aq_conn_send_batch(ac, qs, n);

        if (rc == NGX_OK) {
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
 * Takes the head of the wait list and, when it is a claim, the claims for
 * the same queue waiting behind it: they go as one statement, one commit.
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

    if (first->stmt != NGX_AQ_STMT_CLAIM || first->single) {
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

        if (q->stmt != NGX_AQ_STMT_CLAIM
            || q->single
            || ngx_strcmp(q->values[1], first->values[1]) != 0
            || ngx_strcmp(q->values[2], first->values[2]) != 0)
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
        (void) ngx_aq_conn_connect(pool);
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


/* libpq's messages end in a newline and may hold hints on further lines */

static size_t
ngx_aq_pg_error_len(const char *msg)
{
    const char  *p;

    for (p = msg; *p && *p != '\n'; p++) { /* void */ }

    return p - msg;
}
