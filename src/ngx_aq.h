
/*
 * ngx_http_annotation_queue_module: types shared by its files.
 *
 * The request's path: ngx_http_annotation_queue_module.c (directives, the
 * content handlers) -> ngx_aq_request.c (key, body, query, answer: the flow
 * every endpoint shares) -> ngx_aq_key.c (the bearer key) -> the endpoint's
 * action, ngx_aq_claim.c or ngx_aq_item.c (its body, its statement, its
 * answer, its statement's rules) with ngx_aq_json.c (parsing) ->
 * ngx_aq_pool.c (the pool and its wait list) -> ngx_aq_conn.c (libpq and
 * the socket) -> ngx_aq_response.c (JSON answers and errors).
 */


#ifndef _NGX_AQ_H_INCLUDED_
#define _NGX_AQ_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <libpq-fe.h>


#define NGX_AQ_KEY_LEN            76
#define NGX_AQ_KEY_PREFIX         "aqk_"
#define NGX_AQ_KEY_PREFIX_LEN     4
#define NGX_AQ_KEY_BODY_LEN       64
#define NGX_AQ_KEY_CHECKSUM_LEN   8
#define NGX_AQ_KEY_PUBLIC_LEN     12
#define NGX_AQ_DIGEST_LEN         32
#define NGX_AQ_UUID_LEN           36


#define NGX_AQ_MAX_PARAMS         5
#define NGX_AQ_BATCH_MAX          16

/* a batch's own parameters: the claim's array of key digests, in hex */
#define NGX_AQ_BATCH_PARAMS_LEN                                               \
    (NGX_AQ_BATCH_MAX * (2 * NGX_AQ_DIGEST_LEN + 1) + 2)


/* the prepared statements, see ngx_aq_sql.h */
typedef enum {
    NGX_AQ_STMT_CLAIM = 0,
    NGX_AQ_STMT_EXTEND,
    NGX_AQ_STMT_RELEASE,
    NGX_AQ_STMT_COMPLETE,
    NGX_AQ_STMT_CLAIM_BATCH,
    NGX_AQ_STMT_SKIP,
    NGX_AQ_STMT_QUEUE_STATS,
    NGX_AQ_NSTMTS,

    /*
     * prepared too, but counted as their endpoint's (ctx->action->stmt):
     * the item's statements for a body that names the queue, in the order
     * of EXTEND, RELEASE, COMPLETE, SKIP
     */
    NGX_AQ_STMT_EXTEND_QUEUE = NGX_AQ_NSTMTS,
    NGX_AQ_STMT_RELEASE_QUEUE,
    NGX_AQ_STMT_COMPLETE_QUEUE,
    NGX_AQ_STMT_SKIP_QUEUE,

    /*
     * the claim when the lean one will not do, and the lean one of a claim
     * that may wait (ngx_aq_sql.h)
     */
    NGX_AQ_STMT_CLAIM_WIDE,
    NGX_AQ_STMT_CLAIM_WAIT,
    NGX_AQ_NPREPARED
} ngx_aq_stmt_e;


/* how PostgreSQL is told the query timeout (statement_timeout) */
#define NGX_AQ_TIMEOUT_OFF        0
#define NGX_AQ_TIMEOUT_STARTUP    1     /* options=-c statement_timeout=... */
#define NGX_AQ_TIMEOUT_LOCAL      2     /* set_config(..., true), pipelined */


/* outcomes a query handler is told of besides a PGresult */
#define NGX_AQ_QUERY_OK           0
#define NGX_AQ_QUERY_UNAVAILABLE  1
#define NGX_AQ_QUERY_SATURATED    2
#define NGX_AQ_QUERY_TIMEDOUT     3
#define NGX_AQ_QUERY_FAILED       4     /* 500; the cause is logged */


typedef struct ngx_aq_pool_s   ngx_aq_pool_t;
typedef struct ngx_aq_limit_zone_s  ngx_aq_limit_zone_t;
typedef struct ngx_aq_conn_s   ngx_aq_conn_t;
typedef struct ngx_aq_query_s  ngx_aq_query_t;

typedef void (*ngx_aq_query_handler_pt)(ngx_aq_query_t *q, PGresult *res,
    ngx_uint_t outcome);


