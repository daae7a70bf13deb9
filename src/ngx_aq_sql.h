
/*
 * The SQL the module sends, in one place.  Parameters only: nothing is ever
 * built from request data.
 */


#ifndef _NGX_AQ_SQL_H_INCLUDED_
#define _NGX_AQ_SQL_H_INCLUDED_


/*
 * The walk both claims share: the distinct priorities of the queue's
 * claimed items, from the highest down, one index probe each
 * (items_expiry_idx), with the earliest lease of each.  A row (hi, lo,
 * since): available items of priorities in (lo, hi], then the expired
 * items of priority lo, whose earliest lease ended at since.  The head
 * gives the first row; each statement adds the condition under which it
 * walks at all, then the step.
 */

#define NGX_AQ_WALK_HEAD_SQL                                                  \
    "), walk (hi, lo, since) AS ( "                                           \
    "    SELECT 2147483647::int8, coalesce(e.priority, -2147483649), "        \
    "           e.since "                                                     \
    "      FROM (SELECT 1) AS one "                                           \
    "      LEFT JOIN LATERAL ( "                                              \
    "        SELECT i.priority, i.lease_expires_at AS since "                 \
    "          FROM annotation_queue.items i "                                \
    "         WHERE i.queue_id = $2 AND i.status = 'claimed' "                \
    "           AND i.lease_expires_at IS NOT NULL "                          \
    "         ORDER BY i.priority DESC, i.lease_expires_at "                  \
    "         LIMIT 1) AS e ON true "

#define NGX_AQ_WALK_STEP_SQL                                                  \
    "    UNION ALL "                                                          \
    "    SELECT w.lo, coalesce(e.priority, -2147483649), e.since "            \
    "      FROM walk w "                                                      \
    "      LEFT JOIN LATERAL ( "                                              \
    "        SELECT i.priority, i.lease_expires_at AS since "                 \
    "          FROM annotation_queue.items i "                                \
    "         WHERE i.queue_id = $2 AND i.status = 'claimed' "                \
    "           AND i.lease_expires_at IS NOT NULL "                          \
    "           AND i.priority < w.lo "                                       \
    "         ORDER BY i.priority DESC, i.lease_expires_at "                  \
    "         LIMIT 1) AS e ON true "                                         \
    "     WHERE w.lo >= -2147483648 "


/*
 * The slot of a candidate: the wide claim and the batch carry it (a queue of
 * overlap > 1 has several rows of one id); the lean claim, run for queues of
 * overlap 1 only, takes slot 1 (sql/008: an overlap is fixed), and carries
 * nothing.
 */

#define NGX_AQ_SLOT_SQL       "i.slot, "
#define NGX_AQ_CSLOT_SQL      "           coalesce(a.slot, e.slot) AS slot, "


/*
 * The candidate both claims share, after the walk: for each row of the
 * walk, the first available item of priorities (lo, hi], then the expired
 * item of priority lo with the earliest lease; the first "limit" found,
 * each locked (SKIP LOCKED).  "limit" is SQL text: 1 for the single claim,
 * the number of keys still to serve for the batch.
 */

#define NGX_AQ_NEXT_SQL(limit, exclude, slot, cslot)                          \
    "), next AS MATERIALIZED ( "                                              \
    "    SELECT coalesce(a.id, e.id) AS id, "                                 \
    cslot                                                                     \
    "           coalesce(a.version, e.version) AS version "                   \
    "      FROM walk w "                                                      \
    "     CROSS JOIN LATERAL (VALUES (1, w.lo), (2, w.lo)) AS s (kind, lo) "  \
    "      LEFT JOIN LATERAL ( "                                              \
    "        SELECT i.id, " slot "i.version "                                 \
    "          FROM annotation_queue.items i "                                \
    "         WHERE s.kind = 1 "                                              \
    "           AND i.queue_id = $2 AND i.status = 'available' "              \
    "           AND i.priority <= w.hi AND i.priority > w.lo "                \
    exclude                                                                   \
    "         ORDER BY i.priority DESC, i.seq "                               \
    "         LIMIT " limit " "                                               \
    "           FOR UPDATE SKIP LOCKED "                                      \
    "      ) a ON true "                                                      \
    "      LEFT JOIN LATERAL ( "                                              \
    "        SELECT i.id, " slot "i.version "                                 \
    "          FROM annotation_queue.items i "                                \
    "         WHERE s.kind = 2 AND w.since <= now() "                         \
    "           AND i.queue_id = $2 AND i.status = 'claimed' "                \
    "           AND i.priority = s.lo AND i.lease_expires_at <= now() "       \
    exclude                                                                   \
    "         ORDER BY i.lease_expires_at "                                   \
    "         LIMIT " limit " "                                               \
    "           FOR UPDATE SKIP LOCKED "                                      \
    "      ) e ON true "                                                      \
    "     WHERE a.id IS NOT NULL OR e.id IS NOT NULL "                        \
    "     LIMIT " limit " "


