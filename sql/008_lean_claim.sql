-- 008_lean_claim: what lets the one-rater claim stay the statement it was
-- before the workflows (ngx_aq_sql.h, NGX_AQ_CLAIM_SQL) and still know
-- when to leave a claim to the wide one (NGX_AQ_CLAIM_WIDE_SQL).
--
-- api_keys.has_exclusions: the key has an exclusion (sql/006), in any
-- queue: it skipped an item or took a slot of a queue of overlap > 1.  The
-- lean claim reads it on the key's row, which it reads anyway, and sends
-- such a key's claims to the wide claim, which probes exclusions for
-- every candidate.  A probe of exclusions in the lean claim itself, even
-- of an empty table, made every claim 15 to 25 microseconds slower, about
-- 7 of them for the table being in the plan at all, read or not
-- (bench/README.md, "Two statements side by side").  Once set it stays:
-- exclusions are never removed but with their queue, and a key that had
-- some is likely to have more.
--
-- A queue's overlap is fixed when create_queue makes it: enqueue makes an
-- item's slots from it, and the lean claim, run for queues of overlap 1,
-- takes slot 1 of an item and nothing else.  Changing it later would leave
-- items with the wrong number of slots; the trigger refuses it.

BEGIN;

ALTER TABLE annotation_queue.api_keys
    ADD COLUMN has_exclusions boolean NOT NULL DEFAULT false;

UPDATE annotation_queue.api_keys a
   SET has_exclusions = true
 WHERE EXISTS (SELECT 1 FROM annotation_queue.exclusions x
                WHERE x.key_id = a.id);

-- Set by a trigger on exclusions itself, so that every exclusion, the
-- claim's and the skip's notes (sql/007) as much as an operator's own
-- INSERT, sets it; the UPDATE touches the key's row once in its life
-- (afterwards its WHERE is false).  SECURITY DEFINER: the module's role
-- reads api_keys and never needs to write it.
CREATE FUNCTION annotation_queue.flag_key_exclusions()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE annotation_queue.api_keys
       SET has_exclusions = true
     WHERE id = NEW.key_id AND NOT has_exclusions;

    RETURN NULL;
END
$$;

CREATE TRIGGER exclusions_flag_key
    AFTER INSERT ON annotation_queue.exclusions
    FOR EACH ROW
    EXECUTE FUNCTION annotation_queue.flag_key_exclusions();

CREATE FUNCTION annotation_queue.overlap_fixed()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'the overlap of queue % is fixed (%): make a new queue',
                    OLD.id, OLD.overlap
          USING ERRCODE = 'check_violation';
END
$$;

CREATE TRIGGER queues_overlap_fixed
    BEFORE UPDATE OF overlap ON annotation_queue.queues
    FOR EACH ROW
    WHEN (NEW.overlap IS DISTINCT FROM OLD.overlap)
    EXECUTE FUNCTION annotation_queue.overlap_fixed();

COMMIT;
