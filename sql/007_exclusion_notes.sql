-- 007_exclusion_notes: the claim and the skip note their exclusions
-- through the row they update, not with an INSERT of their own.
--
-- A claim that takes a slot of a queue of overlap > 1 sets items.exclude to
-- 'claimed', a skip sets it to 'skipped'; a BEFORE UPDATE trigger (only for
-- such rows: WHEN exclude IS NOT NULL) writes the exclusion of 006 (the
-- item, the key that claimed or skipped it, the queue, the reason) and
-- stores NULL: the column is never anything else at rest.  The same rows
-- as before, in the same transaction as the update; nothing changes for a
-- client.
--
-- Why: on Citus (sql/citus/), a statement that names one queue runs on the
-- worker that holds it as one task only if its CTEs are SELECT, UPDATE or
-- DELETE: the claim's and the skip's INSERT INTO exclusions would make
-- them multi-step distributed plans.  A trigger on a shard may write to a
-- co-located shard (exclusions is co-located with items there).

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

    INSERT INTO annotation_queue.exclusions AS x
           (item_id, key_id, queue_id, reason)
    VALUES (NEW.id, holder, NEW.queue_id, NEW.exclude)
    ON CONFLICT ON CONSTRAINT exclusions_pkey
    DO UPDATE SET reason = 'skipped'
         WHERE excluded.reason = 'skipped';

    NEW.exclude := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER items_note_exclusion
    BEFORE UPDATE ON annotation_queue.items
    FOR EACH ROW
    WHEN (NEW.exclude IS NOT NULL)
    EXECUTE FUNCTION annotation_queue.note_exclusion();

COMMIT;