/*
 * The single claim's candidates leave out the items the key may no longer
 * take (annotation_queue.exclusions: a slot of the item it took in a queue
 * of overlap > 1, or the item it skipped): one probe of the table's
 * primary key per candidate.  The probe does not state
 * exclusions_key_idx's predicate: through that index the planner chose to
 * read all the key's exclusions at every claim (thousands for a busy rater
 * of an overlap queue).  OFFSET 0 keeps it a subplan run per candidate
 * whatever the statistics say (as a join it could read the queue's
 * exclusions at once).  The batch serves no key that has any in the queue
 * (need: a key flagged in api_keys.has_exclusions, sql/008, is looked up
 * in exclusions_key_idx; on Citus every key is flagged).
 */

#define NGX_AQ_EXCLUDE_SQL                                                    \
    "           AND NOT EXISTS ( "                                            \
    "               SELECT 1 FROM annotation_queue.exclusions x "             \
    "                WHERE x.item_id = i.id "                                 \
    "                  AND x.key_id = (SELECT id FROM k) "                    \
    "                  AND x.queue_id = $2 OFFSET 0) "


/*
 * A claim that takes a slot whose lease expired counts an expiry; the one
 * that would count its queue's max_attempts-th marks the slot failed and
 * takes nothing (the module runs the claim again).  A claim that takes a
 * slot of a queue of overlap > 1 sets exclude = 'claimed': the trigger of
 * sql/007_exclusion_notes.sql notes the item in annotation_queue.exclusions
 * for the key, which then never gets another slot of it (an INSERT of the
 * statement's own would keep Citus from routing it as one task).  q is the
 * claim's queue, with the claim's time (at: now()) and the lease's end
 * (lease_end) computed there: Citus refuses an UPDATE that calls a STABLE
 * function (now(), timestamptz + interval) on a column, or inside CASE.
 */

#define NGX_AQ_FAILS_SQL                                                      \
    "(i.status = 'claimed' AND i.expirations + 1 >= q.max_attempts) "

#define NGX_AQ_CLAIM_SET_SQL(key)                                             \
    "       SET status = CASE WHEN " NGX_AQ_FAILS_SQL                         \
    "                         THEN 'failed' ELSE 'claimed' END, "             \
    "           claimed_by = CASE WHEN " NGX_AQ_FAILS_SQL                     \
    "                             THEN NULL ELSE " key " END, "               \
    "           claimed_at = CASE WHEN " NGX_AQ_FAILS_SQL                     \
    "                             THEN NULL ELSE q.at END, "                  \
    "           lease_expires_at = CASE WHEN " NGX_AQ_FAILS_SQL               \
    "                                   THEN NULL ELSE q.lease_end END, "     \
    "           version = i.version + 1, "                                    \
    "           attempts = i.attempts + CASE WHEN " NGX_AQ_FAILS_SQL          \
    "                                        THEN 0 ELSE 1 END, "             \
    "           expirations = i.expirations "                                 \
    "                         + (i.status = 'claimed')::int "


/*
 * The wide claim's note of the slot it takes in a queue of overlap > 1:
 * the trigger of sql/007 writes it to annotation_queue.exclusions.  The
 * other claims do not set the column, so that the trigger is not even
 * considered for them.
 */

#define NGX_AQ_CLAIM_NOTE_SQL                                                 \
    "         , exclude = CASE WHEN q.overlap > 1 "                           \
    "                          AND NOT " NGX_AQ_FAILS_SQL                     \
    "                          THEN 'claimed' END "


/*
 * What both claims answer besides the item: the queue's overlap, and for
 * an overlap above 1 the item's completed slots (r is the answer's item,
 * q the queue).
 */

#define NGX_AQ_OVERLAP_SQL_R                                                  \
    NGX_AQ_OVERLAP_SQL("r")

#define NGX_AQ_OVERLAP_SQL(r)                                                 \
    "       (SELECT overlap FROM q), "                                        \
    "       CASE WHEN " r ".id IS NULL THEN NULL "                            \
    "            WHEN (SELECT overlap FROM q) = 1 THEN 0 "                    \
    "            ELSE (SELECT count(*) FROM annotation_queue.items c "        \
    "                   WHERE c.id = " r ".id AND c.queue_id = $2 "           \
    "                     AND c.status = 'completed') END, "


