-- 002_api: the public SQL API for operators and back offices.

BEGIN;

CREATE FUNCTION annotation_queue.create_org(name text)
RETURNS uuid
LANGUAGE sql VOLATILE
AS $$
    INSERT INTO annotation_queue.organisations (name)
    VALUES (create_org.name)
    RETURNING id
$$;

-- The checksum of a key body (the 64 hex digits): 8 hex digits.
CREATE FUNCTION annotation_queue.key_checksum(body text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT substr(encode(sha256(convert_to(body, 'UTF8')), 'hex'), 1, 8)
$$;

-- The stored digest of a whole key.
CREATE FUNCTION annotation_queue.key_hash(api_key text)
RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT sha256(convert_to(api_key, 'UTF8'))
$$;

-- Creates a key for a rater of an organisation and returns it in plain text.
-- This is the only time the key is visible: only its digest is stored.
CREATE FUNCTION annotation_queue.create_api_key(org uuid, rater text,
                                                expires_at timestamptz
                                                    DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    body text := encode(gen_random_bytes(32), 'hex');
    k    text;
BEGIN
    IF rater IS NULL OR rater = '' THEN
        RAISE EXCEPTION 'rater must not be empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    k := 'aqk_' || body || annotation_queue.key_checksum(body);

    INSERT INTO annotation_queue.api_keys (org_id, rater, key_prefix,
                                           key_hash, expires_at)
    VALUES (org, create_api_key.rater, substr(k, 1, 12),
            annotation_queue.key_hash(k), create_api_key.expires_at);

    RETURN k;
END
$$;

-- Revokes a key; true when a live key was revoked.  Takes effect on the next
-- request: the module checks the key in the same statement as the claim.
CREATE FUNCTION annotation_queue.revoke_api_key(api_key text)
RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    WITH r AS (
        UPDATE annotation_queue.api_keys
           SET revoked_at = now()
         WHERE key_hash = annotation_queue.key_hash(api_key)
           AND revoked_at IS NULL
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM r)
$$;

CREATE FUNCTION annotation_queue.create_queue(org uuid, name text,
                                              lease interval
                                                  DEFAULT '15 minutes')
RETURNS uuid
LANGUAGE sql VOLATILE
AS $$
    INSERT INTO annotation_queue.queues (org_id, name, lease)
    VALUES (org, create_queue.name, create_queue.lease)
    RETURNING id
$$;

CREATE FUNCTION annotation_queue.enqueue(queue uuid, payload jsonb,
                                         priority integer DEFAULT 0)
RETURNS uuid
LANGUAGE sql VOLATILE
AS $$
    INSERT INTO annotation_queue.items (queue_id, payload, priority)
    VALUES (queue, enqueue.payload, coalesce(enqueue.priority, 0))
    RETURNING id
$$;

COMMIT;
