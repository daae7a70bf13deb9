-- citus/001_distribute: the schema of sql/[0-9]*.sql, distributed with
-- Citus.  Applied on the coordinator after sql/[0-9]*.sql and before any
-- data; never on plain PostgreSQL.  The workers must already be registered
-- (citus_add_node) and have the citus extension in the same database.
--
-- Sharded: items and exclusions, distributed by queue_id and co-located
-- (one shard of each holds a queue's rows, on one worker).  Global:
-- organisations, api_keys and queues, as reference tables (a copy on every
-- node, so that every statement of the module reads its key and queue on
-- the worker that holds the queue's items).  Every statement of the module
-- names the queue (the claim's $2, the item endpoints' "queue_id"), so
-- Citus routes each to the one worker of that queue as a whole: one task,
-- one local transaction there.
--
-- What changes against plain PostgreSQL:
--   * items' primary key is (queue_id, id, slot), exclusions'
--     (queue_id, item_id, key_id): Citus wants the distribution column in
--     every unique constraint.  An item id is unique within its queue (the
--     ids are random UUIDs: in practice everywhere);
--   * items.seq takes its values from a sequence instead of being an
--     identity column, which Citus refuses;
--   * every claim is the wide one (api_keys.has_exclusions of 008 is
--     true for every key, below);
--   * the NOTIFY trigger of 006 is gone: on a distributed table it would
--     fire on the workers, whose notifications nobody hears (the module
--     LISTENs on the coordinator), and Citus refuses it unless
--     citus.enable_unsafe_triggers is on.  enqueue() and requeue(), which
--     run on the coordinator, notify there themselves; a release or skip
--     through the module, or an operator's own UPDATE of items, notifies
--     nobody: a long-polling claim then finds the item when its own timer
--     ends (its wait, or the earliest lease end it saw), not at once.

BEGIN;

CREATE EXTENSION IF NOT EXISTS citus;

DROP TRIGGER items_notify_available ON annotation_queue.items;

-- seq: a sequence instead of the identity column
ALTER TABLE annotation_queue.items ALTER COLUMN seq DROP IDENTITY;
CREATE SEQUENCE annotation_queue.items_seq_seq AS bigint
    OWNED BY annotation_queue.items.seq;
SELECT setval('annotation_queue.items_seq_seq',
              coalesce(max(seq), 0) + 1, false)
  FROM annotation_queue.items;
ALTER TABLE annotation_queue.items
    ALTER COLUMN seq SET DEFAULT nextval('annotation_queue.items_seq_seq'),
    ALTER COLUMN seq SET NOT NULL;

-- keys with the distribution column
ALTER TABLE annotation_queue.items
    DROP CONSTRAINT items_pkey,
    ADD CONSTRAINT items_pkey PRIMARY KEY (queue_id, id, slot);

ALTER TABLE annotation_queue.exclusions
    DROP CONSTRAINT exclusions_pkey,
    ADD CONSTRAINT exclusions_pkey PRIMARY KEY (queue_id, item_id, key_id);

-- exclusions_key_idx (key_id, queue_id) stays: the batch's probe

-- api_keys.has_exclusions (sql/008) is true for every key: its trigger
-- would run on a worker, where it cannot write to api_keys (a reference
-- table, a copy on every node: remote writes), so no key's flag would be
-- set; every claim is the wide one (it probes exclusions itself).  And
-- the trigger that keeps a queue's overlap fixed is gone (a trigger on a
-- reference table): do not change a queue's overlap here.
ALTER TABLE annotation_queue.api_keys
    ALTER COLUMN has_exclusions SET DEFAULT true;
UPDATE annotation_queue.api_keys SET has_exclusions = true;
DROP TRIGGER exclusions_flag_key ON annotation_queue.exclusions;
DROP TRIGGER queues_overlap_fixed ON annotation_queue.queues;

-- items_note_exclusion (sql/007) runs on the shards: it writes to the
-- co-located shard of exclusions on the same worker, which Citus allows
-- from a trigger (it refuses remote writes there); Citus asks for this
-- setting to distribute a table with triggers
SET LOCAL citus.enable_unsafe_triggers = on;

SELECT create_reference_table('annotation_queue.organisations');
SELECT create_reference_table('annotation_queue.api_keys');
SELECT create_reference_table('annotation_queue.queues');
SELECT create_distributed_table('annotation_queue.items', 'queue_id');
SELECT create_distributed_table('annotation_queue.exclusions', 'queue_id',
                                colocate_with => 'annotation_queue.items');


-- enqueue and requeue notify from the coordinator (see above).  enqueue's
-- slots share one id, drawn here on the coordinator.

CREATE OR REPLACE FUNCTION annotation_queue.enqueue(queue uuid, payload jsonb,
                                                    priority integer
                                                        DEFAULT 0)
RETURNS uuid
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    item  uuid := gen_random_uuid();
    n     integer;
BEGIN
    SELECT q.overlap INTO n
      FROM annotation_queue.queues q
     WHERE q.id = queue;

    -- an unknown queue fails on the foreign key, as on plain PostgreSQL
    INSERT INTO annotation_queue.items (id, slot, queue_id, payload,
                                        priority)
    SELECT item, s.slot, queue, enqueue.payload,
           coalesce(enqueue.priority, 0)
      FROM generate_series(1, coalesce(n, 1)) AS s (slot);

    PERFORM pg_notify('annotation_queue', queue::text);

    RETURN item;
END
$$;

-- requeue names only the item: it reads every shard (an operator's call,
-- not the claim's path)
CREATE OR REPLACE FUNCTION annotation_queue.requeue(item uuid)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    queue  uuid;
    n      integer := 0;
BEGIN
    FOR queue IN
        UPDATE annotation_queue.items i
           SET status = 'available', claimed_by = NULL, claimed_at = NULL,
               lease_expires_at = NULL, expirations = 0,
               version = i.version + 1
          FROM annotation_queue.queues q
         WHERE i.id = item AND q.id = i.queue_id
           AND (i.status = 'failed'
                OR (i.status = 'claimed' AND i.lease_expires_at <= now()
                    AND i.expirations + 1 >= q.max_attempts))
        RETURNING i.queue_id
    LOOP
        n := n + 1;
    END LOOP;

    IF n > 0 THEN
        PERFORM pg_notify('annotation_queue', queue::text);
    END IF;

    RETURN n;
END
$$;

-- queue_stats as in 006, in PL/pgSQL: Citus cannot plan the parameters
-- of a SQL function's statements.  One router query, on the queue's worker.
CREATE OR REPLACE FUNCTION annotation_queue.queue_stats(queue uuid,
    OUT available bigint, OUT claimed bigint, OUT expired bigint,
    OUT completed bigint, OUT failed bigint,
    OUT oldest_available_age double precision)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    SELECT a.n, c.live, c.expired, d.completed, d.failed + c.failed,
           extract(epoch FROM now() - (
               SELECT i.created_at
                 FROM annotation_queue.items i
                WHERE i.queue_id = queue AND i.status = 'available'
                  AND i.seq = a.oldest
                LIMIT 1))::double precision
      INTO available, claimed, expired, completed, failed,
           oldest_available_age
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
               AND i.status IN ('completed', 'failed')) AS d;
END
$$;

-- revoke_api_key as in 002, in PL/pgSQL (the same reason)
CREATE OR REPLACE FUNCTION annotation_queue.revoke_api_key(api_key text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    UPDATE annotation_queue.api_keys
       SET revoked_at = now()
     WHERE key_hash = annotation_queue.key_hash(api_key)
       AND revoked_at IS NULL;

    RETURN FOUND;
END
$$;

COMMIT;