/*
 * The claim, in one round trip and one implicit transaction:
 *
 *   $1 bytea   SHA-256 of the bearer key
 *   $2 uuid    the queue
 *   $3 int8    lease in milliseconds for queues without their own lease
 *
 * k      the live key (unknown, revoked and expired keys give no row);
 * q      the queue, if it belongs to the key's organisation;
 * mine   the item this key holds in the queue, live or expired, read
 *        without a lock: at most one row, one probe of the unique
 *        items_holder_idx (a key holds at most one item per queue; two
 *        claims of one key racing make the second fail with
 *        unique_violation, and the pool runs it again, which then
 *        resumes);
 * held   mine, if its lease is live (resume: a refresh or a retried request
 *        gets the same item and version back), locked FOR SHARE SKIP
 *        LOCKED, with the conditions checked again on the row once locked.
 *        A claim of another key that takes the item at the instant its
 *        lease ends (by that claim's clock) holds it FOR UPDATE: the resume
 *        skips it and the key claims another item (its new entry in
 *        items_holder_idx waits for that claim to end; should the claim
 *        roll back, it fails with unique_violation and the pool runs it
 *        again, which then resumes); once the resume holds the item, the
 *        other claim skips it.  The old holder and a new one are never
 *        both told they hold it;
 * mine_expired
 *        mine, if its lease expired unclaimed: claimed again by the key
 *        (locked SKIP LOCKED; the conditions are checked again on the row
 *        once locked);
 *        items_expiry_idx's predicate asks for a lease, which neither held
 *        nor mine_expired states as such (coalesce), so that the planner
 *        cannot take that index for them: when the table's statistics say
 *        that few items are claimed, it would read every claimed item of
 *        every queue to find the key's;
 * walk   the distinct priorities of the queue's claimed items, highest
 *        first, one index probe each (a skip scan of items_expiry_idx:
 *        the next lower priority, and the first lease of that priority,
 *        which says whether any lease of it ended), read without locks
 *        and lazily: it goes no further down than the first priority that
 *        gives a candidate.  Each row (hi, lo) is a step of the claim's
 *        order: the available items of a priority in (lo, hi], then the
 *        expired items of priority lo (older than the available items of
 *        their priority, they go first);
 * next   that order, each step two probes: the available items through
 *        items_available_idx (queue, priority desc, seq) with the
 *        priorities as index bounds, the expired ones through
 *        items_expiry_idx (queue, priority desc, lease end) with the
 *        priority an equality and the lease an index bound (probed only
 *        when the walk saw a lease of that priority end).  So a claim
 *        reads one entry per distinct priority above the item it takes,
 *        whatever the number of live claims, expired leases and completed
 *        items; the priorities bound it, not the claims.  Candidates are
 *        taken with FOR UPDATE SKIP LOCKED as the LIMIT pulls them, so
 *        only the item the claim takes is locked: concurrent claims never
 *        wait on or collide over a row, and never skip one that is locked
 *        but not taken;
 * claimed
 *        the optimistic update: WHERE id = ... AND version = ..., version
 *        incremented; its new value is the claim's token.
 *
 * The result is always one row: key_ok, queue_ok, then the item or NULLs.
 * Every scan filters items by $2 directly, so each is an index range.
 * Priorities are int4; the walk counts in int8 so that its bounds
 * (-2147483649 and 2147483647) lie beyond every priority.
 */

