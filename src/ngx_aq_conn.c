
/*
 * One non-blocking PostgreSQL connection: libpq and its socket in nginx's
 * event loop.  The pool (ngx_aq_pool.c) decides what runs where; this file
 * only opens, sends, reads and closes, and tells the pool of each end.
 *
 * A connection's life: closed -> connecting (PQconnectStart and
 * PQconnectPoll, under the connect timer) -> preparing (PQsendPrepare of
 * every statement in one pipeline: one round trip, still under the connect
 * timer; skipped with annotation_queue_prepare off) -> idle <-> busy (the
 * statement sent, PQflush, PQconsumeInput, PQgetResult until its end, under
 * the query timer).  Nothing here ever waits: every wait is an event or a
 * timer.
 *
 * Events are registered level-triggered, so that data libpq left in the
 * kernel's buffer (PQconsumeInput reads at most what fits in its buffer)
 * always wakes the worker again; with SSL, bytes already decrypted by
 * OpenSSL are drained before waiting.
 *
 * Ownership: the pool owns the PGconn and the nginx connection; PQfinish
 * closes the socket, so nginx forgets it first.
 */


#include "ngx_aq_conn.h"
#include "ngx_aq_sql.h"
#include <openssl/ssl.h>
#include <sys/stat.h>


static ngx_int_t ngx_aq_conn_start(ngx_aq_conn_t *ac);
static void ngx_aq_conn_host_timer(ngx_aq_conn_t *ac);
static void ngx_aq_conn_host_timeout(ngx_event_t *ev);
static void ngx_aq_conn_connect_poll(ngx_aq_conn_t *ac);
static void ngx_aq_conn_prepare(ngx_aq_conn_t *ac);
static void ngx_aq_conn_read_prepared(ngx_aq_conn_t *ac);
static ngx_int_t ngx_aq_conn_send_prepares(ngx_aq_conn_t *ac);
static void ngx_aq_conn_connected(ngx_aq_conn_t *ac);
static ngx_int_t ngx_aq_conn_send_stmt(ngx_aq_conn_t *ac, ngx_aq_stmt_e n,
    const char *const *values, const int *lengths, const int *formats);
static void ngx_aq_conn_handler(ngx_event_t *ev);
static void ngx_aq_conn_process(ngx_event_t *ev);
static void ngx_aq_conn_idle_handler(ngx_aq_conn_t *ac);
static void ngx_aq_conn_read(ngx_aq_conn_t *ac);
static void ngx_aq_conn_answered(ngx_aq_conn_t *ac);
static ngx_int_t ngx_aq_conn_flush(ngx_aq_conn_t *ac);
static ngx_int_t ngx_aq_conn_watch(ngx_aq_conn_t *ac, ngx_uint_t read,
    ngx_uint_t write);
static ngx_int_t ngx_aq_conn_wrap_socket(ngx_aq_conn_t *ac);
static void ngx_aq_conn_release_socket(ngx_aq_conn_t *ac);
static void ngx_aq_conn_log_failure(ngx_aq_conn_t *ac, ngx_log_t *log);


/*
 * Starts opening ac, a closed connection of its pool.  NGX_OK: on its way,
 * the pool hears of its end (ngx_aq_pool_conn_ready() or _error());
 * NGX_DECLINED: libpq refused at once, or no host could be had (logged);
 * NGX_ERROR: nginx could not watch it.  Neither of the last two counts the
 * connection as open.
 */

ngx_int_t
ngx_aq_conn_connect(ngx_aq_conn_t *ac)
{
    ngx_int_t       rc;
    ngx_aq_pool_t  *pool;

    pool = ac->pool;

    ac->born = ngx_current_msec;
    ac->used = 0;
    ac->prepared = 0;
    ac->host = NULL;
    ac->hostaddr = NULL;
    ac->port = NULL;

    if (pool->hosts) {
        rc = ngx_aq_resolve_start(ac);

        if (rc == NGX_ERROR) {
            ngx_aq_resolve_cancel(ac);
            return NGX_DECLINED;
        }

        if (rc == NGX_AGAIN) {
            ac->state = ngx_aq_conn_resolving;
            pool->st->open++;
            pool->st->connecting++;

            ngx_log_debug0(NGX_LOG_DEBUG_HTTP, pool->log, 0,
                           "annotation queue: resolving the hosts");
            return NGX_OK;
        }
    }

    rc = ngx_aq_conn_start(ac);

    if (rc != NGX_OK) {
        ngx_aq_conn_close(ac);
    }

    return rc;
}


