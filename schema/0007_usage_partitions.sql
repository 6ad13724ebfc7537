-- 0007: usage_records partitioned by day; hourly and daily rollups kept exact by triggers
-- (README "Usage records" / "Retention and partitions").
--
-- * usage_records becomes a table partitioned by RANGE (created_at), one partition per
--   UTC day (usage_records_pYYYYMMDD) plus usage_records_default, which takes a row
--   whose day has no partition yet, so no row is ever refused. A partition's primary
--   key must include the partition key: it is (request_id, created_at). Every writer of
--   a request's record sets created_at from the request's start time (facts.started),
--   so two records of one request still meet on that key, and the writer's
--   ON CONFLICT ... DO UPDATE keeps ranking them by recorded_by.
-- * usage_records_create_partition(day) adds one day (moving that day's rows out of the
--   DEFAULT partition); the ext_proc server calls it for the days ahead, and for any day
--   found in the DEFAULT partition (ext_proc/usage/partitions.py); `ext-proc usage
--   prune` drops old days.
-- * usage_rollup_hourly / usage_rollup_daily: totals per UTC hour / day and group (org,
--   app, key, environment, model, provider, deployment, decision, status class),
--   updated by statement triggers on usage_records inside the transaction that changes
--   the rows: an insert adds its rows, a delete subtracts them, an update (a record
--   replaced by a higher-ranked one) subtracts the old row and adds the new one. Late
--   rows (spool replay, fallback records) are counted when they land, exactly once.
-- * An existing table is converted: its rows are copied into the partitions, the
--   rollups computed from them. The copy holds the table's lock: writers wait (and
--   spool after their write timeout) until the migration commits.
--
-- Needs PostgreSQL 15 (UNIQUE NULLS NOT DISTINCT: a NULL org is one group, not many).

DO $$
BEGIN
    IF current_setting('server_version_num')::integer < 150000 THEN
        RAISE EXCEPTION 'ext-proc needs PostgreSQL 15 or later (UNIQUE NULLS NOT DISTINCT); this server is %',
            current_setting('server_version');
    END IF;
END
$$;

-- 1. The unpartitioned table steps aside (its index names are needed by the new one).

ALTER TABLE usage_records RENAME TO usage_records_unpartitioned;
ALTER TABLE usage_records_unpartitioned
    RENAME CONSTRAINT usage_records_pkey TO usage_records_unpartitioned_pkey;
ALTER INDEX IF EXISTS usage_records_created_at_idx
    RENAME TO usage_records_unpartitioned_created_at_idx;
ALTER INDEX IF EXISTS usage_records_org_created_at_idx
    RENAME TO usage_records_unpartitioned_org_created_at_idx;
ALTER INDEX IF EXISTS usage_records_app_created_at_idx
    RENAME TO usage_records_unpartitioned_app_created_at_idx;
ALTER INDEX IF EXISTS usage_records_model_created_at_idx
    RENAME TO usage_records_unpartitioned_model_created_at_idx;

-- 2. The partitioned table: the same columns in the same order (LIKE copies them with
-- their defaults, CHECK constraints and comments, including any an operator added).

CREATE TABLE usage_records (
    LIKE usage_records_unpartitioned
    INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMMENTS INCLUDING STORAGE
) PARTITION BY RANGE (created_at);

ALTER TABLE usage_records
    ADD CONSTRAINT usage_records_pkey PRIMARY KEY (request_id, created_at);
CREATE INDEX usage_records_created_at_idx ON usage_records (created_at);
CREATE INDEX usage_records_org_created_at_idx ON usage_records (org_id, created_at);
CREATE INDEX usage_records_app_created_at_idx ON usage_records (app_id, created_at);
CREATE INDEX usage_records_model_created_at_idx ON usage_records (model, created_at);

COMMENT ON TABLE usage_records IS
    'One row per request that reached the gateway, denied ones included (ext-proc). '
    'Partitioned by UTC day of created_at; write through this table, not its partitions '
    '(the rollups follow it).';

CREATE TABLE usage_records_default PARTITION OF usage_records DEFAULT;

