
/*
 * 429: a per-key request rate, shared by all workers.
 *
 *   annotation_queue_limit_zone zone=keys:10m rate=10r/s;
 *   annotation_queue_limit zone=keys burst=20;
 *
 * A leaky bucket per key, as limit_req keeps one per key, in a shared
 * memory zone (an rbtree for look-ups, a queue for least recently used).
 * It is not limit_req, for one reason: limit_req counts a request before
 * anyone knows whether its key is valid, so forged keys would create
 * entries that evict the entries of valid keys, and a request quoting a
 * valid key's public prefix would spend that key's budget.  Here an entry
 * is created only after PostgreSQL accepted the key, and entries are keyed
 * by the key's SHA-256 digest: a key that never authenticated neither
 * counts against anyone nor takes room.  Its requests reach the database,
 * so an operator who fears floods of forged keys limits them per client
 * address with limit_req as well.
 */


#include "ngx_aq.h"


typedef struct {
    ngx_rbtree_node_t         node;
    ngx_queue_t               queue;
    ngx_msec_t                last;
    ngx_uint_t                excess;    /* in 1/1000 of a request */
    u_char                    digest[NGX_AQ_DIGEST_LEN];
} ngx_aq_limit_node_t;


typedef struct {
    ngx_rbtree_t              rbtree;
    ngx_rbtree_node_t         sentinel;
    ngx_queue_t               queue;
} ngx_aq_limit_shctx_t;


struct ngx_aq_limit_zone_s {
    ngx_aq_limit_shctx_t     *sh;
    ngx_slab_pool_t          *shpool;
    ngx_uint_t                rate;      /* in 1/1000 of a request per s */
    ngx_shm_zone_t           *shm_zone;
};


static ngx_aq_limit_node_t *ngx_aq_limit_lookup(ngx_aq_limit_zone_t *zone,
    u_char *digest, uint32_t hash);
static void ngx_aq_limit_rbtree_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);
static void ngx_aq_limit_expire(ngx_aq_limit_zone_t *zone, ngx_uint_t n);
static ngx_int_t ngx_aq_limit_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static time_t ngx_aq_limit_seconds(ngx_uint_t excess, ngx_uint_t rate);


/*
 * Before the database: NGX_BUSY when the key is known and over its burst,
 * NGX_OK otherwise.  Fills ctx->limit_* for the RateLimit headers.
 */

ngx_int_t
ngx_aq_limit_check(ngx_http_request_t *r, ngx_aq_ctx_t *ctx)
{
    uint32_t                               hash;
    ngx_int_t                              excess;
    ngx_msec_t                             now;
    ngx_msec_int_t                         ms;
    ngx_aq_limit_node_t                   *ln;
    ngx_aq_limit_zone_t                   *zone;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    if (alcf->limit_zone == NULL) {
        return NGX_OK;
    }

    zone = alcf->limit_zone->data;
    ngx_memcpy(&hash, ctx->digest, sizeof(uint32_t));
    now = ngx_current_msec;

    ngx_shmtx_lock(&zone->shpool->mutex);

    ln = ngx_aq_limit_lookup(zone, ctx->digest, hash);

    if (ln == NULL) {
        ngx_shmtx_unlock(&zone->shpool->mutex);
        ctx->limit_learn = 1;
        return NGX_OK;
    }

    ms = (ngx_msec_int_t) (now - ln->last);

    if (ms < -60000) {
        ms = 1;

    } else if (ms < 0) {
        ms = 0;
    }

    excess = ln->excess - zone->rate * ms / 1000 + 1000;

    if (excess < 0) {
        excess = 0;
    }

    ctx->limit = 1;

    if ((ngx_uint_t) excess > alcf->limit_burst) {

        /* refused: the bucket keeps its level, less what leaked */

        ctx->limit_remaining = 0;
        ctx->limit_reset = ngx_aq_limit_seconds(excess - alcf->limit_burst,
                                                zone->rate);

        ngx_shmtx_unlock(&zone->shpool->mutex);

        if (ctx->limit_reset == 0) {
            ctx->limit_reset = 1;
        }

        return NGX_BUSY;
    }

    ln->excess = excess;
    ln->last = now;

    ngx_queue_remove(&ln->queue);
    ngx_queue_insert_head(&zone->sh->queue, &ln->queue);

    ngx_shmtx_unlock(&zone->shpool->mutex);

    ctx->limit_remaining = (alcf->limit_burst - excess) / 1000;
    ctx->limit_reset = ngx_aq_limit_seconds(excess, zone->rate);

    return NGX_OK;
}


