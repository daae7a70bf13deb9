-- The minimal claim (issue 9, item 3): what any one-statement claim on this
-- schema must do, and nothing more.  make bench runs it with pgbench beside
-- the module's own statement (bench/run.sh, the "minimal" column), with the
-- same parameters and the same fresh key per transaction:
--   key check     the live key by its digest (api_keys_key_hash_key)
--   ownership     the queue, if it belongs to the key's organisation
--   candidate     one available item, highest priority first, then first
--                 enqueued (items_available_idx), FOR UPDATE SKIP LOCKED
--   claim         UPDATE ... version + 1, attempts + 1, the lease, RETURNING
--                 the columns the module answers with
-- It does not resume a key's live claim, reclaim expired leases, nor say
-- why nothing was claimed (the module's key_ok and queue_ok: 401, 404 or
-- 409), nor format the timestamps: the module's statement does all of
-- those (README, "Claim semantics"); the difference is their price.
-- bench_statements (bench/lib.sh) prepends the key's \set lines and drops
-- these comment lines; :k is the key's index in bench.keys, as in
-- claim-sql.pl's form of the module's statement.
WITH k AS (
    SELECT id, org_id
      FROM annotation_queue.api_keys
     WHERE key_hash = (SELECT digest FROM bench.keys WHERE i = :k)
       AND revoked_at IS NULL
       AND (expires_at IS NULL OR expires_at > now())
), q AS (
    SELECT q.id, coalesce(q.lease, :lease * interval '1 millisecond') AS lease
      FROM annotation_queue.queues q, k
     WHERE q.id = :queue AND q.org_id = k.org_id
), cand AS (
    SELECT i.id, i.version
      FROM annotation_queue.items i
     WHERE i.queue_id = :queue AND i.status = 'available'
       AND EXISTS (SELECT 1 FROM q)
     ORDER BY i.priority DESC, i.seq
     LIMIT 1
       FOR UPDATE SKIP LOCKED
)
UPDATE annotation_queue.items i
   SET status = 'claimed', claimed_by = k.id, claimed_at = now(),
       lease_expires_at = now() + q.lease,
       version = i.version + 1, attempts = i.attempts + 1
  FROM cand, k, q
 WHERE i.id = cand.id AND i.version = cand.version
RETURNING i.id, i.queue_id, i.payload, i.version, i.claimed_at,
          i.lease_expires_at;