-- The partitions and their bounds (lo/hi NULL: the DEFAULT partition, or MINVALUE/MAXVALUE).
CREATE VIEW usage_records_partitions AS
SELECT c.oid::regclass AS partition,
       c.relname AS name,
       substring(b.expr FROM $re$FROM \('([^']*)'\)$re$)::timestamptz AS lo,
       substring(b.expr FROM $re$TO \('([^']*)'\)$re$)::timestamptz AS hi,
       b.expr = 'DEFAULT' AS is_default
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) b
WHERE i.inhparent = 'usage_records'::regclass;

-- One UTC day's partition, created unless a partition covers that day already; returns
-- its name, or NULL when there was nothing to do. Rows of that day waiting in the
-- DEFAULT partition move into it (straight from partition to partition: the rollups,
-- which count them already, do not see the move). Built as a plain table and then
-- attached, which locks usage_records only against other DDL, not against writers;
-- the DEFAULT partition is locked while its rows move.
CREATE FUNCTION usage_records_create_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    day_start timestamptz := day::timestamp AT TIME ZONE 'UTC';
    day_end   timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
    part      text := 'usage_records_p' || to_char(day, 'YYYYMMDD');
BEGIN
    IF EXISTS (
        SELECT 1 FROM usage_records_partitions p
        WHERE NOT p.is_default
          AND coalesce(p.lo, '-infinity') < day_end AND coalesce(p.hi, 'infinity') > day_start
    ) THEN
        RETURN NULL;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I (LIKE usage_records INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
        'INCLUDING STORAGE)', part);
    -- Proves the bounds to ATTACH, which then need not scan the new table.
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (created_at >= %L AND created_at < %L)',
                   part, part || '_bounds', day_start, day_end);
    LOCK TABLE usage_records_default IN ACCESS EXCLUSIVE MODE;
    EXECUTE format(
        'WITH moved AS (DELETE FROM usage_records_default '
        'WHERE created_at >= %L AND created_at < %L RETURNING *) '
        'INSERT INTO %I SELECT * FROM moved', day_start, day_end, part);
    EXECUTE format('ALTER TABLE usage_records ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, day_start, day_end);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, part || '_bounds');
    RETURN part;
END
$$;

-- 3. The rows already recorded: a partition for each day that has some, then the copy.

SELECT usage_records_create_partition(day)
FROM (SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date AS day
      FROM usage_records_unpartitioned) days
ORDER BY day;
-- Today and tomorrow, so a fresh database does not start writing into DEFAULT; the
-- server keeps a week ahead from here on.
SELECT usage_records_create_partition((now() AT TIME ZONE 'UTC')::date + n)
FROM generate_series(0, 1) n;

INSERT INTO usage_records SELECT * FROM usage_records_unpartitioned;
DROP TABLE usage_records_unpartitioned;

-- 4. Rollups.

-- Latency as the rollups count it: NULL when unknown or not a finite number.
CREATE FUNCTION usage_latency(ms double precision) RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN ms IN ('NaN', 'Infinity', '-Infinity') THEN NULL ELSE ms END;

-- The latency histogram's bucket of a latency: 0 below 1 ms, then four buckets per
-- doubling (bucket k >= 1 holds [2^((k-1)/4), 2^(k/4)) ms, each 19% wide), and 81 for
-- 2^20 ms (17.5 minutes) and over. ext_proc/usage/rollups.py reads p95 from these.
CREATE FUNCTION usage_latency_bucket(ms double precision) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE
        WHEN usage_latency(ms) IS NULL THEN NULL
        WHEN ms < 1 THEN 0
        ELSE least(1 + floor(ln(ms) * 5.770780163555854::float8)::integer, 81)  -- 4 / ln(2)
    END;

-- A histogram is packed into one numeric, bucket k's count in decimal digits
-- 16k .. 16k+15: adding packed histograms adds them bucket by bucket (no count reaches
-- 10^16), so sum() merges histograms at the cost of one numeric addition per row. The
-- unit of bucket k is 10^(16k) (0 for no bucket).
CREATE FUNCTION usage_latency_unit(bucket integer) RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN coalesce(('{1e0,1e16,1e32,1e48,1e64,1e80,1e96,1e112,1e128,1e144,1e160,1e176,1e192,1e208,1e224,1e240,1e256,1e272,1e288,1e304,1e320,1e336,1e352,1e368,1e384,1e400,1e416,1e432,1e448,1e464,1e480,1e496,1e512,1e528,1e544,1e560,1e576,1e592,1e608,1e624,1e640,1e656,1e672,1e688,1e704,1e720,1e736,1e752,1e768,1e784,1e800,1e816,1e832,1e848,1e864,1e880,1e896,1e912,1e928,1e944,1e960,1e976,1e992,1e1008,1e1024,1e1040,1e1056,1e1072,1e1088,1e1104,1e1120,1e1136,1e1152,1e1168,1e1184,1e1200,1e1216,1e1232,1e1248,1e1264,1e1280,1e1296}'::numeric[])[bucket + 1], 0);

CREATE FUNCTION usage_status_class(status integer) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (status / 100)::text || 'xx';

CREATE TABLE usage_rollup_hourly (
    bucket                timestamptz   NOT NULL,  -- the UTC hour
    org_id                text,
    app_id                text,
    key_id                text,
    environment           text,
    model                 text,
    provider              text,
    deployment            text,
    decision              text          NOT NULL,
    status_class          text,                    -- '2xx', '4xx', ...; NULL: no status
    requests              bigint        NOT NULL,
    prompt_tokens         bigint        NOT NULL,
    completion_tokens     bigint        NOT NULL,
    total_tokens          bigint        NOT NULL,
    cached_tokens         bigint        NOT NULL,
    cache_creation_tokens bigint        NOT NULL,
    reasoning_tokens      bigint        NOT NULL,
    cost_usd              numeric(30, 10) NOT NULL,  -- over the rows that have a cost
    cost_rows             bigint        NOT NULL,  -- how many have one (0: cost unknown)
    estimated_rows        bigint        NOT NULL,  -- tokens_estimated
    latency_rows          bigint        NOT NULL,  -- rows with a latency
    latency_sum_ms        numeric       NOT NULL,  -- exact, so subtracting a row undoes it
    latency_histogram     numeric       NOT NULL,  -- packed (usage_latency_unit)
    CONSTRAINT usage_rollup_hourly_key UNIQUE NULLS NOT DISTINCT
        (bucket, org_id, app_id, key_id, environment, model, provider, deployment,
         decision, status_class)
) WITH (fillfactor = 80);  -- room for HOT updates: every batch updates its groups

CREATE TABLE usage_rollup_daily (
    LIKE usage_rollup_hourly INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    CONSTRAINT usage_rollup_daily_key UNIQUE NULLS NOT DISTINCT
        (bucket, org_id, app_id, key_id, environment, model, provider, deployment,
         decision, status_class)
) WITH (fillfactor = 80);

COMMENT ON TABLE usage_rollup_hourly IS
    'usage_records totals per UTC hour and group, kept exact by triggers (ext-proc)';
COMMENT ON TABLE usage_rollup_daily IS
    'usage_records totals per UTC day and group, kept exact by triggers (ext-proc)';
COMMENT ON COLUMN usage_rollup_hourly.bucket IS 'start of the UTC hour';
COMMENT ON COLUMN usage_rollup_daily.bucket IS 'start of the UTC day';

-- Rows changed in usage_records wait here (weight 1: added, -1: taken out, e.g. a row
-- replaced by a higher-ranked record of its request) until usage_rollups_fold moves
-- them into the rollups. The triggers append to it in the writer's transaction: a
-- plain append, no index, no lock on a shared rollup row, so writers never wait for
-- one another. Readers add what waits here to the rollups (ext_proc/usage/rollups.py),
-- so totals are exact whether or not the fold has run.
CREATE TABLE usage_rollup_pending (
    weight                smallint      NOT NULL,
    created_at            timestamptz   NOT NULL,
    org_id                text,
    app_id                text,
    key_id                text,
    environment           text,
    model                 text,
    provider              text,
    deployment            text,
    decision              text          NOT NULL,
    status_code           integer,
    prompt_tokens         integer,
    completion_tokens     integer,
    total_tokens          integer,
    cached_tokens         integer,
    cache_creation_tokens integer,
    reasoning_tokens      integer,
    cost_usd              numeric(20, 10),
    tokens_estimated      boolean       NOT NULL,
    latency_ms            double precision
);
COMMENT ON TABLE usage_rollup_pending IS
    'usage_records changes not folded into the rollups yet (ext-proc)';

CREATE FUNCTION usage_rollups_track() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO usage_rollup_pending
        SELECT 1, created_at, org_id, app_id, key_id, environment, model, provider,
               deployment, decision, status_code, prompt_tokens, completion_tokens,
               total_tokens, cached_tokens, cache_creation_tokens, reasoning_tokens,
               cost_usd, tokens_estimated, latency_ms
        FROM changed;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO usage_rollup_pending
        SELECT -1, created_at, org_id, app_id, key_id, environment, model, provider,
               deployment, decision, status_code, prompt_tokens, completion_tokens,
               total_tokens, cached_tokens, cache_creation_tokens, reasoning_tokens,
               cost_usd, tokens_estimated, latency_ms
        FROM removed;
    END IF;
    RETURN NULL;
END
$$;

-- Transition tables need one trigger per event. These fire for statements on
-- usage_records itself; a statement aimed at one partition, and dropping a partition
-- (retention), leave the rollups as they are.
CREATE TRIGGER usage_rollups_insert AFTER INSERT ON usage_records
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION usage_rollups_track();
CREATE TRIGGER usage_rollups_update AFTER UPDATE ON usage_records
    REFERENCING OLD TABLE AS removed NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION usage_rollups_track();
CREATE TRIGGER usage_rollups_delete AFTER DELETE ON usage_records
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION usage_rollups_track();

CREATE FUNCTION usage_rollups_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE usage_rollup_hourly, usage_rollup_daily, usage_rollup_pending;
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_rollups_truncate AFTER TRUNCATE ON usage_records
    FOR EACH STATEMENT EXECUTE FUNCTION usage_rollups_truncate();

-- Move up to max_rows pending rows into the rollups, in one statement: they leave the
-- pending table in the transaction that adds them to the rollups, so each is counted
-- exactly once. Returns how many moved; -1 when another fold is running (they take
-- turns: pg_try_advisory_xact_lock). The ext_proc server folds every few seconds.
CREATE FUNCTION usage_rollups_fold(max_rows integer DEFAULT 100000) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(8463221784197426276) THEN  -- 'usg_fold'
        RETURN -1;
    END IF;
    WITH taken AS (
        DELETE FROM usage_rollup_pending
        WHERE ctid = ANY (ARRAY(SELECT ctid FROM usage_rollup_pending LIMIT max_rows))
        RETURNING *
    ), fine AS (
        -- Per group and latency bucket first: the packed histogram (a long numeric) is
        -- then added once per bucket, not once per row.
        SELECT date_trunc('hour', created_at, 'UTC') AS bucket, org_id, app_id, key_id,
               environment, model, provider, deployment, decision,
               usage_status_class(status_code) AS status_class,
               usage_latency_bucket(latency_ms) AS latency_bucket,
               sum(weight) AS requests,
               sum(weight * prompt_tokens) AS prompt_tokens,
               sum(weight * completion_tokens) AS completion_tokens,
               sum(weight * total_tokens) AS total_tokens,
               sum(weight * cached_tokens) AS cached_tokens,
               sum(weight * cache_creation_tokens) AS cache_creation_tokens,
               sum(weight * reasoning_tokens) AS reasoning_tokens,
               sum(weight * cost_usd) AS cost_usd,
               sum(weight) FILTER (WHERE cost_usd IS NOT NULL) AS cost_rows,
               sum(weight) FILTER (WHERE tokens_estimated) AS estimated_rows,
               sum(weight) FILTER (WHERE usage_latency(latency_ms) IS NOT NULL) AS latency_rows,
               sum(weight * usage_latency(latency_ms)::numeric) AS latency_sum_ms,
               count(*) AS taken
        FROM taken
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
    ), delta AS MATERIALIZED (
        SELECT bucket, org_id, app_id, key_id, environment, model, provider, deployment,
               decision, status_class,
               sum(requests) AS requests,
               coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
               coalesce(sum(completion_tokens), 0) AS completion_tokens,
               coalesce(sum(total_tokens), 0) AS total_tokens,
               coalesce(sum(cached_tokens), 0) AS cached_tokens,
               coalesce(sum(cache_creation_tokens), 0) AS cache_creation_tokens,
               coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
               coalesce(sum(cost_usd), 0) AS cost_usd,
               coalesce(sum(cost_rows), 0) AS cost_rows,
               coalesce(sum(estimated_rows), 0) AS estimated_rows,
               coalesce(sum(latency_rows), 0) AS latency_rows,
               coalesce(sum(latency_sum_ms), 0) AS latency_sum_ms,
               coalesce(sum(latency_rows * usage_latency_unit(latency_bucket)), 0)
                   AS latency_histogram,
               sum(taken) AS taken
        FROM fine
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
    ), hourly AS (
        INSERT INTO usage_rollup_hourly AS t
        SELECT bucket, org_id, app_id, key_id, environment, model, provider, deployment,
               decision, status_class, requests, prompt_tokens, completion_tokens,
               total_tokens, cached_tokens, cache_creation_tokens, reasoning_tokens,
               cost_usd, cost_rows, estimated_rows, latency_rows, latency_sum_ms,
               latency_histogram
        FROM delta
        ON CONFLICT ON CONSTRAINT usage_rollup_hourly_key DO UPDATE SET
            requests = t.requests + EXCLUDED.requests,
            prompt_tokens = t.prompt_tokens + EXCLUDED.prompt_tokens,
            completion_tokens = t.completion_tokens + EXCLUDED.completion_tokens,
            total_tokens = t.total_tokens + EXCLUDED.total_tokens,
            cached_tokens = t.cached_tokens + EXCLUDED.cached_tokens,
            cache_creation_tokens = t.cache_creation_tokens + EXCLUDED.cache_creation_tokens,
            reasoning_tokens = t.reasoning_tokens + EXCLUDED.reasoning_tokens,
            cost_usd = t.cost_usd + EXCLUDED.cost_usd,
            cost_rows = t.cost_rows + EXCLUDED.cost_rows,
            estimated_rows = t.estimated_rows + EXCLUDED.estimated_rows,
            latency_rows = t.latency_rows + EXCLUDED.latency_rows,
            latency_sum_ms = t.latency_sum_ms + EXCLUDED.latency_sum_ms,
            latency_histogram = t.latency_histogram + EXCLUDED.latency_histogram
    ), daily AS (
        INSERT INTO usage_rollup_daily AS t
        SELECT date_trunc('day', bucket, 'UTC'), org_id, app_id, key_id, environment, model,
               provider, deployment, decision, status_class, sum(requests),
               sum(prompt_tokens), sum(completion_tokens), sum(total_tokens),
               sum(cached_tokens), sum(cache_creation_tokens), sum(reasoning_tokens),
               sum(cost_usd), sum(cost_rows), sum(estimated_rows), sum(latency_rows),
               sum(latency_sum_ms), sum(latency_histogram)
        FROM delta
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
        ON CONFLICT ON CONSTRAINT usage_rollup_daily_key DO UPDATE SET
            requests = t.requests + EXCLUDED.requests,
            prompt_tokens = t.prompt_tokens + EXCLUDED.prompt_tokens,
            completion_tokens = t.completion_tokens + EXCLUDED.completion_tokens,
            total_tokens = t.total_tokens + EXCLUDED.total_tokens,
            cached_tokens = t.cached_tokens + EXCLUDED.cached_tokens,
            cache_creation_tokens = t.cache_creation_tokens + EXCLUDED.cache_creation_tokens,
            reasoning_tokens = t.reasoning_tokens + EXCLUDED.reasoning_tokens,
            cost_usd = t.cost_usd + EXCLUDED.cost_usd,
            cost_rows = t.cost_rows + EXCLUDED.cost_rows,
            estimated_rows = t.estimated_rows + EXCLUDED.estimated_rows,
            latency_rows = t.latency_rows + EXCLUDED.latency_rows,
            latency_sum_ms = t.latency_sum_ms + EXCLUDED.latency_sum_ms,
            latency_histogram = t.latency_histogram + EXCLUDED.latency_histogram
    )
    SELECT coalesce(sum(taken), 0) INTO moved FROM delta;
    RETURN moved;
END
$$;

-- Recompute the rollups of the UTC days overlapping [since, until) (NULL: unbounded)
-- from the rows: for rows written around the triggers (straight into a partition, or
-- with triggers disabled), and for the rows this migration converts. One pass over the
-- rows (not through usage_rollup_pending), so it costs about what one query over them
-- costs. Writers wait while it runs (the table is locked in SHARE mode); what was
-- pending for those days is dropped (the rows count it). Returns the rows counted.
-- Days already gone from usage_records (retention) lose their rollups too: give a
-- range that starts after them.
CREATE FUNCTION usage_rollups_rebuild(since timestamptz DEFAULT NULL,
                                      until timestamptz DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    range_lo timestamptz := coalesce(date_trunc('day', since, 'UTC'), '-infinity');
    range_hi timestamptz := coalesce(
        date_trunc('day', until - interval '1 microsecond', 'UTC') + interval '24 hours',
        'infinity');
    counted  bigint;
BEGIN
    LOCK TABLE usage_records IN SHARE MODE;
    PERFORM pg_advisory_xact_lock(8463221784197426276);  -- no fold meanwhile
    DELETE FROM usage_rollup_hourly WHERE bucket >= range_lo AND bucket < range_hi;
    DELETE FROM usage_rollup_daily WHERE bucket >= range_lo AND bucket < range_hi;
    DELETE FROM usage_rollup_pending WHERE created_at >= range_lo AND created_at < range_hi;
    INSERT INTO usage_rollup_hourly
    SELECT bucket, org_id, app_id, key_id, environment, model, provider, deployment,
           decision, status_class, sum(requests), sum(prompt_tokens),
           sum(completion_tokens), sum(total_tokens), sum(cached_tokens),
           sum(cache_creation_tokens), sum(reasoning_tokens), sum(cost_usd),
           sum(cost_rows), sum(estimated_rows), sum(latency_rows), sum(latency_sum_ms),
           sum(latency_rows * usage_latency_unit(latency_bucket))
    FROM (
        SELECT date_trunc('hour', created_at, 'UTC') AS bucket, org_id, app_id, key_id,
               environment, model, provider, deployment, decision,
               usage_status_class(status_code) AS status_class,
               usage_latency_bucket(latency_ms) AS latency_bucket,
               count(*) AS requests,
               coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
               coalesce(sum(completion_tokens), 0) AS completion_tokens,
               coalesce(sum(total_tokens), 0) AS total_tokens,
               coalesce(sum(cached_tokens), 0) AS cached_tokens,
               coalesce(sum(cache_creation_tokens), 0) AS cache_creation_tokens,
               coalesce(sum(reasoning_tokens), 0) AS reasoning_tokens,
               coalesce(sum(cost_usd), 0) AS cost_usd,
               count(cost_usd) AS cost_rows,
               count(*) FILTER (WHERE tokens_estimated) AS estimated_rows,
               count(usage_latency(latency_ms)) AS latency_rows,
               coalesce(sum(usage_latency(latency_ms)::numeric), 0) AS latency_sum_ms
        FROM usage_records
        WHERE created_at >= range_lo AND created_at < range_hi
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
    ) fine
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10;
    INSERT INTO usage_rollup_daily
    SELECT date_trunc('day', bucket, 'UTC'), org_id, app_id, key_id, environment, model,
           provider, deployment, decision, status_class, sum(requests),
           sum(prompt_tokens), sum(completion_tokens), sum(total_tokens),
           sum(cached_tokens), sum(cache_creation_tokens), sum(reasoning_tokens),
           sum(cost_usd), sum(cost_rows), sum(estimated_rows), sum(latency_rows),
           sum(latency_sum_ms), sum(latency_histogram)
    FROM usage_rollup_hourly
    WHERE bucket >= range_lo AND bucket < range_hi
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10;
    SELECT coalesce(sum(requests), 0) INTO counted
    FROM usage_rollup_daily WHERE bucket >= range_lo AND bucket < range_hi;
    RETURN counted;
END
$$;

-- Everything recorded before this migration: counted into the rollups now.
SELECT usage_rollups_rebuild();