/*
 * The whole seconds it takes an excess (1/1000 of a request) to leak at a
 * rate (1/1000 of a request per second), rounded up once: a client that
 * waits them finds the excess gone.  Rounding to milliseconds first, down,
 * could make it a second short (3001 at 3r/s: 1000 ms, then 1 s).
 */

static time_t
ngx_aq_limit_seconds(ngx_uint_t excess, ngx_uint_t rate)
{
    return (time_t) ((excess + rate - 1) / rate);
}


/* the database accepted a key the zone did not know: it counts from now */

void
ngx_aq_limit_learn(ngx_http_request_t *r, ngx_aq_ctx_t *ctx)
{
    size_t                                 n;
    uint32_t                               hash;
    ngx_aq_limit_node_t                   *ln;
    ngx_aq_limit_zone_t                   *zone;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);

    if (!ctx->limit_learn || alcf->limit_zone == NULL) {
        return;
    }

    ctx->limit_learn = 0;

    zone = alcf->limit_zone->data;
    ngx_memcpy(&hash, ctx->digest, sizeof(uint32_t));

    ngx_shmtx_lock(&zone->shpool->mutex);

    ln = ngx_aq_limit_lookup(zone, ctx->digest, hash);

    if (ln) {
        /* another request of the key got here first */
        ngx_shmtx_unlock(&zone->shpool->mutex);
        return;
    }

    n = sizeof(ngx_aq_limit_node_t);

    ngx_aq_limit_expire(zone, 1);

    ln = ngx_slab_alloc_locked(zone->shpool, n);

    if (ln == NULL) {
        ngx_aq_limit_expire(zone, 0);

        ln = ngx_slab_alloc_locked(zone->shpool, n);
        if (ln == NULL) {
            ngx_shmtx_unlock(&zone->shpool->mutex);
            ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                          "annotation queue: could not allocate a node "
                          "in limit zone \"%V\"", &alcf->limit_zone->shm.name);
            return;
        }
    }

    ln->node.key = hash;
    ln->last = ngx_current_msec;
    ln->excess = 0;
    ngx_memcpy(ln->digest, ctx->digest, NGX_AQ_DIGEST_LEN);

    ngx_rbtree_insert(&zone->sh->rbtree, &ln->node);
    ngx_queue_insert_head(&zone->sh->queue, &ln->queue);

    ngx_shmtx_unlock(&zone->shpool->mutex);
}