/*
 * What the pool asks of a statement that has rules (the claim's:
 * ngx_aq_claim.c); a query without rules runs alone and only once.
 */

typedef struct {
    /* the statement that runs several queries at once */
    ngx_aq_stmt_e             batch;

    /* may q run in one statement with first */
    ngx_uint_t              (*joins)(ngx_aq_query_t *first,
                                     ngx_aq_query_t *q);

    /* the batch statement's parameters for qs, written in buf */
    void                    (*batch_params)(ngx_aq_query_t **qs, ngx_uint_t n,
                                            u_char *buf, const char **values);

    /* the batch's answer has the shape of n answers, a row each */
    ngx_uint_t              (*batch_fits)(PGresult *res, ngx_uint_t n);

    /* the query of row i runs again, alone */
    ngx_uint_t              (*batch_rerun)(PGresult *res, ngx_uint_t i);

    /* a failure that undid the statement and that running it again removes */
    ngx_uint_t              (*retryable)(PGresult *res);

    /*
     * an answer that asks for the query again, as it is or with another
     * statement (set in q), each time one step nearer its answer
     */
    ngx_uint_t              (*again)(ngx_aq_query_t *q, PGresult *res);
} ngx_aq_rules_t;


/* the outcomes answers are counted by: NGX_AQ_OUTCOME_*, NGX_AQ_NOUTCOMES */
#include "ngx_aq_outcomes.h"


/* a worker's pool, as the status page sees it: in shared memory */
typedef struct {
    ngx_atomic_t              pid;
    ngx_atomic_t              open;
    ngx_atomic_t              connecting;
    ngx_atomic_t              idle;
    ngx_atomic_t              waiting;
    ngx_atomic_t              waiters;    /* claims parked (Prefer: wait) */
    ngx_atomic_t              wakeups;    /* their claims run again */
    ngx_atomic_t              answers[NGX_AQ_NSTMTS][NGX_AQ_NOUTCOMES];
} ngx_aq_stats_t;


/* a host of the conninfo (ngx_aq_resolve.c) */
typedef struct {
    ngx_str_t                 name;       /* a name, an address, a path */
    ngx_str_t                 port;       /* its own, in a list of ports */
    ngx_uint_t                resolve;    /* a name the module resolves */
    ngx_array_t              *addrs;      /* of ngx_str_t, found at load */
} ngx_aq_host_t;


/* an entry of libpq's host lists: a host, its address, its port */
typedef struct {
    ngx_str_t                 host;
    ngx_str_t                 addr;       /* empty: libpq uses the host */
    ngx_str_t                 port;       /* empty: the conninfo's port */
} ngx_aq_entry_t;


/* one pool of PostgreSQL connections per worker and per configuration */
struct ngx_aq_pool_s {
    ngx_uint_t                index;
    ngx_str_t                 conninfo;
    ngx_uint_t                size;
    ngx_uint_t                max_waiting;
    ngx_msec_t                connect_timeout;
    ngx_msec_t                query_timeout;
    ngx_msec_t                idle_timeout;     /* 0: off */
    ngx_msec_t                max_lifetime;     /* 0: off */
    ngx_flag_t                prepare;
    ngx_uint_t                statement_timeout;
    ngx_array_t              *hosts;      /* NULL: all left to libpq */
    ngx_msec_t                host_timeout;  /* conninfo's connect_timeout */
    ngx_resolver_t           *resolver;   /* NULL: resolved at load */
    ngx_msec_t                resolver_timeout;

    /* the LISTEN connection's (ngx_aq_wait.c): the conninfo by default */
    ngx_str_t                 listen_conninfo;
    ngx_array_t              *listen_hosts;
    ngx_msec_t                listen_host_timeout;
    ngx_resolver_t           *listen_resolver;

    /* per worker, set up in init_process */
    ngx_aq_conn_t            *conns;
    ngx_queue_t               idle;
    ngx_queue_t               waiting;
    ngx_aq_stats_t           *st;         /* &local */
    ngx_aq_stats_t            local;
    ngx_aq_stats_t           *shared;     /* the status page's slot */
    ngx_log_t                *log;
    char                      options[64];
    char                      timeout[NGX_INT64_LEN + 1];
    void                     *listener;   /* ngx_aq_wait.c */
};


