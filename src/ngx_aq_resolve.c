
/*
 * Host names of the conninfo, resolved without blocking a worker.
 *
 * libpq resolves a host name with getaddrinfo(), a blocking call, in the
 * worker, at every connect.  The module gives libpq addresses instead
 * ("hostaddr", beside "host", so that TLS still verifies the name and the
 * passfile still matches it):
 *
 *   - with nginx's "resolver" configured, through it, before each connect
 *     (cached for the DNS answer's TTL or the resolver's "valid"), bounded
 *     by the connect timeout;
 *   - without, once, when the configuration is loaded (as proxy_pass does
 *     with a host name): a reload resolves again.
 *
 * A name of several addresses becomes as many entries of libpq's host
 * list, tried in order.  Addresses, unix socket directories and
 * "localhost" are left to libpq (no network); a conninfo that gives
 * "hostaddr" itself is left as it is.
 *
 * The entries are kept for the connect: when the conninfo has a
 * connect_timeout, ngx_aq_conn.c applies it host by host, and goes on with
 * the entries after a silent one (ngx_aq_hosts_lists(), _current()).
 */


#include "ngx_aq_conn.h"


#define NGX_AQ_MAX_ADDRS  16


static ngx_int_t ngx_aq_resolve_next(ngx_aq_conn_t *ac);
static void ngx_aq_resolve_handler(ngx_resolver_ctx_t *ctx);
static void ngx_aq_resolve_done(ngx_event_t *ev);
static ngx_int_t ngx_aq_hosts_keywords(ngx_aq_conn_t *ac,
    ngx_array_t **found);
static ngx_uint_t ngx_aq_host_is_name(ngx_str_t *host);
static ngx_int_t ngx_aq_list_next(ngx_str_t *list, ngx_str_t *item);


/*
 * The hosts of a parsed conninfo, with their ports when it lists one per
 * host, and its connect_timeout; NULL when the module has nothing to do
 * with them (no host name, and no list to bound host by host; or a
 * "hostaddr" already given).
 */

ngx_array_t *
ngx_aq_hosts_parse(ngx_conf_t *cf, PQconninfoOption *opts,
    ngx_msec_t *host_timeout)
{
    ngx_int_t          n;
    ngx_str_t          hosts, ports, name, port;
    ngx_uint_t         names, nports, nhosts;
    ngx_array_t       *a;
    ngx_aq_host_t     *h;
    PQconninfoOption  *o;

    ngx_str_null(&hosts);
    ngx_str_null(&ports);
    *host_timeout = 0;

    for (o = opts; o->keyword; o++) {
        if (o->val == NULL || o->val[0] == '\0') {
            continue;
        }

        /*
         * libpq's connect_timeout bounds each host of a list, but only in a
         * blocking connect: the module applies it itself (ngx_aq_conn.c),
         * as libpq does, 2 s at least
         */

        if (ngx_strcmp(o->keyword, "connect_timeout") == 0) {
            n = ngx_atoi((u_char *) o->val, ngx_strlen(o->val));

            if (n > 0) {
                *host_timeout = (ngx_msec_t) ngx_max(n, 2) * 1000;
            }

            continue;
        }

        if (ngx_strcmp(o->keyword, "hostaddr") == 0) {
            return NULL;
        }

        if (ngx_strcmp(o->keyword, "host") == 0) {
            hosts.data = (u_char *) o->val;
            hosts.len = ngx_strlen(o->val);

        } else if (ngx_strcmp(o->keyword, "port") == 0) {
            ports.data = (u_char *) o->val;
            ports.len = ngx_strlen(o->val);
        }
    }

    if (hosts.len == 0) {
        return NULL;
    }

    a = ngx_array_create(cf->pool, 4, sizeof(ngx_aq_host_t));
    if (a == NULL) {
        return NGX_CONF_ERROR;
    }

    names = 0;
    nhosts = 0;

    while (ngx_aq_list_next(&hosts, &name) == NGX_OK) {
        h = ngx_array_push(a);
        if (h == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memzero(h, sizeof(ngx_aq_host_t));

        h->name.data = ngx_pstrdup(cf->pool, &name);
        if (h->name.data == NULL) {
            return NGX_CONF_ERROR;
        }

        h->name.len = name.len;
        h->resolve = ngx_aq_host_is_name(&name);
        names += h->resolve;
        nhosts++;
    }

    if (names == 0 && (nhosts < 2 || *host_timeout == 0)) {
        return NULL;
    }

    /* a port per host, or one for all (libpq checks the counts too) */

    nports = 0;

    while (ngx_aq_list_next(&ports, &port) == NGX_OK) {
        if (nports++ < nhosts) {
            h = (ngx_aq_host_t *) a->elts + nports - 1;
            h->port.data = ngx_pstrdup(cf->pool, &port);
            if (h->port.data == NULL) {
                return NGX_CONF_ERROR;
            }

            h->port.len = port.len;
        }
    }

    if (nports < 2) {
        for (h = a->elts, nhosts = 0; nhosts < a->nelts; nhosts++) {
            ngx_str_null(&h[nhosts].port);
        }
    }

    return a;
}


/* without a resolver: the addresses of every name, now */

ngx_int_t
ngx_aq_hosts_resolve_now(ngx_conf_t *cf, ngx_array_t *hosts)
{
    u_char         *p;
    size_t          len;
    ngx_uint_t      i, j;
    ngx_url_t       u;
    ngx_str_t      *addr;
    ngx_aq_host_t  *h;

    h = hosts->elts;

    for (i = 0; i < hosts->nelts; i++) {
        if (!h[i].resolve || h[i].addrs) {
            continue;
        }

        ngx_memzero(&u, sizeof(ngx_url_t));
        u.host = h[i].name;
        u.port = 5432;

        if (ngx_inet_resolve_host(cf->pool, &u) != NGX_OK) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"annotation_queue_database\": host \"%V\" "
                               "not found%s%s (without a \"resolver\", "
                               "host names are resolved when the "
                               "configuration is loaded)", &h[i].name,
                               u.err ? ": " : "", u.err ? u.err : "");
            return NGX_ERROR;
        }

        h[i].addrs = ngx_array_create(cf->pool, u.naddrs, sizeof(ngx_str_t));
        if (h[i].addrs == NULL) {
            return NGX_ERROR;
        }

        for (j = 0; j < u.naddrs && j < NGX_AQ_MAX_ADDRS; j++) {
            p = ngx_pnalloc(cf->pool, NGX_SOCKADDR_STRLEN);
            if (p == NULL) {
                return NGX_ERROR;
            }

            len = ngx_sock_ntop(u.addrs[j].sockaddr, u.addrs[j].socklen, p,
                                NGX_SOCKADDR_STRLEN, 0);

            addr = ngx_array_push(h[i].addrs);
            if (addr == NULL) {
                return NGX_ERROR;
            }

            addr->data = p;
            addr->len = len;
        }
    }

    return NGX_OK;
}


