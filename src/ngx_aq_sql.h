
/*
 * The SQL the module sends, in one place.  Parameters only: nothing is ever
 * built from request data.
 */


#ifndef _NGX_AQ_SQL_H_INCLUDED_
#define _NGX_AQ_SQL_H_INCLUDED_


/*
 * The claim, in one round trip and one implicit transaction:
 *
 *   $1 bytea   SHA-256 of the bearer key
 *   $2 uuid    the queue
 *   $3 int8    lease in milliseconds for queues without their own lease
 *
 * k      the live key (unknown, revoked and expired keys give no row);
 * q      the queue, if it belongs to the key's organisation;
 * held   the item this key already holds in the queue (resume: a refresh
 *        or a retried request gets the same item and version back);
 * mine_expired
 *        the key's own item whose lease expired unclaimed: claimed again by
 *        the same key (a key holds at most one item per queue, enforced by
 *        the unique items_holder_idx; two claims of one key racing make
 *        the second fail with unique_violation, and the pool runs it again,
 *        which then resumes);
 * expired_first, available, expired
 *        candidates, each the head of one partial index, taken with
 *        FOR UPDATE SKIP LOCKED so that concurrent claims never wait on or
 *        collide over the same row; a CTE is read lazily, so the LIMIT 1
 *        over their union locks only the row it uses.  Highest priority
 *        first: an expired item goes before the available head when its
 *        priority is at least the head's (it is older); otherwise the head;
 *        the last branch serves expired items when the head is locked;
 * claimed
 *        the optimistic update: WHERE id = ... AND version = ..., version
 *        incremented; its new value is the claim's token.
 *
 * The result is always one row: key_ok, queue_ok, then the item or NULLs.
 * Every scan filters items by $2 directly, so each is an index range.
 */

#define NGX_AQ_CLAIM_STMT     "ngx_aq_claim"
#define NGX_AQ_CLAIM_NPARAMS  3
#define NGX_AQ_CLAIM_TYPES    { 17 /* bytea */, 2950 /* uuid */, 20 /* int8 */ }

#define NGX_AQ_CLAIM_SQL                                                      \
    "WITH k AS ( "                                                            \
    "    SELECT id, org_id "                                                  \
    "      FROM annotation_queue.api_keys "                                   \
    "     WHERE key_hash = $1 "                                               \
    "       AND revoked_at IS NULL "                                          \
    "       AND (expires_at IS NULL OR expires_at > now()) "                  \
    "), q AS ( "                                                              \
    "    SELECT q.id, coalesce(q.lease, $3 * interval '1 millisecond') "      \
    "           AS lease "                                                    \
    "      FROM annotation_queue.queues q, k "                                \
    "     WHERE q.id = $2 AND q.org_id = k.org_id "                           \
    "), held AS ( "                                                           \
    "    SELECT i.id, i.queue_id, i.payload, i.version, i.claimed_at, "       \
    "           i.lease_expires_at "                                          \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.claimed_by = (SELECT id FROM k) AND i.queue_id = $2 "       \
    "       AND i.status = 'claimed' AND i.lease_expires_at > now() "         \
    "       AND EXISTS (SELECT 1 FROM q) "                                    \
    "     ORDER BY i.claimed_at "                                             \
    "     LIMIT 1 "                                                           \
    "), mine_expired AS MATERIALIZED ( "                                      \
    "    SELECT i.id, i.version "                                             \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.claimed_by = (SELECT id FROM k) AND i.queue_id = $2 "       \
    "       AND i.status = 'claimed' AND i.lease_expires_at <= now() "        \
    "       AND EXISTS (SELECT 1 FROM q) "                                    \
    "       AND NOT EXISTS (SELECT 1 FROM held) "                             \
    "     LIMIT 1 "                                                           \
    "       FOR UPDATE SKIP LOCKED "                                          \
    "), head AS ( "                                                           \
    "    SELECT i.priority "                                                  \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.queue_id = $2 AND i.status = 'available' "                  \
    "     ORDER BY i.priority DESC, i.seq "                                   \
    "     LIMIT 1 "                                                           \
    "), expired_first AS MATERIALIZED ( "                                     \
    "    SELECT i.id, i.version "                                             \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.queue_id = $2 AND i.status = 'claimed' "                    \
    "       AND i.lease_expires_at <= now() "                                 \
    "       AND i.priority >= coalesce((SELECT priority FROM head), "         \
    "                                  i.priority) "                          \
    "       AND EXISTS (SELECT 1 FROM q) "                                    \
    "       AND NOT EXISTS (SELECT 1 FROM held) "                             \
    "     ORDER BY i.lease_expires_at "                                       \
    "     LIMIT 1 "                                                           \
    "       FOR UPDATE SKIP LOCKED "                                          \
    "), available AS MATERIALIZED ( "                                         \
    "    SELECT i.id, i.version "                                             \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.queue_id = $2 AND i.status = 'available' "                  \
    "       AND EXISTS (SELECT 1 FROM q) "                                    \
    "       AND NOT EXISTS (SELECT 1 FROM held) "                             \
    "     ORDER BY i.priority DESC, i.seq "                                   \
    "     LIMIT 1 "                                                           \
    "       FOR UPDATE SKIP LOCKED "                                          \
    "), expired AS MATERIALIZED ( "                                           \
    "    SELECT i.id, i.version "                                             \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.queue_id = $2 AND i.status = 'claimed' "                    \
    "       AND i.lease_expires_at <= now() "                                 \
    "       AND EXISTS (SELECT 1 FROM q) "                                    \
    "       AND NOT EXISTS (SELECT 1 FROM held) "                             \
    "     ORDER BY i.lease_expires_at "                                       \
    "     LIMIT 1 "                                                           \
    "       FOR UPDATE SKIP LOCKED "                                          \
    "), cand AS ( "                                                           \
    "    SELECT * FROM mine_expired "                                         \
    "    UNION ALL "                                                          \
    "    SELECT * FROM expired_first "                                        \
    "    UNION ALL "                                                          \
    "    SELECT * FROM available "                                            \
    "    UNION ALL "                                                          \
    "    SELECT * FROM expired "                                              \
    "    LIMIT 1 "                                                            \
    "), claimed AS ( "                                                        \
    "    UPDATE annotation_queue.items i "                                    \
    "       SET status = 'claimed', claimed_by = k.id, claimed_at = now(), "  \
    "           lease_expires_at = now() + q.lease, "                         \
    "           version = i.version + 1, "                                    \
    "           attempts = i.attempts + 1 "                                   \
    "      FROM cand, k, q "                                                  \
    "     WHERE i.id = cand.id AND i.version = cand.version "                 \
    "    RETURNING i.id, i.queue_id, i.payload, i.version, i.claimed_at, "    \
    "              i.lease_expires_at "                                       \
    "), r AS ( "                                                              \
    "    SELECT * FROM claimed "                                              \
    "    UNION ALL "                                                          \
    "    SELECT * FROM held "                                                 \
    ") "                                                                      \
    "SELECT EXISTS (SELECT 1 FROM k) AS key_ok, "                             \
    "       EXISTS (SELECT 1 FROM q) AS queue_ok, "                           \
    "       r.id, r.queue_id, r.payload::text, r.version, "                   \
    "       to_char(r.claimed_at AT TIME ZONE 'UTC', "                        \
    "               'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "                   \
    "       to_char(r.lease_expires_at AT TIME ZONE 'UTC', "                  \
    "               'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') "                    \
    "  FROM (SELECT 1) AS one "                                               \
    "  LEFT JOIN r ON true "


#endif /* _NGX_AQ_SQL_H_INCLUDED_ */
