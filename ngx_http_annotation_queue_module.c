
/*
 * ngx_http_annotation_queue_module
 *
 * Serves an annotation queue from PostgreSQL: POST /api/v1/annotations/queue
 * authenticates a bearer key and atomically claims the next item of a
 * queue; extend, release and complete act on a claimed item.  Each request
 * is one prepared statement on a per-worker pool of non-blocking
 * connections.
 *
 * This file: directives, configuration, the module definition, the worker's
 * pools, the log variables and the content handler's entry.
 */


#include "src/ngx_aq.h"


static ngx_int_t ngx_http_annotation_queue_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_annotation_queue_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_annotation_queue_add_variables(ngx_conf_t *cf);
static ngx_int_t ngx_http_annotation_queue_init_process(ngx_cycle_t *cycle);
static void ngx_http_annotation_queue_exit_process(ngx_cycle_t *cycle);
static void *ngx_http_annotation_queue_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_annotation_queue_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_annotation_queue_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static char *ngx_http_annotation_queue_merge_status(ngx_conf_t *cf,
    ngx_http_annotation_queue_loc_conf_t *conf);
static ngx_aq_pool_t *ngx_http_annotation_queue_pool(ngx_conf_t *cf,
    ngx_http_annotation_queue_loc_conf_t *alcf);
