-- 003_lifecycle: what a rater does with a claimed item: extend its lease,
-- release it back to the queue, or complete it with a result.

BEGIN;

ALTER TABLE annotation_queue.items
    ADD COLUMN result       jsonb,
    ADD COLUMN completed_at timestamptz;

COMMIT;
