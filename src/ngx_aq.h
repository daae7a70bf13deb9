
/*
 * ngx_http_annotation_queue_module: types shared by its files.
 *
 * The request's path: ngx_http_annotation_queue_module.c (directives and the
 * content handler) -> ngx_aq_key.c (the bearer key) -> ngx_aq_claim.c (body,
 * query, answer) -> ngx_aq_json.c (the body) -> ngx_aq_pool.c (PostgreSQL)
 * -> ngx_aq_response.c (the JSON answer).
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


/* outcomes a query handler is told of besides a PGresult */
#define NGX_AQ_QUERY_OK           0
#define NGX_AQ_QUERY_UNAVAILABLE  1
#define NGX_AQ_QUERY_SATURATED    2
#define NGX_AQ_QUERY_TIMEDOUT     3


typedef struct ngx_aq_pool_s   ngx_aq_pool_t;
typedef struct ngx_aq_conn_s   ngx_aq_conn_t;
typedef struct ngx_aq_query_s  ngx_aq_query_t;

typedef void (*ngx_aq_query_handler_pt)(ngx_aq_query_t *q, PGresult *res,
    ngx_uint_t outcome);


/* one pool of PostgreSQL connections per worker and per configuration */
struct ngx_aq_pool_s {
    ngx_str_t                 conninfo;
    ngx_uint_t                size;
    ngx_uint_t                max_waiting;
    ngx_msec_t                connect_timeout;
    ngx_msec_t                query_timeout;

    /* per worker, set up in init_process */
    ngx_aq_conn_t            *conns;
    ngx_queue_t               idle;
    ngx_queue_t               waiting;
    ngx_uint_t                nwaiting;
    ngx_uint_t                nconnecting;
    ngx_uint_t                nopen;
    ngx_log_t                *log;
    char                      options[64];
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

    const char               *values[3];
    int                       lengths[3];
    int                       formats[3];

    ngx_aq_query_handler_pt   handler;
    void                     *data;
    ngx_aq_query_state_e      state;
    unsigned                  retried:1;
};


typedef struct {
    ngx_array_t              *pools;      /* of ngx_aq_pool_t * */
} ngx_http_annotation_queue_main_conf_t;


typedef struct {
    ngx_str_t                 database;
    ngx_uint_t                pool_size;
    ngx_uint_t                max_waiting;
    ngx_msec_t                connect_timeout;
    ngx_msec_t                query_timeout;
    size_t                    max_body_size;
    ngx_msec_t                lease;

    ngx_flag_t                claim;
    ngx_aq_pool_t            *pool;
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
typedef enum {
    ngx_aq_json_ok = 0,
    ngx_aq_json_invalid,
    ngx_aq_json_not_object,
    ngx_aq_json_missing_queue_id,
    ngx_aq_json_bad_queue_id
} ngx_aq_json_rc_e;

ngx_aq_json_rc_e ngx_aq_json_parse_claim(u_char *body, size_t len,
    u_char *queue_id);
ngx_int_t ngx_aq_uuid_valid(u_char *p, size_t len);

/* ngx_aq_response.c */
ngx_int_t ngx_aq_send_json(ngx_http_request_t *r, ngx_uint_t status,
    u_char *body, size_t len);
ngx_int_t ngx_aq_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message);

/* ngx_aq_pool.c */
ngx_int_t ngx_aq_pool_init(ngx_aq_pool_t *pool, ngx_cycle_t *cycle);
void ngx_aq_pool_done(ngx_aq_pool_t *pool);
ngx_int_t ngx_aq_pool_send(ngx_aq_pool_t *pool, ngx_aq_query_t *q);
void ngx_aq_pool_cancel(ngx_aq_query_t *q);

/* ngx_aq_claim.c */
ngx_int_t ngx_aq_claim_start(ngx_http_request_t *r);


extern ngx_module_t  ngx_http_annotation_queue_module;


#endif /* _NGX_AQ_H_INCLUDED_ */
