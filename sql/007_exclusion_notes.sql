-- 007_exclusion_notes: the claim and the skip note their exclusions
-- through the row they update, not with an INSERT of their own.
--
-- The wide claim, when it takes a slot of a queue of overlap > 1, sets
-- items.exclude to 'claimed'; a skip sets it to 'skipped'.  An AFTER
-- UPDATE OF exclude trigger (WHEN it is not NULL) writes the exclusion of
-- 006: the item, the key that claimed (NEW.claimed_by) or skipped
-- (OLD.claimed_by) it, the queue, the reason.  At rest the column holds the
-- last note made through the row; nothing reads it.  The same rows as an
-- INSERT of the statement would write, in the same transaction; nothing
-- changes for a client.
--
-- Why a trigger: on Citus (sql/citus/), a statement that names one queue
-- runs on the worker that holds it as one task only if its CTEs are
-- SELECT, UPDATE or DELETE: the claim's and the skip's INSERT INTO
-- exclusions would make them multi-step distributed plans.  A trigger on a
-- shard may write to a co-located shard (exclusions is co-located with
-- items there).
--
-- Why AFTER UPDATE OF exclude: a BEFORE UPDATE row trigger, whatever its
-- WHEN, makes every UPDATE of items fetch and lock the old row once more
-- before the trigger is even considered; every claim paid for it.  An
-- AFTER trigger on a column is not even considered by an UPDATE that does
-- not set that column: the lean claim, the batch, extend, release and
-- complete do not.

BEGIN;

ALTER TABLE annotation_queue.items
    ADD COLUMN exclude text CHECK (exclude IN ('claimed', 'skipped'));

-- 'claimed': the new holder may not take another slot of the item;
-- 'skipped': the old holder may never take the item again.  A skip
-- overrides a claim's note; a claim never overrides a skip's.
CREATE FUNCTION annotation_queue.note_exclusion()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    holder  uuid := OLD.claimed_by;
BEGIN
    IF NEW.exclude = 'claimed' THEN
        holder := NEW.claimed_by;
    END IF;

    IF holder IS NULL THEN
        RETURN NULL;
    END IF;

    INSERT INTO annotation_queue.exclusions AS x
           (item_id, key_id, queue_id, reason)
    VALUES (NEW.id, holder, NEW.queue_id, NEW.exclude)
    ON CONFLICT ON CONSTRAINT exclusions_pkey
    DO UPDATE SET reason = 'skipped'
         WHERE excluded.reason = 'skipped';

    RETURN NULL;
END
$$;

CREATE TRIGGER items_note_exclusion
    AFTER UPDATE OF exclude ON annotation_queue.items
    FOR EACH ROW
    WHEN (NEW.exclude IS NOT NULL)
    EXECUTE FUNCTION annotation_queue.note_exclusion();

COMMIT;
