-- 006_workflows: several ratings per item (overlap), skip, a limit on
-- expired leases (failed items and requeue), wake-ups for long-polling
-- claims, and the depth of a queue.
--
-- Overlap.  A queue of overlap k holds each item as k rows, its slots
-- (1..k), which share the item's id and payload: each slot is claimed,
-- extended, released and completed on its own, with its own version and
-- lease, by one rater at a time, so every path of the claim (priorities,
-- expired leases, resume) works on slots unchanged.  An item is done when
-- all its slots are completed.  A key may take one slot of an item: the
-- claim notes every slot it takes in a queue of overlap > 1 in
-- annotation_queue.exclusions, and never hands that key another slot of
-- the item.  In a queue of overlap 1 the claim notes nothing (a released
-- item may come back to the key that released it, as before).
--
-- Skip.  A skip releases the item and notes it in exclusions, whatever the
-- overlap: the item goes back to the others and never to that key again.
--
-- Retry limit.  A queue's max_attempts (NULL: no limit) is the number of
-- times a slot's lease may expire.  Every claim that takes a slot whose
-- lease expired counts an expiry (items.expirations); the claim that would
-- count the max_attempts-th one marks the slot failed instead of claiming
-- it (and the module runs the claim again).  requeue() puts failed slots
-- back.
--
-- On a large live table: the new primary key is built under an exclusive
-- lock (seconds per million rows); build items_done_idx first with CREATE
-- INDEX CONCURRENTLY, outside a transaction.

BEGIN;

ALTER TABLE annotation_queue.queues
    ADD COLUMN overlap       integer NOT NULL DEFAULT 1
                             CHECK (overlap BETWEEN 1 AND 1000),
    ADD COLUMN max_attempts  integer CHECK (max_attempts >= 1);

ALTER TABLE annotation_queue.items
    ADD COLUMN slot          smallint NOT NULL DEFAULT 1 CHECK (slot >= 1),
    ADD COLUMN expirations   integer  NOT NULL DEFAULT 0,
    ADD COLUMN completed_by  uuid;

ALTER TABLE annotation_queue.items
    DROP CONSTRAINT items_pkey,
    ADD PRIMARY KEY (id, slot);

ALTER TABLE annotation_queue.items
    DROP CONSTRAINT items_status_check,
    ADD CONSTRAINT items_status_check
        CHECK (status IN ('available', 'claimed', 'completed', 'failed'));

-- The depth of a queue (queue_stats): its completed and failed slots.  A
-- slot enters this index once, when it is done; the claim never touches it.
CREATE INDEX IF NOT EXISTS items_done_idx
    ON annotation_queue.items (queue_id, status)
    WHERE status IN ('completed', 'failed');

-- The items a key may no longer take: the slots it claimed in queues of
-- overlap > 1 (reason 'claimed') and the items it skipped ('skipped').
-- Read by the claim once per candidate (a probe of the primary key, all
-- three columns given), and when a batch of claims decides which keys it
-- can serve (exclusions_key_idx).
CREATE TABLE annotation_queue.exclusions (
    item_id     uuid        NOT NULL,
    key_id      uuid        NOT NULL,
    queue_id    uuid        NOT NULL
                            REFERENCES annotation_queue.queues (id)
                            ON DELETE CASCADE,
    reason      text        NOT NULL CHECK (reason IN ('claimed', 'skipped')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue_id, item_id, key_id)
);

-- Its predicate (true of every row) is for the batch, which states it: the
-- claim's probe does not, so that the planner cannot read all of a key's
-- exclusions at every candidate instead of probing the primary key.
CREATE INDEX exclusions_key_idx
    ON annotation_queue.exclusions (key_id, queue_id)
    WHERE reason IS NOT NULL;


-- The API: create_queue gains overlap and max_attempts.

DROP FUNCTION annotation_queue.create_queue(uuid, text, interval);

CREATE FUNCTION annotation_queue.create_queue(org uuid, name text,
                                              lease interval
                                                  DEFAULT '15 minutes',
                                              overlap integer DEFAULT 1,
                                              max_attempts integer
                                                  DEFAULT NULL)
RETURNS uuid
LANGUAGE sql VOLATILE
AS $$
    INSERT INTO annotation_queue.queues (org_id, name, lease, overlap,
                                         max_attempts)
    VALUES (org, create_queue.name, create_queue.lease,
            coalesce(create_queue.overlap, 1), create_queue.max_attempts)
    RETURNING id
$$;

-- An item of a queue of overlap k is k slots of one id.  An unknown queue
-- fails on the foreign key, as before.
CREATE OR REPLACE FUNCTION annotation_queue.enqueue(queue uuid, payload jsonb,
                                                    priority integer
                                                        DEFAULT 0)