/* the resolver found the hosts' addresses (NGX_OK) or did not */

void
ngx_aq_conn_resolved(ngx_aq_conn_t *ac, ngx_int_t rc)
{
    ngx_aq_pool_t  *pool;

    pool = ac->pool;

    if (rc == NGX_OK) {
        rc = ngx_aq_conn_start(ac);
    }

    if (rc != NGX_OK) {
        ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
    }

    ngx_aq_status_publish(pool);
}


/*
 * libpq starts connecting.  On an error, ac is left counted as open and
 * connecting, for the caller to close.
 */

static ngx_int_t
ngx_aq_conn_start(ngx_aq_conn_t *ac)
{
    PGconn         *pg;
    ngx_uint_t      n;
    ngx_msec_t      spent;
    ngx_aq_pool_t  *pool;
    const char     *keywords[12], *values[12];

    pool = ac->pool;

    if (ac->state == ngx_aq_conn_closed) {
        pool->st->open++;
        pool->st->connecting++;
    }

    ac->state = ngx_aq_conn_connecting;

    /*
     * Defaults the conninfo may override: it comes after them.  GSSAPI
     * encryption is not tried unless asked for: libpq's "prefer" may block
     * in the Kerberos library before the connection starts.  TCP
     * keepalives find a peer gone without a word (a host down, a
     * connection a firewall forgot) in about a minute rather than the
     * kernel's two hours.  The host lists of ngx_aq_resolve.c come last:
     * they replace the conninfo's.
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
    keywords[n] = "keepalives_idle";
    values[n++] = "30";
    keywords[n] = "keepalives_interval";
    values[n++] = "10";
    keywords[n] = "keepalives_count";
    values[n++] = "3";
    keywords[n] = "dbname";
    values[n++] = (const char *) pool->conninfo.data;

    if (ac->host) {
        keywords[n] = "host";
        values[n++] = ac->host;
        keywords[n] = "hostaddr";
        values[n++] = ac->hostaddr;

        if (ac->port) {
            keywords[n] = "port";
            values[n++] = ac->port;
        }
    }

    keywords[n] = NULL;
    values[n] = NULL;

    pg = PQconnectStartParams(keywords, values, 1);

    if (pg == NULL) {
        ngx_log_error(NGX_LOG_ALERT, pool->log, 0,
                      "annotation queue: PQconnectStartParams() failed");
        return NGX_ERROR;
    }

    ac->pg = pg;

    if (PQstatus(pg) == CONNECTION_BAD) {
        ngx_aq_conn_log_failure(ac, pool->log);
        return NGX_DECLINED;
    }

    if (ngx_aq_conn_wrap_socket(ac) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, pool->log, 0,
                   "annotation queue: connecting on fd:%d", ac->c->fd);

    /* after PQconnectStart, wait as if PQconnectPoll asked for writing */

    ac->want_read = 0;
    ac->want_write = 1;

    if (ngx_aq_conn_watch(ac, 0, 1) != NGX_OK) {
        return NGX_ERROR;
    }

    /* resolving the hosts came out of the same connect timeout */

    spent = ngx_current_msec - ac->born;

    ngx_add_timer(ac->c->read, pool->connect_timeout > spent
                               ? pool->connect_timeout - spent : 1);

    ngx_aq_conn_host_timer(ac);

    return NGX_OK;
}


/*
 * The conninfo's connect_timeout, host by host, as libpq applies it when it
 * connects blocking: while a list's host has not answered in that time,
 * the attempt goes on with the hosts after it (a host that drops packets
 * would otherwise hold every connect until the connect timeout).  Armed
 * when the attempt starts and whenever libpq moves to another socket.
 */