static char *ngx_http_annotation_queue_database(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_annotation_queue_listen_database(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_annotation_queue_conninfo(ngx_conf_t *cf,
    ngx_str_t *value, ngx_str_t *conninfo, ngx_array_t **hosts,
    ngx_msec_t *host_timeout);
static char *ngx_http_annotation_queue_check_positive(ngx_conf_t *cf,
    void *post, void *data);
static char *ngx_http_annotation_queue_action(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_annotation_queue_status(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_annotation_queue_postconfiguration(ngx_conf_t *cf);


static ngx_conf_num_bounds_t  ngx_http_annotation_queue_pool_size_bounds = {
    ngx_conf_check_num_bounds, 1, 1024
};

static ngx_conf_post_t  ngx_http_annotation_queue_positive_msec = {
    ngx_http_annotation_queue_check_positive
};


static ngx_conf_enum_t  ngx_http_annotation_queue_statement_timeouts[] = {
    { ngx_string("startup"), NGX_AQ_TIMEOUT_STARTUP },
    { ngx_string("local"), NGX_AQ_TIMEOUT_LOCAL },
    { ngx_string("off"), NGX_AQ_TIMEOUT_OFF },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_annotation_queue_commands[] = {

    { ngx_string("annotation_queue_database"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_annotation_queue_database,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("annotation_queue_listen_database"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_annotation_queue_listen_database,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("annotation_queue_max_wait"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, max_wait),
      NULL },

    { ngx_string("annotation_queue_claim_wide"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, claim_wide),
      NULL },

    { ngx_string("annotation_queue_claim"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_annotation_queue_action,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      (void *) &ngx_aq_claim_action },

    { ngx_string("annotation_queue_extend"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_annotation_queue_action,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      (void *) &ngx_aq_extend_action },

    { ngx_string("annotation_queue_release"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_annotation_queue_action,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      (void *) &ngx_aq_release_action },

    { ngx_string("annotation_queue_complete"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_annotation_queue_action,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      (void *) &ngx_aq_complete_action },

    { ngx_string("annotation_queue_skip"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_annotation_queue_action,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      (void *) &ngx_aq_skip_action },

    { ngx_string("annotation_queue_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_annotation_queue_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("annotation_queue_status_queues"),
      NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_aq_status_queues,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("annotation_queue_status_interval"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, status_interval),
      &ngx_http_annotation_queue_positive_msec },

    { ngx_string("annotation_queue_pool_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, pool_size),
      &ngx_http_annotation_queue_pool_size_bounds },

    { ngx_string("annotation_queue_max_waiting"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, max_waiting),
      NULL },

    { ngx_string("annotation_queue_connect_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, connect_timeout),
      &ngx_http_annotation_queue_positive_msec },

    { ngx_string("annotation_queue_query_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, query_timeout),
      &ngx_http_annotation_queue_positive_msec },

    { ngx_string("annotation_queue_idle_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, idle_timeout),
      NULL },

    { ngx_string("annotation_queue_max_lifetime"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, max_lifetime),
      NULL },

    { ngx_string("annotation_queue_prepare"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, prepare),
      NULL },

    { ngx_string("annotation_queue_statement_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, statement_timeout),
      &ngx_http_annotation_queue_statement_timeouts },

    { ngx_string("annotation_queue_max_body_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, max_body_size),
      NULL },

    { ngx_string("annotation_queue_limit_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE2,
      ngx_aq_limit_zone,
      0,
      0,
      NULL },

    { ngx_string("annotation_queue_limit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE12,
      ngx_aq_limit,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("annotation_queue_lease"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_annotation_queue_loc_conf_t, lease),
      &ngx_http_annotation_queue_positive_msec },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_annotation_queue_module_ctx = {
    ngx_http_annotation_queue_add_variables, /* preconfiguration */
    ngx_http_annotation_queue_postconfiguration, /* postconfiguration */

    ngx_http_annotation_queue_create_main_conf, /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_annotation_queue_create_loc_conf, /* create location conf */
    ngx_http_annotation_queue_merge_loc_conf   /* merge location conf */
};


ngx_module_t  ngx_http_annotation_queue_module = {
    NGX_MODULE_V1,
    &ngx_http_annotation_queue_module_ctx, /* module context */
    ngx_http_annotation_queue_commands,    /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_aq_status_init_module,             /* init module */
    ngx_http_annotation_queue_init_process, /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_annotation_queue_exit_process, /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


#define NGX_AQ_VAR_KEY      0
#define NGX_AQ_VAR_ITEM     1
#define NGX_AQ_VAR_OUTCOME  2
#define NGX_AQ_VAR_DB_TIME  3


static ngx_http_variable_t  ngx_http_annotation_queue_vars[] = {

    { ngx_string("annotation_queue_key"), NULL,
      ngx_http_annotation_queue_variable, NGX_AQ_VAR_KEY,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("annotation_queue_item"), NULL,
      ngx_http_annotation_queue_variable, NGX_AQ_VAR_ITEM,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("annotation_queue_outcome"), NULL,
      ngx_http_annotation_queue_variable, NGX_AQ_VAR_OUTCOME,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("annotation_queue_db_time"), NULL,
      ngx_http_annotation_queue_variable, NGX_AQ_VAR_DB_TIME,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_int_t
ngx_http_annotation_queue_handler(ngx_http_request_t *r)
{
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    return ngx_aq_request_start(r, alcf->action);
}


/*
 * $annotation_queue_key      the key's public prefix ("aqk_" + 8 digits),
 *                            once the key is well formed
 * $annotation_queue_item     the item claimed or acted on
 * $annotation_queue_outcome  "claimed", "extended", "released", "completed"
 *                            or the error code answered
 * $annotation_queue_db_time  seconds spent waiting for PostgreSQL
 */

static ngx_int_t
ngx_http_annotation_queue_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char        *p;
    ngx_aq_ctx_t  *ctx;

    ctx = ngx_aq_request_ctx(r);

    v->not_found = 1;

    if (ctx == NULL) {
        return NGX_OK;
    }

    switch (data) {

    case NGX_AQ_VAR_KEY:
        if (!ctx->key) {
            return NGX_OK;
        }

        v->data = ctx->key_prefix;
        v->len = NGX_AQ_KEY_PUBLIC_LEN;
        break;

    case NGX_AQ_VAR_ITEM:
        if (ctx->item_id.len == 0) {
            return NGX_OK;
        }

        v->data = ctx->item_id.data;
        v->len = ctx->item_id.len;
        break;

    case NGX_AQ_VAR_OUTCOME:
        if (ctx->outcome == NULL) {
            return NGX_OK;
        }

        v->data = (u_char *) ctx->outcome;
        v->len = ngx_strlen(ctx->outcome);
        break;

    default: /* NGX_AQ_VAR_DB_TIME */
        if (!ctx->db) {
            return NGX_OK;
        }

        p = ngx_pnalloc(r->pool, NGX_TIME_T_LEN + 4);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->data = p;
        v->len = ngx_sprintf(p, "%T.%03M", (time_t) ctx->db_time / 1000,
                             ctx->db_time % 1000)
                 - p;
        break;
    }

    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


/* the pools are known once the locations are merged */

static ngx_int_t
ngx_http_annotation_queue_postconfiguration(ngx_conf_t *cf)
{
    if (ngx_aq_error_filter_init(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_aq_status_add_zone(cf);
}


static ngx_int_t
ngx_http_annotation_queue_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_annotation_queue_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_annotation_queue_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                              i;
    ngx_aq_pool_t                         **pools;
    ngx_http_annotation_queue_main_conf_t  *amcf;

    amcf = ngx_http_cycle_get_module_main_conf(cycle,
                                           ngx_http_annotation_queue_module);

    if (amcf == NULL || amcf->pools == NULL) {
        return NGX_OK;
    }

    pools = amcf->pools->elts;

    for (i = 0; i < amcf->pools->nelts; i++) {
        if (ngx_aq_pool_init(pools[i], cycle) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static void
ngx_http_annotation_queue_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                              i;
    ngx_aq_pool_t                         **pools;
    ngx_http_annotation_queue_main_conf_t  *amcf;

    amcf = ngx_http_cycle_get_module_main_conf(cycle,
                                           ngx_http_annotation_queue_module);

    if (amcf == NULL || amcf->pools == NULL) {
        return;
    }

    pools = amcf->pools->elts;

    for (i = 0; i < amcf->pools->nelts; i++) {
        ngx_aq_pool_done(pools[i]);
    }
}


static void *
ngx_http_annotation_queue_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_annotation_queue_main_conf_t  *amcf;

    amcf = ngx_pcalloc(cf->pool,
                       sizeof(ngx_http_annotation_queue_main_conf_t));
    if (amcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     amcf->pools = NULL;
     */

    return amcf;
}


static void *
ngx_http_annotation_queue_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_annotation_queue_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool,
                       sizeof(ngx_http_annotation_queue_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->database = { 0, NULL };
     *     conf->action = NULL;
     *     conf->pool = NULL;
     *     conf->status = 0;
     *     conf->status_queues = NULL;
     *     conf->queue_stats = NULL;
     */

    conf->pool_size = NGX_CONF_UNSET_UINT;
    conf->max_waiting = NGX_CONF_UNSET_UINT;
    conf->connect_timeout = NGX_CONF_UNSET_MSEC;
    conf->query_timeout = NGX_CONF_UNSET_MSEC;
    conf->idle_timeout = NGX_CONF_UNSET_MSEC;
    conf->max_lifetime = NGX_CONF_UNSET_MSEC;
    conf->prepare = NGX_CONF_UNSET;
    conf->statement_timeout = NGX_CONF_UNSET_UINT;
    conf->max_body_size = NGX_CONF_UNSET_SIZE;
    conf->lease = NGX_CONF_UNSET_MSEC;
    conf->max_wait = NGX_CONF_UNSET_MSEC;
    conf->claim_wide = NGX_CONF_UNSET;
    conf->limit_zone = NGX_CONF_UNSET_PTR;
    conf->status_interval = NGX_CONF_UNSET_MSEC;

    return conf;
}


static char *
ngx_http_annotation_queue_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_annotation_queue_loc_conf_t *prev = parent;
    ngx_http_annotation_queue_loc_conf_t *conf = child;

    if (conf->database.data == NULL) {
        conf->hosts = prev->hosts;
        conf->host_timeout = prev->host_timeout;
    }

    if (conf->listen_database.data == NULL) {
        conf->listen_hosts = prev->listen_hosts;
        conf->listen_host_timeout = prev->listen_host_timeout;
    }

    ngx_conf_merge_str_value(conf->database, prev->database, "");
    ngx_conf_merge_str_value(conf->listen_database, prev->listen_database,
                             "");
    ngx_conf_merge_uint_value(conf->pool_size, prev->pool_size, 8);
    ngx_conf_merge_uint_value(conf->max_waiting, prev->max_waiting, 128);
    ngx_conf_merge_msec_value(conf->connect_timeout, prev->connect_timeout,
                              5000);
    ngx_conf_merge_msec_value(conf->idle_timeout, prev->idle_timeout,
                              60000);
    ngx_conf_merge_msec_value(conf->max_lifetime, prev->max_lifetime,
                              3600000);
    ngx_conf_merge_value(conf->prepare, prev->prepare, 1);
    ngx_conf_merge_uint_value(conf->statement_timeout,
                              prev->statement_timeout,
                              NGX_AQ_TIMEOUT_STARTUP);
    ngx_conf_merge_msec_value(conf->query_timeout, prev->query_timeout,
                              5000);
    ngx_conf_merge_size_value(conf->max_body_size, prev->max_body_size,
                              4096);
    ngx_conf_merge_msec_value(conf->lease, prev->lease, 15 * 60 * 1000);
    ngx_conf_merge_msec_value(conf->status_interval, prev->status_interval,
                              5000);
    ngx_conf_merge_msec_value(conf->max_wait, prev->max_wait, 20000);
    ngx_conf_merge_value(conf->claim_wide, prev->claim_wide, 0);

    if (conf->limit_zone == NGX_CONF_UNSET_PTR) {
        conf->limit_zone = (prev->limit_zone == NGX_CONF_UNSET_PTR)
                           ? NULL : prev->limit_zone;
        conf->limit_burst = prev->limit_burst;
    }

    if (conf->limit_zone
        && ngx_aq_limit_check_zone(cf, conf->limit_zone) != NGX_CONF_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (conf->status_queues) {
        return ngx_http_annotation_queue_merge_status(cf, conf);
    }

    if (conf->action == NULL) {
        return NGX_CONF_OK;
    }

    if (conf->database.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"annotation_queue_%s\" needs "
                           "\"annotation_queue_database\"",
                           conf->action->name);
        return NGX_CONF_ERROR;
    }

    /* the LISTEN connection of long-polling claims: the same by default */

    if (conf->listen_database.len == 0) {
        conf->listen_database = conf->database;
        conf->listen_hosts = conf->hosts;
        conf->listen_host_timeout = conf->host_timeout;
    }

    conf->pool = ngx_http_annotation_queue_pool(cf, conf);
    if (conf->pool == NULL) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* a status location that shows queues reads them through its own pool */

static char *
ngx_http_annotation_queue_merge_status(ngx_conf_t *cf,
    ngx_http_annotation_queue_loc_conf_t *conf)
{
    if (!conf->status) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"annotation_queue_status_queues\" needs "
                           "\"annotation_queue_status\" in its location");
        return NGX_CONF_ERROR;
    }

    if (conf->database.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"annotation_queue_status_queues\" needs "
                           "\"annotation_queue_database\"");
        return NGX_CONF_ERROR;
    }

    conf->pool = ngx_http_annotation_queue_pool(cf, conf);
    if (conf->pool == NULL) {
        return NGX_CONF_ERROR;
    }

    if (ngx_aq_status_queues_init(cf, conf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * Locations that name the same database with the same pool settings share
 * one pool per worker.
 */

static ngx_aq_pool_t *
ngx_http_annotation_queue_pool(ngx_conf_t *cf,
    ngx_http_annotation_queue_loc_conf_t *alcf)
{
    ngx_uint_t                              i;
    ngx_aq_pool_t                          *pool, **pools, **pp;
    ngx_resolver_t                         *resolver, *listen_resolver;
    ngx_http_core_loc_conf_t               *clcf;
    ngx_http_annotation_queue_main_conf_t  *amcf;

    amcf = ngx_http_conf_get_module_main_conf(cf,
                                          ngx_http_annotation_queue_module);

    /* host names go through nginx's resolver when one is configured */

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    resolver = NULL;

    if (alcf->hosts
        && clcf->resolver
        && clcf->resolver->connections.nelts)
    {
        resolver = clcf->resolver;
    }

    listen_resolver = NULL;

    if (alcf->listen_hosts
        && clcf->resolver
        && clcf->resolver->connections.nelts)
    {
        listen_resolver = clcf->resolver;
    }

    if (amcf->pools == NULL) {
        amcf->pools = ngx_array_create(cf->pool, 4, sizeof(ngx_aq_pool_t *));
        if (amcf->pools == NULL) {
            return NULL;
        }
    }

    pools = amcf->pools->elts;

    for (i = 0; i < amcf->pools->nelts; i++) {
        pool = pools[i];

        if (pool->size == alcf->pool_size
            && pool->max_waiting == alcf->max_waiting
            && pool->connect_timeout == alcf->connect_timeout
            && pool->query_timeout == alcf->query_timeout
            && pool->idle_timeout == alcf->idle_timeout
            && pool->max_lifetime == alcf->max_lifetime
            && pool->prepare == alcf->prepare
            && pool->statement_timeout == alcf->statement_timeout
            && pool->resolver == resolver
            && (resolver == NULL
                || pool->resolver_timeout == clcf->resolver_timeout)
            && pool->listen_resolver == listen_resolver
            && pool->conninfo.len == alcf->database.len
            && ngx_strncmp(pool->conninfo.data, alcf->database.data,
                           alcf->database.len)
               == 0
            && pool->listen_conninfo.len == alcf->listen_database.len
            && ngx_strncmp(pool->listen_conninfo.data,
                           alcf->listen_database.data,
                           alcf->listen_database.len)
               == 0)
        {
            return pool;
        }
    }

    pool = ngx_pcalloc(cf->pool, sizeof(ngx_aq_pool_t));
    if (pool == NULL) {
        return NULL;
    }

    pool->index = amcf->pools->nelts;
    pool->conninfo = alcf->database;
    pool->size = alcf->pool_size;
    pool->max_waiting = alcf->max_waiting;
    pool->connect_timeout = alcf->connect_timeout;
    pool->query_timeout = alcf->query_timeout;
    pool->idle_timeout = alcf->idle_timeout;
    pool->max_lifetime = alcf->max_lifetime;
    pool->prepare = alcf->prepare;
    pool->statement_timeout = alcf->statement_timeout;
    pool->hosts = alcf->hosts;
    pool->host_timeout = alcf->host_timeout;
    pool->resolver = resolver;
    pool->resolver_timeout = clcf->resolver_timeout;
    pool->listen_conninfo = alcf->listen_database;
    pool->listen_hosts = alcf->listen_hosts;
    pool->listen_host_timeout = alcf->listen_host_timeout;
    pool->listen_resolver = listen_resolver;

    if (pool->hosts && resolver == NULL
        && ngx_aq_hosts_resolve_now(cf, pool->hosts) != NGX_OK)
    {
        return NULL;
    }

    if (pool->listen_hosts && pool->listen_hosts != pool->hosts
        && listen_resolver == NULL
        && ngx_aq_hosts_resolve_now(cf, pool->listen_hosts) != NGX_OK)
    {
        return NULL;
    }

    pp = ngx_array_push(amcf->pools);
    if (pp == NULL) {
        return NULL;
    }

    *pp = pool;

    return pool;
}


static char *
ngx_http_annotation_queue_database(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_annotation_queue_loc_conf_t *alcf = conf;

    ngx_str_t  *value;

    if (alcf->database.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    return ngx_http_annotation_queue_conninfo(cf, &value[1], &alcf->database,
                                              &alcf->hosts,
                                              &alcf->host_timeout);
}


/*
 * The LISTEN connection of long-polling claims (ngx_aq_wait.c): another
 * conninfo, e.g. PostgreSQL itself when annotation_queue_database is a
 * pooler in transaction mode, where LISTEN does not work.
 */

static char *
ngx_http_annotation_queue_listen_database(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_annotation_queue_loc_conf_t *alcf = conf;

    ngx_str_t  *value;

    if (alcf->listen_database.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    return ngx_http_annotation_queue_conninfo(cf, &value[1],
                                              &alcf->listen_database,
                                              &alcf->listen_hosts,
                                              &alcf->listen_host_timeout);
}


static char *
ngx_http_annotation_queue_conninfo(ngx_conf_t *cf, ngx_str_t *value,
    ngx_str_t *conninfo, ngx_array_t **hosts, ngx_msec_t *host_timeout)
{
    char              *err;
    u_char            *p;
    size_t             len;
    PQconninfoOption  *opts;

    /* a C string for libpq; checked now, so that a typo fails "nginx -t" */

    p = ngx_pnalloc(cf->pool, value->len + 1);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    *ngx_cpymem(p, value->data, value->len) = '\0';

    err = NULL;
    opts = PQconninfoParse((const char *) p, &err);

    if (opts == NULL) {
        len = err ? ngx_strlen(err) : 0;

        while (len && (err[len - 1] == '\n' || err[len - 1] == ' ')) {
            len--;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid \"%V\": %*s",
                           &((ngx_str_t *) cf->args->elts)[0],
                           err ? len : sizeof("out of memory") - 1,
                           err ? err : "out of memory");
        if (err) {
            PQfreemem(err);
        }

        return NGX_CONF_ERROR;
    }

    *hosts = ngx_aq_hosts_parse(cf, opts, host_timeout);

    PQconninfoFree(opts);

    if (*hosts == NGX_CONF_ERROR) {
        return NGX_CONF_ERROR;
    }

    conninfo->data = p;
    conninfo->len = value->len;

    return NGX_CONF_OK;
}


/* the timeouts and the lease: 0 would mean "at once", never what is meant */

static char *
ngx_http_annotation_queue_check_positive(ngx_conf_t *cf, void *post,
    void *data)
{
    ngx_msec_t  *ms = data;

    if (*ms == 0) {
        return "must be positive";
    }

    return NGX_CONF_OK;
}


/* annotation_queue_claim, _extend, _release, _complete: one a location */

static char *
ngx_http_annotation_queue_action(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_annotation_queue_loc_conf_t *alcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (alcf->action || clcf->handler) {
        return "conflicts with another endpoint or content handler of this "
               "location (one a location)";
    }

    alcf->action = cmd->post;
    clcf->handler = ngx_http_annotation_queue_handler;

    return NGX_CONF_OK;
}


static char *
ngx_http_annotation_queue_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_annotation_queue_loc_conf_t *alcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler) {
        return "conflicts with another endpoint or content handler of this "
               "location (one a location)";
    }

    clcf->handler = ngx_aq_status_handler;
    alcf->status = 1;

    return NGX_CONF_OK;
}