typedef enum {
    ngx_aq_query_new = 0,
    ngx_aq_query_waiting,
    ngx_aq_query_sent,
    ngx_aq_query_done
} ngx_aq_query_state_e;


/* a query of a request: lives in the request's pool */
struct ngx_aq_query_s {
    ngx_queue_t               queue;
    ngx_aq_pool_t            *pool;
    ngx_aq_conn_t            *conn;
    ngx_event_t               wait;
    ngx_log_t                *log;

    ngx_aq_stmt_e             stmt;
    const ngx_aq_rules_t     *rules;
    int                       row;        /* of the result, in a batch */
    const char               *values[NGX_AQ_MAX_PARAMS];
    int                       lengths[NGX_AQ_MAX_PARAMS];
    int                       formats[NGX_AQ_MAX_PARAMS];

    ngx_aq_query_handler_pt   handler;
    void                     *data;
    ngx_aq_query_state_e      state;
    unsigned                  retried:1;
    unsigned                  single:1;   /* not in a batch again */
};


/* an error answer: status, code and message of the JSON body */
typedef struct {
    ngx_uint_t                status;
    const char               *code;
    const char               *message;
    ngx_uint_t                outcome;    /* index in the status counters */
} ngx_aq_error_t;


typedef struct ngx_aq_ctx_s  ngx_aq_ctx_t;
typedef struct ngx_aq_wqueue_s  ngx_aq_wqueue_t;


/* a claim that may wait for an item (Prefer: wait=N, ngx_aq_wait.c) */
typedef struct {
    ngx_queue_t               queue;      /* in its queue's FIFO, parked */
    ngx_aq_wqueue_t          *wq;
    ngx_event_t               timer;      /* its deadline */
    ngx_msec_t                deadline;
    ngx_uint_t                applied;    /* seconds; 0: it does not wait */
    ngx_uint_t                seq;        /* the queue's, when sent */
    ngx_uint_t                ticket;     /* its place, from its first park */
    unsigned                  parked:1;
    unsigned                  flagged:1;  /* woken, for its turn to run */
    unsigned                  woken:1;    /* its claim runs again */
    unsigned                  listening:1;  /* LISTEN was on when sent */
} ngx_aq_waiter_t;

/* what an endpoint adds to the shared flow */
typedef struct {
    const char               *name;
    ngx_aq_stmt_e             stmt;

    /* NULL, or the 400 the body deserves; fills ctx->query's parameters */
    const ngx_aq_error_t   *(*parse)(ngx_http_request_t *r, ngx_aq_ctx_t *ctx,
                                     u_char *body, size_t len);

    /* the answer to a result row whose key was valid */
    ngx_int_t               (*respond)(ngx_http_request_t *r,
                                       ngx_aq_ctx_t *ctx, PGresult *res);

    /* NULL, or how its statement batches and retries */
    const ngx_aq_rules_t     *rules;
} ngx_aq_action_t;


/* a request's state: lives in the request's pool */
struct ngx_aq_ctx_s {
    ngx_http_request_t       *request;
    const ngx_aq_action_t    *action;
    ngx_aq_query_t            query;

    u_char                    digest[NGX_AQ_DIGEST_LEN];
    u_char                    id[NGX_AQ_UUID_LEN + 1];
    u_char                    queue_id[NGX_AQ_UUID_LEN + 1];
    u_char                    version[NGX_INT64_LEN + 1];
    u_char                    lease[NGX_INT64_LEN + 1];
    ngx_str_t                 result;

    /* for the log variables */
    u_char                    key_prefix[NGX_AQ_KEY_PUBLIC_LEN];
    ngx_str_t                 item_id;
    const char               *outcome;
    const ngx_aq_error_t     *error;
    ngx_msec_t                sent;
    ngx_msec_t                db_time;

    ngx_aq_waiter_t           waiter;

    /* for the RateLimit headers */
    ngx_uint_t                limit_remaining;
    time_t                    limit_reset;

    unsigned                  key:1;
    unsigned                  db:1;
    unsigned                  limit:1;
    unsigned                  limit_learn:1;
    unsigned                  answered:1;
    unsigned                  replace:1;
};


/* a queue's numbers, as the status page last read them (queue_stats()) */
#define NGX_AQ_QUEUE_STATES       5       /* available ... failed */