static void
ngx_aq_conn_host_timer(ngx_aq_conn_t *ac)
{
    if (ac->pool->host_timeout == 0
        || ac->entries == NULL
        || ac->from + 1 >= ac->entries->nelts)
    {
        return;
    }

    ac->host_timer.handler = ngx_aq_conn_host_timeout;
    ac->host_timer.data = ac;
    ac->host_timer.log = ac->pool->log;

    ngx_add_timer(&ac->host_timer, ac->pool->host_timeout);
}


static void
ngx_aq_conn_host_timeout(ngx_event_t *ev)
{
    ngx_uint_t       i;
    ngx_aq_conn_t   *ac;
    ngx_aq_pool_t   *pool;
    ngx_aq_entry_t  *e;

    ac = ev->data;
    pool = ac->pool;

    if (ac->state != ngx_aq_conn_connecting) {
        return;
    }

    i = ngx_aq_hosts_current(ac);
    e = ac->entries->elts;

    ngx_log_error(NGX_LOG_WARN, pool->log, 0,
                  "annotation queue: host \"%V\"%s%V%s port \"%s\" did not "
                  "answer within connect_timeout (%M ms)%s",
                  &e[i].host, e[i].addr.len ? " (" : "", &e[i].addr,
                  e[i].addr.len ? ")" : "", PQport(ac->pg),
                  pool->host_timeout,
                  i + 1 < ac->entries->nelts ? ", trying the next host" : "");

    if (i + 1 >= ac->entries->nelts) {
        ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
        ngx_aq_status_publish(pool);
        return;
    }

    /* libpq cannot be told to skip a host: a new attempt, on the rest */

    if (ac->c) {
        ngx_aq_conn_release_socket(ac);
    }

    PQfinish(ac->pg);
    ac->pg = NULL;

    if (ngx_aq_hosts_lists(ac, i + 1) != NGX_OK
        || ngx_aq_conn_start(ac) != NGX_OK)
    {
        ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
    }

    ngx_aq_status_publish(pool);
}


static void
ngx_aq_conn_connect_poll(ngx_aq_conn_t *ac)
{
    ino_t                      ino;
    ngx_socket_t               fd;
    PostgresPollingStatusType  status;

    status = PQconnectPoll(ac->pg);

    if (status == PGRES_POLLING_FAILED) {
        ngx_aq_conn_log_failure(ac, ac->c->log);
        ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
        return;
    }

    /* libpq may have moved to another socket (host lists, SSL fallback) */

    fd = ac->c->fd;
    ino = ac->ino;

    if (ngx_aq_conn_wrap_socket(ac) != NGX_OK) {
        ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
        return;
    }

    if (ac->host_timer.timer_set && (ac->c->fd != fd || ac->ino != ino)) {
        ngx_del_timer(&ac->host_timer);
        ngx_aq_conn_host_timer(ac);
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

        if (ac->host_timer.timer_set) {
            ngx_del_timer(&ac->host_timer);
        }

        if (PQsetnonblocking(ac->pg, 1) != 0) {
            ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
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
        ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
    }
}


/*
 * Prepares every statement, in two round trips of libpq's pipeline mode:
 * first a DEALLOCATE ALL and a Sync (a pooler in session mode without a
 * reset query hands a server session that may hold the statements of a
 * connection before), then, once its answer is in, the Parse messages of
 * all of them and a Sync; ngx_aq_conn_read_prepared() reads both.  The
 * DEALLOCATE ALL must be answered before the Parse messages go: PgBouncer
 * 1.21 and later, tracking prepared statements in transaction mode
 * (max_prepared_statements), forget every statement of the client when
 * they see its answer, Parse messages they already took included.
 */

static void
ngx_aq_conn_prepare(ngx_aq_conn_t *ac)
{
    ac->state = ngx_aq_conn_preparing;
    ac->prepared = 0;

    if (!PQenterPipelineMode(ac->pg)) {
        goto failed;
    }

    if (!PQsendQueryParams(ac->pg, "DEALLOCATE ALL", 0, NULL, NULL, NULL,
                           NULL, 0))
    {
        goto failed;
    }

    if (!PQpipelineSync(ac->pg)) {
        goto failed;
    }

    if (ngx_aq_conn_flush(ac) != NGX_OK) {
        ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
    }

    return;

failed:

    ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                  "annotation queue: preparing statements failed: %*s",
                  ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                  PQerrorMessage(ac->pg));
    ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
}


