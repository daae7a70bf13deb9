
/*
 * One PostgreSQL connection of a pool: what ngx_aq_conn.c (libpq and the
 * socket) and ngx_aq_pool.c (the pool, its wait list) share.
 *
 * ngx_aq_conn.c opens a connection, sends a statement on it and reads the
 * answer, and tells the pool of each end through the ngx_aq_pool_conn_*()
 * calls below; it knows no statement but by its number, and no request.
 */


#ifndef _NGX_AQ_CONN_H_INCLUDED_
#define _NGX_AQ_CONN_H_INCLUDED_


#include "ngx_aq.h"


typedef enum {
    ngx_aq_conn_closed = 0,
    ngx_aq_conn_resolving,
    ngx_aq_conn_connecting,
    ngx_aq_conn_preparing,
    ngx_aq_conn_idle,
    ngx_aq_conn_busy
} ngx_aq_conn_state_e;


struct ngx_aq_conn_s {
    ngx_queue_t               queue;     /* in pool->idle */
    ngx_aq_pool_t            *pool;
    PGconn                   *pg;
    ngx_connection_t         *c;
    ino_t                     ino;
    ngx_msec_t                born;      /* when it was opened */
    ngx_msec_t                idle_since;
    PGresult                 *result;
    ngx_aq_conn_state_e       state;
    ngx_uint_t                prepared;
    ngx_uint_t                nulls;     /* ends of statements, pipelined */

    /* ngx_aq_resolve.c: this connect's host lists for libpq */
    ngx_pool_t               *tmp;
    ngx_array_t             **found;     /* the addresses of each host */
    ngx_array_t              *entries;   /* of ngx_aq_entry_t */
    ngx_uint_t                from;      /* the first entry libpq has */
    ngx_event_t               host_timer;
    ngx_uint_t                next_host;
    ngx_resolver_ctx_t       *resolving;
    ngx_event_t               resolved;
    ngx_int_t                 resolve_rc;
    char                     *host;
    char                     *hostaddr;
    char                     *port;

    /* the pool's: the queries the statement sent answers, by row */
    ngx_aq_query_t           *queries[NGX_AQ_BATCH_MAX];
    ngx_uint_t                nqueries;
    u_char                   *params;    /* NGX_AQ_BATCH_PARAMS_LEN */

    unsigned                  batch:1;   /* several queries, one statement */
    unsigned                  used:1;    /* has run a statement */
    unsigned                  pipeline:1;
    unsigned                  skip:1;    /* set_config()'s row comes first */
    unsigned                  want_read:1;
    unsigned                  want_write:1;
    unsigned                  listen:1;  /* ngx_aq_wait.c's LISTEN */
};


/* ngx_aq_conn.c */
ngx_int_t ngx_aq_conn_connect(ngx_aq_conn_t *ac);
void ngx_aq_conn_resolved(ngx_aq_conn_t *ac, ngx_int_t rc);
ngx_int_t ngx_aq_conn_send(ngx_aq_conn_t *ac, ngx_aq_stmt_e stmt,
    const char *const *values, const int *lengths, const int *formats);
ngx_int_t ngx_aq_conn_send_sql(ngx_aq_conn_t *ac, const char *sql);
ngx_int_t ngx_aq_conn_park(ngx_aq_conn_t *ac);
ngx_uint_t ngx_aq_conn_clean(ngx_aq_conn_t *ac);
void ngx_aq_conn_close(ngx_aq_conn_t *ac);
size_t ngx_aq_pg_error_len(const char *msg);

/* ngx_aq_resolve.c */
ngx_int_t ngx_aq_resolve_start(ngx_aq_conn_t *ac);
void ngx_aq_resolve_cancel(ngx_aq_conn_t *ac);
ngx_int_t ngx_aq_hosts_lists(ngx_aq_conn_t *ac, ngx_uint_t from);
ngx_uint_t ngx_aq_hosts_current(ngx_aq_conn_t *ac);

/* ngx_aq_pool.c: what a connection tells its pool */
void ngx_aq_pool_conn_ready(ngx_aq_conn_t *ac);
void ngx_aq_pool_conn_done(ngx_aq_conn_t *ac, PGresult *res);
void ngx_aq_pool_conn_error(ngx_aq_conn_t *ac, ngx_uint_t outcome);

/* ngx_aq_wait.c: what the LISTEN connection tells its listener */
void ngx_aq_wait_listener_ready(ngx_aq_conn_t *ac);
void ngx_aq_wait_listener_done(ngx_aq_conn_t *ac, PGresult *res);
void ngx_aq_wait_listener_error(ngx_aq_conn_t *ac);
void ngx_aq_wait_listener_read(ngx_aq_conn_t *ac);


#endif /* _NGX_AQ_CONN_H_INCLUDED_ */