typedef struct {
    u_char                    id[NGX_AQ_UUID_LEN + 1];
    int64_t                   slots[NGX_AQ_QUEUE_STATES];
    double                    oldest;     /* seconds; 0: none available */
} ngx_aq_queue_stats_t;


/*
 * The queues a status location shows (annotation_queue_status_queues),
 * read at most once an interval by each worker, when the page is asked
 * for (ngx_aq_status.c)
 */

typedef struct {
    ngx_array_t              *queues;     /* of ngx_aq_queue_stats_t */
    ngx_msec_t                interval;
    ngx_aq_pool_t            *pool;
    ngx_str_t                 param;      /* the uuid[] literal */

    /* per worker */
    ngx_aq_query_t            query;
    ngx_queue_t               waiting;    /* page requests, for the read */
    ngx_msec_t                started;    /* the last read's start */
    ngx_msec_t                read;       /* the last good read's start */
    time_t                    read_sec;   /* its Unix time */
    ngx_uint_t                read_msec;
    time_t                    start_sec;
    ngx_uint_t                start_msec;
    unsigned                  tried:1;
    unsigned                  has_read:1;
    unsigned                  running:1;
    unsigned                  failed:1;
} ngx_aq_status_queues_t;


typedef struct {
    ngx_array_t              *pools;      /* of ngx_aq_pool_t * */
    ngx_aq_stats_t           *stats;      /* [pool][worker] */
    ngx_uint_t                workers;
} ngx_http_annotation_queue_main_conf_t;


typedef struct {
    ngx_str_t                 database;
    ngx_uint_t                pool_size;
    ngx_uint_t                max_waiting;
    ngx_msec_t                connect_timeout;
    ngx_msec_t                query_timeout;
    ngx_msec_t                idle_timeout;
    ngx_msec_t                max_lifetime;
    ngx_flag_t                prepare;
    ngx_uint_t                statement_timeout;
    ngx_array_t              *hosts;
    ngx_msec_t                host_timeout;
    size_t                    max_body_size;
    ngx_msec_t                lease;
    ngx_msec_t                max_wait;
    ngx_flag_t                claim_wide; /* every claim the wide one */
    ngx_str_t                 listen_database;
    ngx_array_t              *listen_hosts;
    ngx_msec_t                listen_host_timeout;

    ngx_shm_zone_t           *limit_zone;
    ngx_uint_t                limit_burst;     /* in 1/1000 of a request */

    const ngx_aq_action_t    *action;
    ngx_aq_pool_t            *pool;

    /* the status page (annotation_queue_status) */
    ngx_flag_t                status;
    ngx_array_t              *status_queues;  /* of ngx_aq_queue_stats_t */
    ngx_msec_t                status_interval;
    ngx_aq_status_queues_t   *queue_stats;
} ngx_http_annotation_queue_loc_conf_t;


/* ngx_aq_key.c */
typedef enum {
    ngx_aq_key_ok = 0,
    ngx_aq_key_missing,
    ngx_aq_key_bad_scheme,
    ngx_aq_key_malformed
} ngx_aq_key_rc_e;

ngx_aq_key_rc_e ngx_aq_key_parse(ngx_str_t *authorization, u_char *digest,
    u_char *prefix);

/* ngx_aq_json.c */
const ngx_aq_error_t *ngx_aq_json_parse_claim(ngx_pool_t *pool,
    u_char *body, size_t len, u_char *queue_id);
const ngx_aq_error_t *ngx_aq_json_parse_item(ngx_pool_t *pool, u_char *body,
    size_t len, ngx_uint_t want_result, u_char *item_id, u_char *version,
    u_char *queue_id, ngx_str_t *result);
ngx_int_t ngx_aq_uuid_valid(u_char *p, size_t len);

/* ngx_aq_errors.c: ngx_aq_err_<name> of every NGX_AQ_ERRORS() entry */
#define NGX_AQ_ERROR_EXTERN(name, status, code, message, counter)            \
    extern const ngx_aq_error_t  ngx_aq_err_##name;
NGX_AQ_ERRORS(NGX_AQ_ERROR_EXTERN)
#undef NGX_AQ_ERROR_EXTERN