static ngx_int_t
ngx_aq_conn_send_prepares(ngx_aq_conn_t *ac)
{
    ngx_uint_t            i;
    const ngx_aq_stmt_t  *stmt;

    for (i = 0; i < NGX_AQ_NPREPARED; i++) {
        stmt = &ngx_aq_stmts[i];

        if (!PQsendPrepare(ac->pg, stmt->name, stmt->sql, stmt->nparams,
                           stmt->types))
        {
            return NGX_ERROR;
        }
    }

    if (!PQpipelineSync(ac->pg)) {
        return NGX_ERROR;
    }

    return ngx_aq_conn_flush(ac);
}


/*
 * The answers to the pipeline of ngx_aq_conn_prepare(), in order: the
 * DEALLOCATE's result and a NULL, its Sync's PGRES_PIPELINE_SYNC (then the
 * Parse messages go), for each statement a result and a NULL, then the
 * second Sync's PGRES_PIPELINE_SYNC.  A statement that fails makes the rest
 * PGRES_PIPELINE_ABORTED: the first error is logged and the connection
 * closed.  ac->prepared counts the results, the DEALLOCATE's first.
 */

#define ngx_aq_conn_preparing_name(ac)                                        \
    ((ac)->prepared == 0 ? "DEALLOCATE ALL"                                   \
     : ngx_aq_stmts[ngx_min((ac)->prepared - 1, NGX_AQ_NPREPARED - 1)].name)


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

            if (++nulls > NGX_AQ_NPREPARED + 1) {
                break;
            }

            continue;
        }

        status = PQresultStatus(res);

        if (status == PGRES_FATAL_ERROR) {
            ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                          "annotation queue: preparing \"%s\" failed: %*s",
                          ngx_aq_conn_preparing_name(ac),
                          ngx_aq_pg_error_len(PQresultErrorMessage(res)),
                          PQresultErrorMessage(res));
            PQclear(res);
            ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
            return;
        }

        PQclear(res);

        if (status == PGRES_COMMAND_OK
            && ac->prepared < NGX_AQ_NPREPARED + 1)
        {
            ac->prepared++;
            continue;
        }

        if (status == PGRES_PIPELINE_SYNC && ac->prepared == 1) {
            if (ngx_aq_conn_send_prepares(ac) != NGX_OK) {
                ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                              "annotation queue: preparing statements "
                              "failed: %*s",
                              ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                              PQerrorMessage(ac->pg));
                ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
                return;
            }

            nulls = 0;
            continue;
        }

        if (status == PGRES_PIPELINE_SYNC
            && ac->prepared == NGX_AQ_NPREPARED + 1
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
                  ngx_aq_conn_preparing_name(ac),
                  ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                  PQerrorMessage(ac->pg));

    ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
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

    ngx_aq_pool_conn_ready(ac);
}


/*
 * Sends statement stmt on ac, an idle connection the pool took out of its
 * idle list, and starts the query timer.  NGX_OK: the pool hears of the
 * answer (ngx_aq_pool_conn_done() or _error());
 * NGX_DECLINED: nothing reached PostgreSQL in full, the connection is
 * closed, and the statement may go elsewhere.
 */