static ngx_aq_limit_node_t *
ngx_aq_limit_lookup(ngx_aq_limit_zone_t *zone, u_char *digest,
    uint32_t hash)
{
    ngx_int_t            rc;
    ngx_rbtree_node_t   *node, *sentinel;
    ngx_aq_limit_node_t  *ln;

    node = zone->sh->rbtree.root;
    sentinel = zone->sh->rbtree.sentinel;

    while (node != sentinel) {

        if (hash < node->key) {
            node = node->left;
            continue;
        }

        if (hash > node->key) {
            node = node->right;
            continue;
        }

        ln = (ngx_aq_limit_node_t *) node;

        rc = ngx_memcmp(digest, ln->digest, NGX_AQ_DIGEST_LEN);

        if (rc == 0) {
            return ln;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


static void
ngx_aq_limit_rbtree_insert(ngx_rbtree_node_t *temp, ngx_rbtree_node_t *node,
    ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t   **p;
    ngx_aq_limit_node_t  *ln, *lnt;

    for ( ;; ) {

        if (node->key < temp->key) {
            p = &temp->left;

        } else if (node->key > temp->key) {
            p = &temp->right;

        } else {
            ln = (ngx_aq_limit_node_t *) node;
            lnt = (ngx_aq_limit_node_t *) temp;

            p = (ngx_memcmp(ln->digest, lnt->digest, NGX_AQ_DIGEST_LEN) < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}


/*
 * n == 1: drop up to two least recently used entries whose buckets are
 * empty again (they would count nothing); n == 0: the zone is full, drop
 * the least recently used one, empty or not.
 */

static void
ngx_aq_limit_expire(ngx_aq_limit_zone_t *zone, ngx_uint_t n)
{
    ngx_int_t             excess;
    ngx_msec_t            now;
    ngx_queue_t          *q;
    ngx_msec_int_t        ms;
    ngx_uint_t            i;
    ngx_aq_limit_node_t  *ln;

    now = ngx_current_msec;

    for (i = 0; i < 3; i++) {

        if (ngx_queue_empty(&zone->sh->queue)) {
            return;
        }

        q = ngx_queue_last(&zone->sh->queue);
        ln = ngx_queue_data(q, ngx_aq_limit_node_t, queue);

        if (n) {
            ms = (ngx_msec_int_t) (now - ln->last);
            ms = ngx_abs(ms);

            if (ms < 60000) {
                return;
            }

            excess = ln->excess - zone->rate * ms / 1000;

            if (excess > 0) {
                return;
            }
        }

        ngx_queue_remove(q);
        ngx_rbtree_delete(&zone->sh->rbtree, &ln->node);
        ngx_slab_free_locked(zone->shpool, ln);

        if (n == 0) {
            return;
        }
    }
}


static ngx_int_t
ngx_aq_limit_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_aq_limit_zone_t  *ozone = data;

    size_t                len;
    ngx_aq_limit_zone_t  *zone;

    zone = shm_zone->data;

    if (ozone) {
        zone->sh = ozone->sh;
        zone->shpool = ozone->shpool;
        return NGX_OK;
    }

    zone->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        zone->sh = zone->shpool->data;
        return NGX_OK;
    }

    zone->sh = ngx_slab_alloc(zone->shpool, sizeof(ngx_aq_limit_shctx_t));
    if (zone->sh == NULL) {
        return NGX_ERROR;
    }

    zone->shpool->data = zone->sh;

    ngx_rbtree_init(&zone->sh->rbtree, &zone->sh->sentinel,
                    ngx_aq_limit_rbtree_insert);

    ngx_queue_init(&zone->sh->queue);

    len = sizeof(" in annotation_queue_limit_zone \"\"")
          + shm_zone->shm.name.len;

    zone->shpool->log_ctx = ngx_slab_alloc(zone->shpool, len);
    if (zone->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(zone->shpool->log_ctx,
                " in annotation_queue_limit_zone \"%V\"%Z",
                &shm_zone->shm.name);

    zone->shpool->log_nomem = 0;

    return NGX_OK;
}


/* annotation_queue_limit_zone zone=name:size rate=N r/s | r/m */

char *
ngx_aq_limit_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    u_char               *p;
    size_t                len;
    ssize_t               size;
    ngx_str_t            *value, name, s;
    ngx_int_t             rate, scale;
    ngx_uint_t            i;
    ngx_shm_zone_t       *shm_zone;
    ngx_aq_limit_zone_t  *zone;

    value = cf->args->elts;

    size = 0;
    rate = 1;
    scale = 1;
    name.len = 0;

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {

            name.data = value[i].data + 5;

            p = (u_char *) ngx_strchr(name.data, ':');

            if (p == NULL) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            name.len = p - name.data;

            if (name.len == sizeof("annotation_queue_status") - 1
                && ngx_strncmp(name.data, "annotation_queue_status",
                               name.len) == 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "zone name \"%V\" is reserved for the "
                                   "status page", &name);
                return NGX_CONF_ERROR;
            }

            s.data = p + 1;
            s.len = value[i].data + value[i].len - s.data;

            size = ngx_parse_size(&s);

            if (size == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid zone size \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            if (size < (ssize_t) (8 * ngx_pagesize)) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "zone \"%V\" is too small", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "rate=", 5) == 0) {

            len = value[i].len;
            p = value[i].data + len - 3;

            if (ngx_strncmp(p, "r/s", 3) == 0) {
                scale = 1;
                len -= 3;

            } else if (ngx_strncmp(p, "r/m", 3) == 0) {
                scale = 60;
                len -= 3;
            }

            rate = ngx_atoi(value[i].data + 5, len - 5);
            if (rate <= 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid rate \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (name.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    zone = ngx_pcalloc(cf->pool, sizeof(ngx_aq_limit_zone_t));
    if (zone == NULL) {
        return NGX_CONF_ERROR;
    }

    zone->rate = rate * 1000 / scale;

    if (zone->rate == 0) {
        zone->rate = 1;
    }

    shm_zone = ngx_shared_memory_add(cf, &name, size,
                                     &ngx_http_annotation_queue_module);
    if (shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "%V \"%V\" is already bound",
                           &cmd->name, &name);
        return NGX_CONF_ERROR;
    }

    shm_zone->init = ngx_aq_limit_init_zone;
    shm_zone->data = zone;
    zone->shm_zone = shm_zone;

    return NGX_CONF_OK;
}


/* annotation_queue_limit zone=name [burst=N] | off */

char *
ngx_aq_limit(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_annotation_queue_loc_conf_t *alcf = conf;

    ngx_int_t        burst;
    ngx_str_t       *value, s;
    ngx_uint_t       i;
    ngx_shm_zone_t  *shm_zone;

    if (alcf->limit_zone != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (cf->args->nelts == 2 && ngx_strcmp(value[1].data, "off") == 0) {
        alcf->limit_zone = NULL;
        return NGX_CONF_OK;
    }

    shm_zone = NULL;
    burst = 0;

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {

            s.len = value[i].len - 5;
            s.data = value[i].data + 5;

            shm_zone = ngx_shared_memory_add(cf, &s, 0,
                                           &ngx_http_annotation_queue_module);
            if (shm_zone == NULL) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "burst=", 6) == 0) {

            burst = ngx_atoi(value[i].data + 6, value[i].len - 6);
            if (burst < 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid burst value \"%V\"", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (shm_zone == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    alcf->limit_zone = shm_zone;
    alcf->limit_burst = burst * 1000;

    return NGX_CONF_OK;
}


/* an "annotation_queue_limit" naming a zone no limit_zone defined */

char *
ngx_aq_limit_check_zone(ngx_conf_t *cf, ngx_shm_zone_t *shm_zone)
{
    if (shm_zone->data == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "unknown annotation_queue_limit_zone \"%V\"",
                           &shm_zone->shm.name);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * The IETF draft's fields, for the zone's policy and the key's state:
 *
 *   RateLimit-Policy: "<zone>";q=<burst + 1>;w=<seconds to drain a full
 *                     bucket>
 *   RateLimit: "<zone>";r=<requests left now>;t=<seconds until empty>
 *
 * and, on 429, Retry-After: <seconds until one more request fits>.
 */

ngx_int_t
ngx_aq_limit_headers(ngx_http_request_t *r, ngx_aq_ctx_t *ctx)
{
    time_t                                 window;
    ngx_uint_t                             quota;
    ngx_table_elt_t                       *h;
    ngx_aq_limit_zone_t                   *zone;
    ngx_http_annotation_queue_loc_conf_t  *alcf;

    alcf = ngx_http_get_module_loc_conf(r, ngx_http_annotation_queue_module);
    zone = alcf->limit_zone->data;

    quota = alcf->limit_burst / 1000 + 1;
    window = ngx_aq_limit_seconds(quota * 1000, zone->rate);

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "RateLimit-Policy");

    h->value.data = ngx_pnalloc(r->pool, alcf->limit_zone->shm.name.len
                                         + 2 * NGX_INT_T_LEN + 16);
    if (h->value.data == NULL) {
        return NGX_ERROR;
    }

    h->value.len = ngx_sprintf(h->value.data, "\"%V\";q=%ui;w=%T",
                               &alcf->limit_zone->shm.name, quota,
                               window ? window : 1)
                   - h->value.data;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "RateLimit");

    h->value.data = ngx_pnalloc(r->pool, alcf->limit_zone->shm.name.len
                                         + 2 * NGX_INT_T_LEN + 16);
    if (h->value.data == NULL) {
        return NGX_ERROR;
    }

    h->value.len = ngx_sprintf(h->value.data, "\"%V\";r=%ui;t=%T",
                               &alcf->limit_zone->shm.name,
                               ctx->limit_remaining, ctx->limit_reset)
                   - h->value.data;

    if (r->headers_out.status != NGX_HTTP_TOO_MANY_REQUESTS) {
        return NGX_OK;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Retry-After");

    h->value.data = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);
    if (h->value.data == NULL) {
        return NGX_ERROR;
    }

    h->value.len = ngx_sprintf(h->value.data, "%T", ctx->limit_reset)
                   - h->value.data;

    return NGX_OK;
}