#define NGX_AQ_CLAIM_OF_SQL(wide, gate, slot, cslot, exclude, set, match,    \
                            r, answer)                                        \
    "WITH RECURSIVE k AS ( "                                                  \
    "    SELECT id, org_id, has_exclusions "                                  \
    "      FROM annotation_queue.api_keys "                                   \
    "     WHERE key_hash = $1 "                                               \
    "       AND revoked_at IS NULL "                                          \
    "       AND (expires_at IS NULL OR expires_at > now()) "                  \
    "), q AS ( "                                                              \
    "    SELECT q.id, now() AS at, "                                          \
    "           now() + coalesce(q.lease, $3 * interval '1 millisecond') "    \
    "           AS lease_end, q.overlap, q.max_attempts, "                    \
    wide                                                                      \
    "      FROM annotation_queue.queues q, k "                                \
    "     WHERE q.id = $2 AND q.org_id = k.org_id "                           \
    "), mine AS MATERIALIZED ( "                                              \
    "    SELECT i.id, i.lease_expires_at "                                    \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.claimed_by = (SELECT id FROM k) AND i.queue_id = $2 "       \
    "       AND i.status = 'claimed' "                                        \
    "       AND EXISTS (SELECT 1 FROM q) "                                    \
    "), held AS MATERIALIZED ( "                                              \
    "    SELECT i.id, i.queue_id, i.payload, i.version, i.claimed_at, "       \
    "           i.lease_expires_at "                                          \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.id = (SELECT id FROM mine "                                 \
    "                    WHERE lease_expires_at > now()) "                    \
    "       AND i.claimed_by = (SELECT id FROM k) AND i.queue_id = $2 "       \
    "       AND i.status = 'claimed' "                                        \
    "       AND coalesce(i.lease_expires_at, '-infinity') > now() "           \
    "       FOR SHARE SKIP LOCKED "                                           \
    "), mine_expired AS MATERIALIZED ( "                                      \
    "    SELECT i.id, " slot "i.version "                                     \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.id = (SELECT id FROM mine "                                 \
    "                    WHERE lease_expires_at <= now()) "                   \
    "       AND i.claimed_by = (SELECT id FROM k) AND i.queue_id = $2 "       \
    "       AND i.status = 'claimed' "                                        \
    "       AND coalesce(i.lease_expires_at, 'infinity') <= now() "           \
    "       AND NOT EXISTS (SELECT 1 FROM held) "                             \
    "       AND " gate                                                        \
    "       FOR UPDATE SKIP LOCKED "                                          \
    NGX_AQ_WALK_HEAD_SQL                                                      \
    "     WHERE " gate                                                        \
    "       AND NOT EXISTS (SELECT 1 FROM held) "                             \
    NGX_AQ_WALK_STEP_SQL                                                      \
    NGX_AQ_NEXT_SQL("1", exclude, slot, cslot)                                \
    "), cand AS ( "                                                           \
    "    SELECT * FROM mine_expired "                                         \
    "    UNION ALL "                                                          \
    "    SELECT * FROM next "                                                 \
    "    LIMIT 1 "                                                            \
    "), claimed AS ( "                                                        \
    "    UPDATE annotation_queue.items i "                                    \
    set                                                                       \
    "      FROM cand, k, q "                                                  \
    "     WHERE i.id = cand.id AND " match                                    \
    "       AND i.version = cand.version AND i.queue_id = $2 "                \
    r                                                                         \
    "    UNION ALL "                                                          \
    "    SELECT * FROM held "                                                 \
    ") "                                                                      \
    "SELECT EXISTS (SELECT 1 FROM k) AS key_ok, "                             \
    "       EXISTS (SELECT 1 FROM q) AS queue_ok, "                           \
    "       r.id, r.queue_id, r.payload::text, r.version, "                   \
    "       to_char(r.claimed_at AT TIME ZONE 'UTC', "                        \
    "               'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "                   \
    "       to_char(r.lease_expires_at AT TIME ZONE 'UTC', "                  \
    "               'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "                   \
    answer                                                                    \
    "  FROM (SELECT 1) AS one "                                               \
    "  LEFT JOIN r ON true "

/*
 * The earliest lease end the walk saw, in milliseconds from now, when the
 * claim took nothing: when a long-polling claim (ngx_aq_wait.c) that waits
 * on should try again.  Computed only then, but its subplan costs every
 * claim about 10 microseconds to set up (bench/README.md, "Two statements
 * side by side"): the lean claim of a request that does not wait answers
 * NULL instead.
 */

#define NGX_AQ_NEXT_LEASE_SQL                                                 \
    "       CASE WHEN r.id IS NULL THEN "                                     \
    "           (SELECT ceil(extract(epoch FROM min(w.since) - now()) "       \
    "                        * 1000)::int8 "                                  \
    "              FROM walk w WHERE w.since > now()) END, "


/*
 * The single claim, lean: the one-rater claim, the statement of before the
 * workflows (sql/006) but for the slot's expirations counted and the
 * answer's columns.  It runs for a queue of overlap 1 without max_attempts
 * and a key without exclusions (api_keys.has_exclusions, sql/008): it
 * reads no exclusions, counts no ratings, fails no slot, and takes slot 1.
 * Anything else it finds out from the rows it reads anyway and says so in
 * its last column (wide): it then takes nothing (neither the key's own
 * expired slot nor the walk's: gate) and the module runs the wide claim
 * instead, which answers.  A resume it may have found meanwhile (held, read
 * only) the wide claim finds again.
 *
 * NGX_AQ_CLAIM_SQL is the claim of a request that does not wait;
 * NGX_AQ_CLAIM_WAIT_SQL, a long-polling one's, answers the next lease end
 * too.
 */

#define NGX_AQ_CLAIM_LEAN_WIDE_SQL                                            \
    "           (q.overlap > 1 OR q.max_attempts IS NOT NULL "                \
    "            OR k.has_exclusions) AS wide "

#define NGX_AQ_CLAIM_LEAN_GATE_SQL                                            \
    "EXISTS (SELECT 1 FROM q WHERE NOT q.wide) "

#define NGX_AQ_CLAIM_LEAN_SET_SQL                                             \
    "       SET status = 'claimed', claimed_by = k.id, claimed_at = q.at, "   \
    "           lease_expires_at = q.lease_end, "                             \
    "           version = i.version + 1, attempts = i.attempts + 1, "         \
    "           expirations = i.expirations "                                 \
    "                         + (i.status = 'claimed')::int "

#define NGX_AQ_CLAIM_LEAN_R_SQL                                               \
    "    RETURNING i.id, i.queue_id, i.payload, i.version, i.claimed_at, "    \
    "              i.lease_expires_at "                                       \
    "), r AS ( "                                                              \
    "    SELECT * FROM claimed "

#define NGX_AQ_CLAIM_LEAN_ANSWER_SQL                                          \
    "       1, 0, false, NULL::int8, "                                        \
    "       EXISTS (SELECT 1 FROM q WHERE q.wide) "

#define NGX_AQ_CLAIM_WAIT_ANSWER_SQL                                          \
    "       1, 0, false, "                                                    \
    NGX_AQ_NEXT_LEASE_SQL                                                     \
    "       EXISTS (SELECT 1 FROM q WHERE q.wide) "

#define NGX_AQ_CLAIM_SQL                                                      \
    NGX_AQ_CLAIM_OF_SQL(NGX_AQ_CLAIM_LEAN_WIDE_SQL,                           \
                        NGX_AQ_CLAIM_LEAN_GATE_SQL, "", "", "",               \
                        NGX_AQ_CLAIM_LEAN_SET_SQL, "i.slot = 1 ",             \
                        NGX_AQ_CLAIM_LEAN_R_SQL,                              \
                        NGX_AQ_CLAIM_LEAN_ANSWER_SQL)

#define NGX_AQ_CLAIM_WAIT_SQL                                                 \
    NGX_AQ_CLAIM_OF_SQL(NGX_AQ_CLAIM_LEAN_WIDE_SQL,                           \
                        NGX_AQ_CLAIM_LEAN_GATE_SQL, "", "", "",               \
                        NGX_AQ_CLAIM_LEAN_SET_SQL, "i.slot = 1 ",             \
                        NGX_AQ_CLAIM_LEAN_R_SQL,                              \
                        NGX_AQ_CLAIM_WAIT_ANSWER_SQL)


/*
 * The single claim, wide: every candidate probed in exclusions, the slot
 * carried, the slot failed at its queue's max_attempts-th expiry (again),
 * the queue's overlap and the item's completed ratings answered.
 */

#define NGX_AQ_CLAIM_WIDE_SET_SQL                                             \
    NGX_AQ_CLAIM_SET_SQL("k.id")                                              \
    NGX_AQ_CLAIM_NOTE_SQL

#define NGX_AQ_CLAIM_WIDE_R_SQL                                               \
    "    RETURNING i.id, i.queue_id, i.payload, i.version, i.claimed_at, "    \
    "              i.lease_expires_at, i.status "                             \
    "), r AS ( "                                                              \
    "    SELECT id, queue_id, payload, version, claimed_at, "                 \
    "           lease_expires_at "                                            \
    "      FROM claimed "                                                     \
    "     WHERE status = 'claimed' "

#define NGX_AQ_CLAIM_WIDE_ANSWER_SQL                                          \
    NGX_AQ_OVERLAP_SQL_R                                                      \
    "       r.id IS NULL "                                                    \
    "       AND EXISTS (SELECT 1 FROM claimed WHERE status = 'failed'), "     \
    NGX_AQ_NEXT_LEASE_SQL                                                     \
    "       false "

#define NGX_AQ_CLAIM_WIDE_SQL                                                 \
    NGX_AQ_CLAIM_OF_SQL("false AS wide ",                                     \
                        "EXISTS (SELECT 1 FROM q) ",                          \
                        NGX_AQ_SLOT_SQL, NGX_AQ_CSLOT_SQL,                    \
                        NGX_AQ_EXCLUDE_SQL,                                   \
                        NGX_AQ_CLAIM_WIDE_SET_SQL, "i.slot = cand.slot ",     \
                        NGX_AQ_CLAIM_WIDE_R_SQL,                              \
                        NGX_AQ_CLAIM_WIDE_ANSWER_SQL)



/*
 * The claim for several keys at once, when requests for one queue wait for
 * a connection together: one commit for up to NGX_AQ_BATCH_MAX claims.
 *
 *   $1 text[]  hex SHA-256 digests of the keys, one a waiting request
 *   $2 uuid    the queue
 *   $3 int8    lease in milliseconds for queues without their own lease
 *
 * One row per digest, in their order, with the single claim's columns.
 * Each key is checked, a key holding a live claim gets it back (locked FOR
 * SHARE SKIP LOCKED, as in the single claim), and a key given twice gets
 * one item.  The keys that need an item take,
 * in their order, the first items of the single claim's order (walk and
 * next, limited to their number): exactly what successive single claims
 * would hand out, and only those rows are locked.  A request it leaves
 * without an item (the queue ran dry here, the key's own lease expired, or
 * its held item was locked) runs the single claim, which knows all of
 * that, before it may answer 409.  It serves queues of overlap 1 only, and
 * keys without exclusions in the queue; it fails slots at their queue's
 * max_attempts-th expiry as the wide claim does.
 */

#define NGX_AQ_CLAIM_BATCH_SQL                                                \
    "WITH RECURSIVE req AS ( "                                                \
    "    SELECT r.ord, decode(r.hex, 'hex') AS digest "                       \
    "      FROM unnest($1::text[]) WITH ORDINALITY AS r(hex, ord) "           \
    "), k AS ( "                                                              \
    "    SELECT req.ord, a.id, a.org_id, a.has_exclusions "                   \
    "      FROM req "                                                         \
    "      JOIN annotation_queue.api_keys a ON a.key_hash = req.digest "      \
    "     WHERE a.revoked_at IS NULL "                                        \
    "       AND (a.expires_at IS NULL OR a.expires_at > now()) "              \
    "), q AS ( "                                                              \
    "    SELECT q.id, q.org_id, "                                             \
    "           now() AS at, "                                                \
    "           now() + coalesce(q.lease, $3 * interval '1 millisecond') "    \
    "           AS lease_end, "                                               \
    "           q.overlap, q.max_attempts "                                   \
    "      FROM annotation_queue.queues q "                                   \
    "     WHERE q.id = $2 "                                                   \
    "), kq AS ( "                                                             \
    "    SELECT k.ord, k.id AS key_id, k.has_exclusions "                     \
    "      FROM k, q "                                                        \
    "     WHERE q.org_id = k.org_id "                                         \
    "), mine AS MATERIALIZED ( "                                              \
    "    SELECT i.claimed_by AS key_id, i.id, i.lease_expires_at "            \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.claimed_by = ANY (ARRAY(SELECT key_id FROM kq)) "           \
    "       AND i.queue_id = $2 AND i.status = 'claimed' "                    \
    "), held AS MATERIALIZED ( "                                              \
    "    SELECT i.claimed_by AS key_id, i.id, i.queue_id, i.payload, "        \
    "           i.version, i.claimed_at, i.lease_expires_at "                 \
    "      FROM annotation_queue.items i "                                    \
    "     WHERE i.id = ANY (ARRAY(SELECT id FROM mine "                       \
    "                              WHERE lease_expires_at > now())) "         \
    "       AND i.claimed_by = ANY (ARRAY(SELECT key_id FROM mine "           \
    "                                      WHERE lease_expires_at > now())) " \
    "       AND i.queue_id = $2 AND i.status = 'claimed' "                    \
    "       AND coalesce(i.lease_expires_at, '-infinity') > now() "           \
    "       FOR SHARE SKIP LOCKED "                                           \
    "), need AS MATERIALIZED ( "                                              \
    "    SELECT kq.key_id, row_number() OVER (ORDER BY min(kq.ord)) AS n "    \
    "      FROM kq "                                                          \
    "     WHERE kq.key_id NOT IN (SELECT key_id FROM mine) "                  \
    "       AND (SELECT overlap FROM q) = 1 "                                 \
    "       AND (NOT kq.has_exclusions OR NOT EXISTS ( "                      \
    "           SELECT 1 FROM annotation_queue.exclusions x "                 \
    "            WHERE x.key_id = kq.key_id AND x.queue_id = $2 "             \
    "              AND x.reason IS NOT NULL)) "                               \
    "     GROUP BY kq.key_id "                                                \
    NGX_AQ_WALK_HEAD_SQL                                                      \
    "     WHERE EXISTS (SELECT 1 FROM need) "                                 \
    NGX_AQ_WALK_STEP_SQL                                                      \
    NGX_AQ_NEXT_SQL("(SELECT count(*) FROM need)", "", NGX_AQ_SLOT_SQL,    \
                    NGX_AQ_CSLOT_SQL)                                         \
    "), cand AS MATERIALIZED ( "                                              \
    "    SELECT id, slot, version, row_number() OVER () AS n "                \
    "      FROM next "                                                        \
    "), claimed AS ( "                                                        \
    "    UPDATE annotation_queue.items i "                                    \
    NGX_AQ_CLAIM_SET_SQL("need.key_id")                                       \
    "      FROM cand JOIN need USING (n), q "                                 \
    "     WHERE i.id = cand.id AND i.slot = cand.slot "                       \
    "       AND i.version = cand.version AND i.queue_id = $2 "                \
    "    RETURNING need.key_id, i.id, i.queue_id, i.payload, i.version, "     \
    "              i.claimed_at, i.lease_expires_at, i.status "               \
    "), got AS ( "                                                            \
    "    SELECT key_id, id, queue_id, payload, version, claimed_at, "         \
    "           lease_expires_at "                                            \
    "      FROM claimed "                                                     \
    "     WHERE status = 'claimed' "                                          \
    "    UNION ALL "                                                          \
    "    SELECT * FROM held "                                                 \
    ") "                                                                      \
    "SELECT k.id IS NOT NULL, kq.key_id IS NOT NULL, "                        \
    "       got.id, got.queue_id, got.payload::text, got.version, "           \
    "       to_char(got.claimed_at AT TIME ZONE 'UTC', "                      \
    "               'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "                   \
    "       to_char(got.lease_expires_at AT TIME ZONE 'UTC', "                \
    "               'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "                   \
    NGX_AQ_OVERLAP_SQL("got")                                                 \
    "       false, NULL::int8, false "                                        \
    "  FROM req "                                                             \
    "  LEFT JOIN k USING (ord) "                                              \
    "  LEFT JOIN kq USING (ord) "                                             \
    "  LEFT JOIN got ON got.key_id = kq.key_id "                              \
    " ORDER BY req.ord "


/*
 * What a holder does with its item, each the optimistic update
 * WHERE id = ... AND version = ... AND claimed_by = <the key>:
 *
 *   $1 bytea   SHA-256 of the bearer key
 *   $2 uuid    the item
 *   $3 int8    the version the caller holds
 *   $4         extend: int8, the lease in milliseconds for queues without
 *              their own; complete: jsonb, the request body, whose "result"
 *              is stored (its numbers exact); release: none
 *
 * extend keeps the version (a heartbeat is no new claim); release and
 * complete increment it.  The result is always one row: key_ok, item_ok
 * (the item exists in the key's organisation), then the updated item or
 * NULLs (a stale version, an item no longer held).
 */

/* the key of an item statement, live ($1 its digest), then the item's CTE */
#define NGX_AQ_ITEM_KEY_SQL                                                   \
    "WITH k AS ( "                                                            \
    "    SELECT id, org_id "                                                  \
    "      FROM annotation_queue.api_keys "                                   \
    "     WHERE key_hash = $1 "                                               \
    "       AND revoked_at IS NULL "                                          \
    "       AND (expires_at IS NULL OR expires_at > now()) "                  \
    "), it AS ( "

#define NGX_AQ_ITEM_HEAD_SQL                                                  \
    NGX_AQ_ITEM_KEY_SQL                                                       \
    "    SELECT i.id "                                                        \
    "      FROM annotation_queue.items i "                                    \
    "      JOIN annotation_queue.queues q ON q.id = i.queue_id "              \
    "     WHERE i.id = $2 AND q.org_id = (SELECT org_id FROM k) "             \
    "     LIMIT 1 "                                                           \
    "), u AS ( "                                                              \
    "    UPDATE annotation_queue.items i "

#define NGX_AQ_ITEM_WHERE_SQL                                                 \
    "     WHERE i.id = (SELECT id FROM it) AND i.version = $3 "               \
    "       AND i.status = 'claimed' AND i.claimed_by = (SELECT id FROM k) "  \
    "    RETURNING i.id, i.queue_id, i.status, i.version, i.lease_expires_at " \
    ") "

#define NGX_AQ_ITEM_TAIL_SQL                                                  \
    NGX_AQ_ITEM_WHERE_SQL                                                     \
    NGX_AQ_ITEM_SELECT_SQL

#define NGX_AQ_ITEM_SELECT_SQL                                                \
    "SELECT EXISTS (SELECT 1 FROM k), EXISTS (SELECT 1 FROM it), "            \
    "       u.id, u.queue_id, u.status, u.version, "                          \
    "       to_char(u.lease_expires_at AT TIME ZONE 'UTC', "                  \
    "               'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') "                    \
    "  FROM (SELECT 1) AS one "                                               \
    "  LEFT JOIN u ON true "

#define NGX_AQ_EXTEND_SQL                                                     \
    NGX_AQ_ITEM_HEAD_SQL                                                      \
    "       SET lease_expires_at = now() "                                    \
    "           + coalesce((SELECT lease FROM annotation_queue.queues "       \
    "                        WHERE id = i.queue_id), "                        \
    "                      $4 * interval '1 millisecond') "                   \
    NGX_AQ_ITEM_TAIL_SQL

#define NGX_AQ_RELEASE_SET_SQL                                                \
    "       SET status = 'available', claimed_by = NULL, claimed_at = NULL, " \
    "           lease_expires_at = NULL, version = i.version + 1 "

#define NGX_AQ_RELEASE_SQL                                                    \
    NGX_AQ_ITEM_HEAD_SQL                                                      \
    NGX_AQ_RELEASE_SET_SQL                                                    \
    NGX_AQ_ITEM_TAIL_SQL

/*
 * A release that the key may not take the item again after: exclude =
 * 'skipped' makes the trigger of sql/007_exclusion_notes.sql note the item
 * in annotation_queue.exclusions for the old holder.
 */
#define NGX_AQ_SKIP_SET_SQL                                                   \
    NGX_AQ_RELEASE_SET_SQL                                                    \
    "           , exclude = 'skipped' "

#define NGX_AQ_SKIP_SQL                                                       \
    NGX_AQ_ITEM_HEAD_SQL                                                      \
    NGX_AQ_SKIP_SET_SQL                                                       \
    NGX_AQ_ITEM_TAIL_SQL

#define NGX_AQ_COMPLETE_SQL                                                   \
    NGX_AQ_ITEM_HEAD_SQL                                                      \
    "       SET status = 'completed', claimed_by = NULL, "                    \
    "           lease_expires_at = NULL, version = i.version + 1, "           \
    "           completed_by = i.claimed_by, "                                \
    "           result = $4 -> 'result', completed_at = now() "               \
    NGX_AQ_ITEM_TAIL_SQL


/*
 * The same four, for a body that names the item's queue ("queue_id"):
 *
 *   $5 uuid    the queue
 *
 * Every scan of items states the queue, so that on Citus, where items are
 * distributed by queue_id, each is a router query: one task, on the worker
 * that holds the queue.  An item of another queue is unknown (404).  The
 * new lease of extend is computed in a subquery: Citus refuses STABLE
 * functions (now(), timestamptz + interval) on columns in an UPDATE's SET.
 */

#define NGX_AQ_ITEM_HEAD_QUEUE_SQL                                            \
    NGX_AQ_ITEM_KEY_SQL                                                       \
    "    SELECT i.id "                                                        \
    "      FROM annotation_queue.items i "                                    \
    "      JOIN annotation_queue.queues q ON q.id = i.queue_id "              \
    "     WHERE i.id = $2 AND i.queue_id = $5 "                               \
    "       AND q.org_id = (SELECT org_id FROM k) "                           \
    "     LIMIT 1 "                                                           \
    "), u AS ( "                                                              \
    "    UPDATE annotation_queue.items i "

#define NGX_AQ_ITEM_WHERE_QUEUE_SQL                                           \
    "     WHERE i.id = (SELECT id FROM it) AND i.queue_id = $5 "              \
    "       AND i.version = $3 "                                              \
    "       AND i.status = 'claimed' AND i.claimed_by = (SELECT id FROM k) "  \
    "    RETURNING i.id, i.queue_id, i.status, i.version, i.lease_expires_at " \
    ") "

#define NGX_AQ_EXTEND_QUEUE_SQL                                               \
    NGX_AQ_ITEM_HEAD_QUEUE_SQL                                                \
    "       SET lease_expires_at = ( "                                        \
    "           SELECT now() "                                                \
    "                  + coalesce((SELECT lease "                             \
    "                                FROM annotation_queue.queues "           \
    "                               WHERE id = $5), "                         \
    "                             $4 * interval '1 millisecond')) "           \
    NGX_AQ_ITEM_WHERE_QUEUE_SQL                                               \
    NGX_AQ_ITEM_SELECT_SQL

#define NGX_AQ_RELEASE_QUEUE_SQL                                              \
    NGX_AQ_ITEM_HEAD_QUEUE_SQL                                                \
    NGX_AQ_RELEASE_SET_SQL                                                    \
    NGX_AQ_ITEM_WHERE_QUEUE_SQL                                               \
    NGX_AQ_ITEM_SELECT_SQL

#define NGX_AQ_COMPLETE_QUEUE_SQL                                             \
    NGX_AQ_ITEM_HEAD_QUEUE_SQL                                                \
    "       SET status = 'completed', claimed_by = NULL, "                    \
    "           lease_expires_at = NULL, version = i.version + 1, "           \
    "           completed_by = i.claimed_by, "                                \
    "           result = $4 -> 'result', completed_at = now() "               \
    NGX_AQ_ITEM_WHERE_QUEUE_SQL                                               \
    NGX_AQ_ITEM_SELECT_SQL

#define NGX_AQ_SKIP_QUEUE_SQL                                                 \
    NGX_AQ_ITEM_HEAD_QUEUE_SQL                                                \
    NGX_AQ_SKIP_SET_SQL                                                       \
    NGX_AQ_ITEM_WHERE_QUEUE_SQL                                               \
    NGX_AQ_ITEM_SELECT_SQL


/*
 * Before each statement, in its pipeline, when the statement timeout is set
 * locally (annotation_queue_statement_timeout local): $1 text, in ms.
 */

#define NGX_AQ_SET_TIMEOUT_SQL                                                \
    "SELECT pg_catalog.set_config('statement_timeout', $1, true)"


/*
 * The status page's queue numbers (annotation_queue_status_queues): a row
 * per queue, in the order of the array, read by a worker at most once an
 * interval, never by a claim.
 *
 *   $1 uuid[]  the queues
 *
 * Returns available, claimed, expired, completed, failed (bigint, slots)
 * and oldest_available_age (float8 seconds, NULL: none available).
 */

#define NGX_AQ_QUEUE_STATS_SQL                                                \
    "SELECT s.available, s.claimed, s.expired, s.completed, s.failed, "       \
    "       s.oldest_available_age "                                          \
    "  FROM unnest($1::uuid[]) WITH ORDINALITY AS u (id, n), "                \
    "       LATERAL annotation_queue.queue_stats(u.id) AS s "                 \
    " ORDER BY u.n"


/* prepared on every connection, in the order of ngx_aq_stmt_e */

typedef struct {
    const char               *name;
    const char               *sql;
    int                       nparams;
    Oid                       types[NGX_AQ_MAX_PARAMS];
} ngx_aq_stmt_t;


#define NGX_AQ_BYTEA  17
#define NGX_AQ_INT8   20
#define NGX_AQ_UUID   2950
#define NGX_AQ_JSONB  3802
#define NGX_AQ_TEXT_ARRAY  1009
#define NGX_AQ_UUID_ARRAY  2951


static const ngx_aq_stmt_t  ngx_aq_stmts[NGX_AQ_NPREPARED] = {

    { "ngx_aq_claim", NGX_AQ_CLAIM_SQL, 3,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, 0 } },

    { "ngx_aq_extend", NGX_AQ_EXTEND_SQL, 4,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, NGX_AQ_INT8 } },

    { "ngx_aq_release", NGX_AQ_RELEASE_SQL, 3,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, 0 } },

    { "ngx_aq_complete", NGX_AQ_COMPLETE_SQL, 4,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, NGX_AQ_JSONB } },

    { "ngx_aq_claim_batch", NGX_AQ_CLAIM_BATCH_SQL, 3,
      { NGX_AQ_TEXT_ARRAY, NGX_AQ_UUID, NGX_AQ_INT8, 0 } },

    { "ngx_aq_skip", NGX_AQ_SKIP_SQL, 3,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, 0 } },

    { "ngx_aq_queue_stats", NGX_AQ_QUEUE_STATS_SQL, 1,
      { NGX_AQ_UUID_ARRAY, 0, 0, 0 } },

    /*
     * the item's statements naming the queue, NGX_AQ_STMT_*_QUEUE ($4 of
     * release and skip unused, always NULL: a type, so that it needs none)
     */

    { "ngx_aq_extend_queue", NGX_AQ_EXTEND_QUEUE_SQL, 5,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, NGX_AQ_INT8, NGX_AQ_UUID } },

    { "ngx_aq_release_queue", NGX_AQ_RELEASE_QUEUE_SQL, 5,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, NGX_AQ_INT8, NGX_AQ_UUID } },

    { "ngx_aq_complete_queue", NGX_AQ_COMPLETE_QUEUE_SQL, 5,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, NGX_AQ_JSONB, NGX_AQ_UUID } },

    { "ngx_aq_skip_queue", NGX_AQ_SKIP_QUEUE_SQL, 5,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, NGX_AQ_INT8, NGX_AQ_UUID } },

    { "ngx_aq_claim_wide", NGX_AQ_CLAIM_WIDE_SQL, 3,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, 0, 0 } },

    { "ngx_aq_claim_wait", NGX_AQ_CLAIM_WAIT_SQL, 3,
      { NGX_AQ_BYTEA, NGX_AQ_UUID, NGX_AQ_INT8, 0, 0 } }
};


#endif /* _NGX_AQ_SQL_H_INCLUDED_ */