ngx_int_t
ngx_aq_conn_send(ngx_aq_conn_t *ac, ngx_aq_stmt_e stmt,
    const char *const *values, const int *lengths, const int *formats)
{
    ac->state = ngx_aq_conn_busy;
    ac->c->idle = 0;

    /*
     * The Sync message ends what libpq sends: if a flush fails, PostgreSQL
     * has not received it, and the implicit transaction cannot commit.
     */

    if (ngx_aq_conn_send_stmt(ac, stmt, values, lengths, formats) != NGX_OK
        || ngx_aq_conn_flush(ac) != NGX_OK)
    {
        ngx_log_error(NGX_LOG_WARN, ac->c->log, 0,
                      "annotation queue: sending \"%s\" failed, "
                      "closing the connection: %*s", ngx_aq_stmts[stmt].name,
                      ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                      PQerrorMessage(ac->pg));
        ngx_aq_conn_close(ac);
        return NGX_DECLINED;
    }

    ngx_add_timer(ac->c->read, ac->pool->query_timeout);
    ac->used = 1;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ac->c->log, 0,
                   "annotation queue: \"%s\" sent on fd:%d",
                   ngx_aq_stmts[stmt].name, ac->c->fd);

    return NGX_OK;
}


/*
 * Sends a statement without parameters as a simple query (the LISTEN of
 * ngx_aq_wait.c), as ngx_aq_conn_send() does a prepared one.
 */

ngx_int_t
ngx_aq_conn_send_sql(ngx_aq_conn_t *ac, const char *sql)
{
    ac->state = ngx_aq_conn_busy;
    ac->c->idle = 0;
    ac->pipeline = 0;
    ac->skip = 0;
    ac->nulls = 0;

    if (!PQsendQuery(ac->pg, sql) || ngx_aq_conn_flush(ac) != NGX_OK) {
        ngx_log_error(NGX_LOG_WARN, ac->c->log, 0,
                      "annotation queue: sending \"%s\" failed, "
                      "closing the connection: %*s", sql,
                      ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                      PQerrorMessage(ac->pg));
        ngx_aq_conn_close(ac);
        return NGX_DECLINED;
    }

    /* LISTEN's answer: as a statement's */

    ngx_add_timer(ac->c->read, ac->pool->query_timeout + 0);

    return NGX_OK;
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
        ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
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
            ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_TIMEDOUT);
            return;
        }

        if (ev->write) {
            if (ngx_aq_conn_flush(ac) != NGX_OK) {
                ngx_log_error(NGX_LOG_ERR, c->log, 0,
                              "annotation queue: sending to PostgreSQL "
                              "failed: %*s",
                              ngx_aq_pg_error_len(PQerrorMessage(ac->pg)),
                              PQerrorMessage(ac->pg));
                ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
            }

            return;
        }

        ngx_aq_conn_read(ac);
        return;

    case ngx_aq_conn_idle:
        if (c->read->timedout) {
            ngx_log_error(NGX_LOG_INFO, c->log, 0,
                          "annotation queue: closing a connection idle for "
                          "%M ms, open for %M ms",
                          ngx_current_msec - ac->idle_since,
                          ngx_current_msec - ac->born);
            ngx_aq_conn_close(ac);
            return;
        }

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

    if (ac->listen) {
        /* the LISTEN connection: its notifications (ngx_aq_wait.c) */
        ngx_aq_wait_listener_read(ac);
        return;
    }

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
            ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
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
                ngx_aq_conn_answered(ac);
                return;
            }

            /* a statement's end: two, an error at most one more */

            if (++ac->nulls > 3) {
                ngx_log_error(NGX_LOG_ERR, ac->c->log, 0,
                              "annotation queue: PostgreSQL's answer "
                              "lacks the end of its pipeline");
                ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
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
                    ngx_aq_pool_conn_error(ac, NGX_AQ_QUERY_UNAVAILABLE);
                    return;
                }

                ac->pipeline = 0;
                ngx_aq_conn_answered(ac);
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


/* every result is read: the pool has the answer */

static void
ngx_aq_conn_answered(ngx_aq_conn_t *ac)
{
    PGresult  *res;

    res = ac->result;
    ac->result = NULL;

    if (ac->c->read->timer_set) {
        ngx_del_timer(ac->c->read);
    }

    ngx_aq_pool_conn_done(ac, res);
}


/*
 * The pool keeps ac for the next statement: it waits in the idle list,
 * read events on (ngx_aq_conn_idle_handler()), until a statement takes it
 * or its timer closes it: at annotation_queue_idle_timeout, or at the end
 * of its annotation_queue_max_lifetime, whichever comes first.  A
 * connection past its lifetime is closed here, between two statements,
 * never in the middle of one.  NGX_DECLINED, NGX_ERROR: closed instead.
 */

