-- 005_autovacuum: vacuum a busy queue by the number of claims, not by the
-- size of the table, and always clean its indexes.
--
-- Every claim leaves a dead entry at the head of items_available_idx, where
-- the next claim starts reading; until a vacuum removes them each claim
-- steps over all of them, and the claim rate decays (measured: from about
-- 1,000 to 200 claims/s within a minute).  001 set a scale factor of 1 %:
-- on a table of 10 million items that is 100,000 claims between vacuums.
-- Here a vacuum is due after 5,000 dead rows whatever the table's size.
--
-- vacuum_index_cleanup = on: by default (auto) a vacuum skips the indexes
-- when fewer than 2 % of the table's pages hold dead rows, which on a large
-- table is always the case between two vacuums of a queue whose dead rows
-- sit together at its head, so the dead index entries that slow the claim
-- down would stay.  The price: each vacuum reads the table's indexes in
-- full (seconds on a table of 10 million items).
--
-- autovacuum_naptime (how often the launcher looks, 1 minute by default)
-- cannot be set per table: for a busy queue set it server-wide to 10s
-- (README, "Running a busy queue").

BEGIN;

ALTER TABLE annotation_queue.items SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    vacuum_index_cleanup = on
);

COMMIT;
