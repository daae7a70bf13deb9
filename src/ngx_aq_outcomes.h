
/*
 * Every error the module answers with, in one table: the JSON error's code
 * (also the status page's outcome label and $annotation_queue_outcome),
 * the HTTP status, the message, and the status page counter it counts in
 * (its own, but for an error that is another's in different words).
 *
 *   X(name, status, code, message, counter)
 *
 * gives ngx_aq_err_<name> (src/ngx_aq_errors.c) and NGX_AQ_OUTCOME_<name>,
 * its index in the counters; index 0 counts the successes.
 */


#ifndef _NGX_AQ_OUTCOMES_H_INCLUDED_
#define _NGX_AQ_OUTCOMES_H_INCLUDED_


#define NGX_AQ_ERRORS(X)                                                      \
                                                                              \
    X(invalid_json, NGX_HTTP_BAD_REQUEST, "invalid_json",                     \
      "the request body is not valid JSON", invalid_json)                     \
    X(invalid_request, NGX_HTTP_BAD_REQUEST, "invalid_request",               \
      "the request body must be a JSON object", invalid_request)              \
    X(missing_queue_id, NGX_HTTP_BAD_REQUEST, "missing_queue_id",             \
      "queue_id is required", missing_queue_id)                               \
    X(invalid_queue_id, NGX_HTTP_BAD_REQUEST, "invalid_queue_id",             \
      "queue_id must be a UUID string", invalid_queue_id)                     \
    X(missing_item_id, NGX_HTTP_BAD_REQUEST, "missing_item_id",               \
      "item_id is required", missing_item_id)                                 \
    X(invalid_item_id, NGX_HTTP_BAD_REQUEST, "invalid_item_id",               \
      "item_id must be a UUID string", invalid_item_id)                       \
    X(missing_version, NGX_HTTP_BAD_REQUEST, "missing_version",               \
      "version, the token returned by the claim, is required",                \
      missing_version)                                                        \
    X(invalid_version, NGX_HTTP_BAD_REQUEST, "invalid_version",               \
      "version must be a non-negative integer", invalid_version)              \
    X(invalid_result, NGX_HTTP_BAD_REQUEST, "invalid_result",                 \
      "result must be a JSON object", invalid_result)                         \
    X(missing_api_key, NGX_HTTP_UNAUTHORIZED, "missing_api_key",              \
      "an Authorization: Bearer header with an API key is required",          \
      missing_api_key)                                                        \
    X(invalid_authorization, NGX_HTTP_UNAUTHORIZED, "invalid_authorization",  \
      "the Authorization header must be: Bearer <api key>",                   \
      invalid_authorization)                                                  \
    X(invalid_api_key, NGX_HTTP_UNAUTHORIZED, "invalid_api_key",              \
      "the API key is invalid, revoked or expired", invalid_api_key)          \
    X(queue_not_found, NGX_HTTP_NOT_FOUND, "queue_not_found",                 \
      "no such queue", queue_not_found)                                       \
    X(item_not_found, NGX_HTTP_NOT_FOUND, "item_not_found",                   \
      "no such item", item_not_found)                                         \
    X(method_not_allowed, NGX_HTTP_NOT_ALLOWED, "method_not_allowed",         \
      "only POST is allowed here", method_not_allowed)                        \
    X(no_items_available, NGX_HTTP_CONFLICT, "no_items_available",            \
      "no items available or all items already claimed",                      \
      no_items_available)                                                     \
    X(stale_claim, NGX_HTTP_CONFLICT, "stale_claim",                          \
      "the item is not held with this version: the lease expired and it "     \
      "was claimed again, or it was released or completed", stale_claim)     \
    X(body_too_large, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE, "body_too_large",    \
      "the request body is too large", body_too_large)                        \
    X(rate_limited, NGX_HTTP_TOO_MANY_REQUESTS, "rate_limited",               \
      "too many requests with this API key, retry later", rate_limited)       \
    X(database_unavailable, NGX_HTTP_SERVICE_UNAVAILABLE,                     \
      "database_unavailable", "the database is unavailable, retry later",     \
      database_unavailable)                                                   \
    X(pool_saturated, NGX_HTTP_SERVICE_UNAVAILABLE, "pool_saturated",         \
      "too many requests are waiting for a database connection, retry later", \
      pool_saturated)                                                         \
    X(wait_timeout, NGX_HTTP_SERVICE_UNAVAILABLE, "pool_saturated",           \
      "no database connection became free in time, retry later",              \
      pool_saturated)                                                         \
    X(query_timeout, NGX_HTTP_GATEWAY_TIME_OUT, "query_timeout",              \
      "the database did not answer in time", query_timeout)                   \
    X(internal, NGX_HTTP_INTERNAL_SERVER_ERROR, "internal_error",             \
      "internal error", internal)                                             \
    X(bad_request, NGX_HTTP_BAD_REQUEST, "bad_request",                       \
      "the request is malformed", bad_request)                                \
    X(request_timeout, NGX_HTTP_REQUEST_TIME_OUT, "request_timeout",          \
      "the request was not received in time", request_timeout)                \
    X(service_unavailable, NGX_HTTP_SERVICE_UNAVAILABLE,                      \
      "service_unavailable", "the service is unavailable, retry later",       \
      service_unavailable)                                                    \
    X(too_many_requests, NGX_HTTP_TOO_MANY_REQUESTS, "rate_limited",          \
      "too many requests, retry later", rate_limited)                         \
    X(forbidden, NGX_HTTP_FORBIDDEN, "forbidden",                             \
      "access to this endpoint is denied", forbidden)                         \
    X(not_found, NGX_HTTP_NOT_FOUND, "not_found",                             \
      "no such endpoint", not_found)


typedef enum {
    NGX_AQ_OUTCOME_OK = 0,
#define NGX_AQ_OUTCOME_ENUM(name, status, code, message, counter)            \
    NGX_AQ_OUTCOME_##name,
    NGX_AQ_ERRORS(NGX_AQ_OUTCOME_ENUM)
#undef NGX_AQ_OUTCOME_ENUM
    NGX_AQ_NOUTCOMES
} ngx_aq_outcome_e;


#endif /* _NGX_AQ_OUTCOMES_H_INCLUDED_ */
