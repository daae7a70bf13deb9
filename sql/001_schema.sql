-- 001_schema: organisations, API keys, queues and items.
--
-- Everything lives in schema annotation_queue.  Apply the files of sql/ in
-- order with psql -v ON_ERROR_STOP=1 to an empty database.

BEGIN;

-- gen_random_bytes() for API keys (a trusted extension since PostgreSQL 13).
CREATE EXTENSION IF NOT EXISTS pgcrypto;

CREATE SCHEMA annotation_queue;

CREATE TABLE annotation_queue.organisations (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- An API key is "aqk_" + 64 hex digits (256 random bits) + 8 hex digits of
-- checksum (the first 4 bytes of SHA-256 of the 64 digits).  Only the SHA-256
-- of the whole key is stored; key_prefix ("aqk_" + the first 8 random digits)
-- is public and names the key in logs.
CREATE TABLE annotation_queue.api_keys (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id      uuid        NOT NULL
                            REFERENCES annotation_queue.organisations (id)
                            ON DELETE CASCADE,
    rater       text        NOT NULL,
    key_prefix  text        NOT NULL,
    key_hash    bytea       NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);

CREATE INDEX api_keys_org_idx ON annotation_queue.api_keys (org_id);

CREATE TABLE annotation_queue.queues (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id      uuid        NOT NULL
                            REFERENCES annotation_queue.organisations (id)
                            ON DELETE CASCADE,
    name        text        NOT NULL,
    -- NULL: the module's annotation_queue_lease applies.
    lease       interval    CHECK (lease > interval '0'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

-- Items.  status: available -> claimed -> completed; a claimed item whose
-- lease_expires_at has passed is claimable again.  version is the optimistic
-- locking token: every claim increments it, and later writes must quote it.
--
-- claimed_by holds the api_keys.id of the holder.  It deliberately has no
-- foreign key: the referential check would take a KEY SHARE lock on the key's
-- row at every claim, serialising the claims of one key and writing to it.
--
-- The table is updated at every claim and every claim leaves a dead tuple
-- behind: keep room for HOT-less updates on the page and vacuum it early,
-- long before the default 20 % of dead rows.
CREATE TABLE annotation_queue.items (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    queue_id          uuid        NOT NULL
                                  REFERENCES annotation_queue.queues (id)
                                  ON DELETE CASCADE,
    seq               bigint      GENERATED ALWAYS AS IDENTITY,
    priority          integer     NOT NULL DEFAULT 0,
    payload           jsonb       NOT NULL,
    status            text        NOT NULL DEFAULT 'available'
                                  CHECK (status IN ('available', 'claimed',
                                                    'completed')),
    claimed_by        uuid,
    claimed_at        timestamptz,
    lease_expires_at  timestamptz,
    version           bigint      NOT NULL DEFAULT 0,
    attempts          integer     NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'claimed'
           OR (claimed_by IS NOT NULL AND lease_expires_at IS NOT NULL))
) WITH (fillfactor = 90,
        autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_insert_scale_factor = 0.05,
        autovacuum_analyze_scale_factor = 0.02);

-- The claim's main path: the head of a queue's available items, highest
-- priority first, then first enqueued (seq).  Partial, so claimed and
-- completed rows leave it.
CREATE INDEX items_available_idx
    ON annotation_queue.items (queue_id, priority DESC, seq)
    WHERE status = 'available';

-- Expired leases: the claimed items of a queue in the order their leases end.
CREATE INDEX items_lease_idx
    ON annotation_queue.items (queue_id, lease_expires_at)
    WHERE status = 'claimed';

-- Resume: the item a key holds in a queue.  Unique: a key holds at most one
-- item per queue, even when two of its claims run at the same time (the
-- second fails with unique_violation and the module runs it again, which
-- then resumes the first's item).
CREATE UNIQUE INDEX items_holder_idx
    ON annotation_queue.items (claimed_by, queue_id)
    WHERE status = 'claimed';

COMMIT;