RETURNS uuid
LANGUAGE sql VOLATILE
AS $$
    INSERT INTO annotation_queue.items (id, slot, queue_id, payload,
                                        priority)
    SELECT u.id, s.slot, queue, enqueue.payload,
           coalesce(enqueue.priority, 0)
      FROM (SELECT gen_random_uuid() AS id) AS u,
           generate_series(1, coalesce((SELECT q.overlap
                                          FROM annotation_queue.queues q
                                         WHERE q.id = queue), 1))
               AS s (slot)
     ORDER BY s.slot
    RETURNING id
$$;

-- A failed item's slots back to the queue, their expiries forgotten: the
-- number of slots put back (0: the item has no failed slot).  A slot whose
-- last allowed lease expired and that no claim has met since counts as
-- failed.
CREATE FUNCTION annotation_queue.requeue(item uuid)
RETURNS integer
LANGUAGE sql VOLATILE
AS $$
    WITH r AS (
        UPDATE annotation_queue.items i
           SET status = 'available', claimed_by = NULL, claimed_at = NULL,
               lease_expires_at = NULL, expirations = 0,
               version = i.version + 1
          FROM annotation_queue.queues q
         WHERE i.id = item AND q.id = i.queue_id
           AND (i.status = 'failed'
                OR (i.status = 'claimed' AND i.lease_expires_at <= now()
                    AND i.expirations + 1 >= q.max_attempts))
        RETURNING 1
    )
    SELECT count(*)::integer FROM r
$$;

-- The depth of a queue, counted in slots (an item of overlap k counts k
-- times): available; claimed with a live lease; claimed with an expired
-- lease that a claim may still take (expired); completed; failed; and the
-- age in seconds of the oldest available slot (NULL: none).  It reads
-- every available, claimed and done entry of the queue's indexes (about
-- 100 ms a million): the status page asks every few seconds, never a claim.
CREATE FUNCTION annotation_queue.queue_stats(queue uuid,
    OUT available bigint, OUT claimed bigint, OUT expired bigint,
    OUT completed bigint, OUT failed bigint,
    OUT oldest_available_age double precision)
LANGUAGE sql STABLE
AS $$
    SELECT a.n, c.live, c.expired, d.completed, d.failed + c.failed,
           extract(epoch FROM now() - (
               SELECT i.created_at
                 FROM annotation_queue.items i
                WHERE i.queue_id = queue AND i.status = 'available'
                  AND i.seq = a.oldest
                LIMIT 1))::double precision
      FROM (SELECT count(*) AS n, min(i.seq) AS oldest
              FROM annotation_queue.items i
             WHERE i.queue_id = queue AND i.status = 'available') AS a,
           (SELECT count(*) FILTER (WHERE i.lease_expires_at > now())
                       AS live,
                   count(*) FILTER (WHERE i.lease_expires_at <= now()
                                    AND NOT coalesce(i.expirations + 1
                                                     >= q.max_attempts,
                                                     false))
                       AS expired,
                   count(*) FILTER (WHERE i.lease_expires_at <= now()
                                    AND i.expirations + 1 >= q.max_attempts)
                       AS failed
              FROM annotation_queue.items i
              JOIN annotation_queue.queues q ON q.id = i.queue_id
             WHERE i.queue_id = queue AND i.status = 'claimed'
               AND i.lease_expires_at IS NOT NULL) AS c,
           (SELECT count(*) FILTER (WHERE i.status = 'completed')
                       AS completed,
                   count(*) FILTER (WHERE i.status = 'failed') AS failed
              FROM annotation_queue.items i
             WHERE i.queue_id = queue
               AND i.status IN ('completed', 'failed')) AS d
$$;

-- Results, a row per rating: the slot, who completed it, what they said.
CREATE VIEW annotation_queue.results AS
    SELECT i.id AS item_id, i.queue_id, i.slot, i.completed_by AS key_id,
           a.rater, i.result, i.completed_at
      FROM annotation_queue.items i
      LEFT JOIN annotation_queue.api_keys a ON a.id = i.completed_by
     WHERE i.status = 'completed';


-- Long-polling claims: every change that makes a slot claimable (enqueue,
-- release, skip, requeue, or an operator's own UPDATE) notifies channel
-- annotation_queue with the queue's id; nginx workers LISTEN there and
-- wake the claims waiting on that queue.  Notifications of one transaction
-- with the same queue are delivered once.  A claim sets status to
-- 'claimed': the trigger's condition is false and it costs the claim no
-- call.  Expired leases notify nobody: the workers keep a timer at the
-- earliest lease end the claims they ran saw.
CREATE FUNCTION annotation_queue.notify_available()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('annotation_queue', NEW.queue_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER items_notify_available
    AFTER INSERT OR UPDATE OF status ON annotation_queue.items
    FOR EACH ROW
    WHEN (NEW.status = 'available')
    EXECUTE FUNCTION annotation_queue.notify_available();

COMMIT;