/*
 * Before connecting ac: the host, hostaddr and port lists libpq gets
 * (ac->host, ac->hostaddr, ac->port), at once from the addresses found when
 * the configuration was loaded (NGX_OK), or through nginx's resolver: then
 * NGX_AGAIN, and ngx_aq_conn_resolved() is called later, never from here.
 * NGX_ERROR: nothing can be tried (logged).
 */

ngx_int_t
ngx_aq_resolve_start(ngx_aq_conn_t *ac)
{
    ngx_uint_t      i;
    ngx_aq_pool_t  *pool;
    ngx_aq_host_t  *h;

    pool = ac->pool;

    ac->tmp = ngx_create_pool(1024, pool->log);
    if (ac->tmp == NULL) {
        return NGX_ERROR;
    }

    ac->found = ngx_pcalloc(ac->tmp,
                            pool->hosts->nelts * sizeof(ngx_array_t *));
    if (ac->found == NULL) {
        return NGX_ERROR;
    }

    if (pool->resolver == NULL) {
        h = pool->hosts->elts;

        for (i = 0; i < pool->hosts->nelts; i++) {
            ac->found[i] = h[i].addrs;
        }

        return ngx_aq_hosts_keywords(ac, ac->found);
    }

    ac->next_host = 0;
    ac->resolved.handler = ngx_aq_resolve_done;
    ac->resolved.data = ac;
    ac->resolved.log = pool->log;

    if (ngx_aq_resolve_next(ac) != NGX_OK) {
        return NGX_ERROR;
    }

    return NGX_AGAIN;
}


/* the connection closes while a name is being resolved */

void
ngx_aq_resolve_cancel(ngx_aq_conn_t *ac)
{
    if (ac->resolving) {
        ngx_resolve_name_done(ac->resolving);
        ac->resolving = NULL;
    }

    if (ac->resolved.posted) {
        ngx_delete_posted_event(&ac->resolved);
    }

    if (ac->tmp) {
        ngx_destroy_pool(ac->tmp);
        ac->tmp = NULL;
    }
}


/* asks the resolver for the next name, or posts the end of it all */