/* ngx_aq_response.c */
ngx_int_t ngx_aq_send_json(ngx_http_request_t *r, ngx_uint_t status,
    u_char *body, size_t len);
ngx_int_t ngx_aq_send_body(ngx_http_request_t *r, u_char *body, size_t len);
ngx_int_t ngx_aq_error_filter_init(ngx_conf_t *cf);
ngx_int_t ngx_aq_send_error(ngx_http_request_t *r,
    const ngx_aq_error_t *err);

/* ngx_aq_pool.c (with ngx_aq_conn.c, ngx_aq_conn.h) */
ngx_int_t ngx_aq_pool_init(ngx_aq_pool_t *pool, ngx_cycle_t *cycle);
void ngx_aq_pool_done(ngx_aq_pool_t *pool);
ngx_int_t ngx_aq_pool_send(ngx_aq_pool_t *pool, ngx_aq_query_t *q);
void ngx_aq_pool_cancel(ngx_aq_query_t *q);

/* ngx_aq_wait.c */
ngx_int_t ngx_aq_wait_init(ngx_aq_pool_t *pool, ngx_cycle_t *cycle);
void ngx_aq_wait_done(ngx_aq_pool_t *pool);
void ngx_aq_wait_prefer(ngx_http_request_t *r, ngx_aq_ctx_t *ctx);
void ngx_aq_wait_attach(ngx_http_request_t *r, ngx_aq_ctx_t *ctx);
ngx_int_t ngx_aq_wait_empty(ngx_http_request_t *r, ngx_aq_ctx_t *ctx,
    ngx_int_t next_lease);
ngx_int_t ngx_aq_wait_answer(ngx_http_request_t *r, ngx_aq_ctx_t *ctx,
    ngx_uint_t item);
void ngx_aq_wait_cancel(ngx_aq_ctx_t *ctx);

/* ngx_aq_resolve.c */
ngx_array_t *ngx_aq_hosts_parse(ngx_conf_t *cf, PQconninfoOption *opts,
    ngx_msec_t *host_timeout);
ngx_int_t ngx_aq_hosts_resolve_now(ngx_conf_t *cf, ngx_array_t *hosts);

/* ngx_aq_limit.c */
ngx_int_t ngx_aq_limit_check(ngx_http_request_t *r, ngx_aq_ctx_t *ctx);
void ngx_aq_limit_learn(ngx_http_request_t *r, ngx_aq_ctx_t *ctx);
char *ngx_aq_limit_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_aq_limit(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_aq_limit_check_zone(ngx_conf_t *cf, ngx_shm_zone_t *shm_zone);
ngx_int_t ngx_aq_limit_headers(ngx_http_request_t *r, ngx_aq_ctx_t *ctx);

/* ngx_aq_status.c */
ngx_int_t ngx_aq_status_add_zone(ngx_conf_t *cf);
ngx_int_t ngx_aq_status_init_module(ngx_cycle_t *cycle);
void ngx_aq_status_attach(ngx_cycle_t *cycle, ngx_aq_pool_t *pool);
void ngx_aq_status_publish(ngx_aq_pool_t *pool);
void ngx_aq_status_count(ngx_http_request_t *r, ngx_aq_ctx_t *ctx);
ngx_int_t ngx_aq_status_handler(ngx_http_request_t *r);
char *ngx_aq_status_queues(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
ngx_int_t ngx_aq_status_queues_init(ngx_conf_t *cf,
    ngx_http_annotation_queue_loc_conf_t *alcf);

/* ngx_aq_request.c */
ngx_int_t ngx_aq_request_start(ngx_http_request_t *r,
    const ngx_aq_action_t *action);
ngx_aq_ctx_t *ngx_aq_request_ctx(ngx_http_request_t *r);

/* ngx_aq_claim.c, ngx_aq_item.c */
extern const ngx_aq_action_t  ngx_aq_claim_action;
extern const ngx_aq_action_t  ngx_aq_extend_action;
extern const ngx_aq_action_t  ngx_aq_release_action;
extern const ngx_aq_action_t  ngx_aq_complete_action;
extern const ngx_aq_action_t  ngx_aq_skip_action;


extern ngx_module_t  ngx_http_annotation_queue_module;


#endif /* _NGX_AQ_H_INCLUDED_ */