ngx_int_t
ngx_aq_conn_park(ngx_aq_conn_t *ac)
{
    ngx_msec_t      timer, age, left;
    ngx_aq_pool_t  *pool;

    pool = ac->pool;
    age = ngx_current_msec - ac->born;

    /* a new connection serves once, however short its lifetime */

    if (pool->max_lifetime && age >= pool->max_lifetime && ac->used) {
        ngx_log_error(NGX_LOG_INFO, ac->c->log, 0,
                      "annotation queue: closing a connection open for "
                      "%M ms, past annotation_queue_max_lifetime", age);
        ac->state = ngx_aq_conn_busy;
        ngx_aq_conn_close(ac);
        return NGX_DECLINED;
    }

    ac->state = ngx_aq_conn_idle;
    ac->c->idle = 1;
    ac->idle_since = ngx_current_msec;

    ngx_queue_insert_head(&pool->idle, &ac->queue);
    pool->st->idle++;

    if (ngx_aq_conn_watch(ac, 1, 0) != NGX_OK) {
        ngx_aq_conn_close(ac);
        return NGX_ERROR;
    }

    timer = pool->idle_timeout;

    if (pool->max_lifetime) {
        left = (age < pool->max_lifetime) ? pool->max_lifetime - age : 1;

        if (timer == 0 || left < timer) {
            timer = left;
        }
    }

    if (timer) {
        ngx_add_timer(ac->c->read, timer);
    }

    return NGX_OK;
}


/* the exchange ended outside a transaction: the session can be reused */

ngx_uint_t
ngx_aq_conn_clean(ngx_aq_conn_t *ac)
{
    return PQtransactionStatus(ac->pg) == PQTRANS_IDLE;
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


/*
 * Closes ac in whatever state it is, out of the idle list if it was there;
 * whoever waited for it is the caller's to tell.
 */

void
ngx_aq_conn_close(ngx_aq_conn_t *ac)
{
    ngx_aq_pool_t  *pool;

    pool = ac->pool;

    switch (ac->state) {

    case ngx_aq_conn_closed:
        return;

    case ngx_aq_conn_resolving:
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

    ngx_aq_resolve_cancel(ac);

    if (ac->host_timer.timer_set) {
        ngx_del_timer(&ac->host_timer);
    }

    ac->entries = NULL;

    if (ac->result) {
        PQclear(ac->result);
        ac->result = NULL;
    }

    if (ac->c) {
        ngx_aq_conn_release_socket(ac);
    }

    if (ac->pg) {
        PQfinish(ac->pg);
        ac->pg = NULL;
    }

    ac->state = ngx_aq_conn_closed;
    pool->st->open--;
}


/*
 * Why connecting failed: libpq says it in a line per host it tried, each
 * maybe followed by hint lines (indented with a tab); the log gets the
 * hosts' lines, one after the other.
 */

static void
ngx_aq_conn_log_failure(ngx_aq_conn_t *ac, ngx_log_t *log)
{
    u_char       buf[NGX_MAX_ERROR_STR], *p, *last;
    const char  *msg, *eol;

    msg = PQerrorMessage(ac->pg);
    p = buf;
    last = buf + sizeof(buf);

    while (*msg) {
        for (eol = msg; *eol && *eol != '\n'; eol++) { /* void */ }

        if (*msg != '\t' && eol > msg) {
            if (p != buf) {
                p = ngx_slprintf(p, last, "; ");
            }

            p = ngx_slprintf(p, last, "%*s", (size_t) (eol - msg), msg);
        }

        msg = *eol ? eol + 1 : eol;
    }

    ngx_log_error(NGX_LOG_ERR, log, 0,
                  "annotation queue: could not connect to PostgreSQL: %*s",
                  (size_t) (p - buf), buf);
}


/* libpq's messages end in a newline and may hold hints on further lines */

size_t
ngx_aq_pg_error_len(const char *msg)
{
    const char  *p;

    for (p = msg; *p && *p != '\n'; p++) { /* void */ }

    return p - msg;
}