static ngx_int_t
ngx_aq_resolve_next(ngx_aq_conn_t *ac)
{
    ngx_msec_t           spent, left;
    ngx_aq_pool_t       *pool;
    ngx_aq_host_t       *h;
    ngx_resolver_ctx_t  *ctx, temp;

    pool = ac->pool;
    h = pool->hosts->elts;

    while (ac->next_host < pool->hosts->nelts && !h[ac->next_host].resolve) {
        ac->next_host++;
    }

    if (ac->next_host == pool->hosts->nelts) {
        ac->resolve_rc = NGX_OK;
        ngx_post_event(&ac->resolved, &ngx_posted_events);
        return NGX_OK;
    }

    temp.name = h[ac->next_host].name;

    ctx = ngx_resolve_start(pool->resolver, &temp);

    if (ctx == NULL) {
        return NGX_ERROR;
    }

    if (ctx == NGX_NO_RESOLVER) {
        ngx_log_error(NGX_LOG_ERR, pool->log, 0,
                      "annotation queue: no resolver defined to resolve %V",
                      &temp.name);
        return NGX_ERROR;
    }

    /* the whole connect, resolving included, within the connect timeout */

    spent = ngx_current_msec - ac->born;
    left = (pool->connect_timeout > spent) ? pool->connect_timeout - spent : 1;

    ctx->name = temp.name;
    ctx->handler = ngx_aq_resolve_handler;
    ctx->data = ac;
    ctx->timeout = ngx_min(pool->resolver_timeout, left);

    ac->resolving = ctx;

    if (ngx_resolve_name(ctx) != NGX_OK) {
        ac->resolving = NULL;
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * The resolver's answer for one name; it may come from within
 * ngx_resolve_name(), so the end is posted, never run from here.
 */

static void
ngx_aq_resolve_handler(ngx_resolver_ctx_t *ctx)
{
    u_char         *p;
    size_t          len;
    ngx_str_t      *addr;
    ngx_uint_t      i;
    ngx_aq_conn_t  *ac;
    ngx_array_t    *a;

    ac = ctx->data;

    if (ctx->state) {
        ngx_log_error(NGX_LOG_ERR, ac->pool->log, 0,
                      "annotation queue: %V could not be resolved "
                      "(%i: %s)", &ctx->name, ctx->state,
                      ngx_resolver_strerror(ctx->state));
        goto failed;
    }

    a = ngx_array_create(ac->tmp, ctx->naddrs, sizeof(ngx_str_t));
    if (a == NULL) {
        goto failed;
    }

    for (i = 0; i < ctx->naddrs && i < NGX_AQ_MAX_ADDRS; i++) {
        p = ngx_pnalloc(ac->tmp, NGX_SOCKADDR_STRLEN);
        if (p == NULL) {
            goto failed;
        }

        len = ngx_sock_ntop(ctx->addrs[i].sockaddr, ctx->addrs[i].socklen, p,
                            NGX_SOCKADDR_STRLEN, 0);

        addr = ngx_array_push(a);
        if (addr == NULL) {
            goto failed;
        }

        addr->data = p;
        addr->len = len;
    }

    ac->found[ac->next_host++] = a;

    ngx_resolve_name_done(ctx);
    ac->resolving = NULL;

    if (ngx_aq_resolve_next(ac) == NGX_OK) {
        return;
    }

    ac->resolve_rc = NGX_ERROR;
    ngx_post_event(&ac->resolved, &ngx_posted_events);
    return;

failed:

    ngx_resolve_name_done(ctx);
    ac->resolving = NULL;

    ac->resolve_rc = NGX_ERROR;
    ngx_post_event(&ac->resolved, &ngx_posted_events);
}


static void
ngx_aq_resolve_done(ngx_event_t *ev)
{
    ngx_aq_conn_t  *ac;

    ac = ev->data;

    if (ac->resolve_rc == NGX_OK
        && ngx_aq_hosts_keywords(ac, ac->found) != NGX_OK)
    {
        ac->resolve_rc = NGX_ERROR;
    }

    ngx_aq_conn_resolved(ac, ac->resolve_rc);
}


/*
 * The hosts libpq may try, in order: an entry per address of each name,
 * and one for every other host with an empty hostaddr (libpq then uses the
 * host itself); then libpq's lists from the first entry.
 */

static ngx_int_t
ngx_aq_hosts_keywords(ngx_aq_conn_t *ac, ngx_array_t **found)
{
    ngx_str_t       *addr;
    ngx_uint_t       i, j, n;
    ngx_aq_host_t   *h;
    ngx_aq_entry_t  *e;

    h = ac->pool->hosts->elts;
    n = ac->pool->hosts->nelts;

    ac->entries = ngx_array_create(ac->tmp, n, sizeof(ngx_aq_entry_t));
    if (ac->entries == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        if (!h[i].resolve) {
            e = ngx_array_push(ac->entries);
            if (e == NULL) {
                return NGX_ERROR;
            }

            e->host = h[i].name;
            ngx_str_null(&e->addr);
            e->port = h[i].port;
            continue;
        }

        if (found[i] == NULL) {
            continue;
        }

        addr = found[i]->elts;

        for (j = 0; j < found[i]->nelts; j++) {
            e = ngx_array_push(ac->entries);
            if (e == NULL) {
                return NGX_ERROR;
            }

            e->host = h[i].name;
            e->addr = addr[j];
            e->port = h[i].port;
        }
    }

    return ngx_aq_hosts_lists(ac, 0);
}


/* libpq's host, hostaddr and port lists of the entries from "from" on */

ngx_int_t
ngx_aq_hosts_lists(ngx_aq_conn_t *ac, ngx_uint_t from)
{
    u_char          *hp, *ap, *pp;
    size_t           len;
    ngx_uint_t       i;
    ngx_aq_entry_t  *e;

    e = ac->entries->elts;

    if (from >= ac->entries->nelts) {
        return NGX_ERROR;
    }

    len = 0;

    for (i = from; i < ac->entries->nelts; i++) {
        len += e[i].host.len + e[i].addr.len + e[i].port.len + 1;
    }

    hp = ngx_pnalloc(ac->tmp, 3 * len);
    if (hp == NULL) {
        return NGX_ERROR;
    }

    ac->host = (char *) hp;
    ap = hp + len;
    ac->hostaddr = (char *) ap;
    pp = ap + len;
    ac->port = e[from].port.len ? (char *) pp : NULL;
    ac->from = from;

    for (i = from; i < ac->entries->nelts; i++) {
        if (i > from) {
            *hp++ = ',';
            *ap++ = ',';
            *pp++ = ',';
        }

        /* an empty entry's data may be NULL: memcpy() must not see it */

        if (e[i].host.len) {
            hp = ngx_cpymem(hp, e[i].host.data, e[i].host.len);
        }

        if (e[i].addr.len) {
            ap = ngx_cpymem(ap, e[i].addr.data, e[i].addr.len);
        }

        if (e[i].port.len) {
            pp = ngx_cpymem(pp, e[i].port.data, e[i].port.len);
        }
    }

    *hp = '\0';
    *ap = '\0';
    *pp = '\0';

    return NGX_OK;
}


/*
 * The entry libpq is trying now, from ac->from on: by the address it
 * connects to, or by the host and the port.
 */

ngx_uint_t
ngx_aq_hosts_current(ngx_aq_conn_t *ac)
{
    size_t           len;
    ngx_uint_t       i;
    const char      *host, *addr, *port;
    ngx_aq_entry_t  *e;

    e = ac->entries->elts;
    host = PQhost(ac->pg);
    addr = PQhostaddr(ac->pg);
    port = PQport(ac->pg);

    for (i = ac->from; i < ac->entries->nelts; i++) {
        if (e[i].port.len && port
            && (ngx_strlen(port) != e[i].port.len
                || ngx_strncmp(port, e[i].port.data, e[i].port.len) != 0))
        {
            continue;
        }

        if (e[i].addr.len) {
            len = addr ? ngx_strlen(addr) : 0;

            if (len == e[i].addr.len
                && ngx_strncmp(addr, e[i].addr.data, len) == 0)
            {
                return i;
            }

            continue;
        }

        len = host ? ngx_strlen(host) : 0;

        if (len == e[i].host.len && ngx_strncmp(host, e[i].host.data, len) == 0)
        {
            return i;
        }
    }

    return ac->from;
}


/* what libpq would resolve through the network */

static ngx_uint_t
ngx_aq_host_is_name(ngx_str_t *host)
{
#if (NGX_HAVE_INET6)
    u_char  addr6[16];
#endif

    if (host->len == 0
        || host->data[0] == '/' || host->data[0] == '@'
        || (host->len == sizeof("localhost") - 1
            && ngx_strncasecmp(host->data, (u_char *) "localhost",
                               host->len) == 0)
        || ngx_inet_addr(host->data, host->len) != INADDR_NONE)
    {
        return 0;
    }

#if (NGX_HAVE_INET6)
    if (ngx_inet6_addr(host->data, host->len, addr6) == NGX_OK) {
        return 0;
    }
#endif

    return 1;
}


/* the next item of a comma-separated list, consumed from it */

static ngx_int_t
ngx_aq_list_next(ngx_str_t *list, ngx_str_t *item)
{
    u_char  *comma, *last;

    if (list->data == NULL) {
        return NGX_DONE;
    }

    last = list->data + list->len;
    comma = ngx_strlchr(list->data, last, ',');

    item->data = list->data;
    item->len = (comma ? comma : last) - list->data;

    if (comma) {
        list->len -= item->len + 1;
        list->data = comma + 1;

    } else {
        list->data = NULL;
        list->len = 0;
    }

    return NGX_OK;
}
