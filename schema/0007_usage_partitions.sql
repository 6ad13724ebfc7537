-- 0007: usage_records partitioned by day; hourly, daily and weekly rollups kept exact by
-- triggers (README "Usage records" / "Partitions, retention and rollups").
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
--   found in the DEFAULT partition (ext_proc/usage/maintenance.py); `ext-proc usage
--   prune` drops old days.
-- * The rollups (usage_rollup_tables() lists them): totals per UTC hour, day and week,
--   per org; per org, app, model and provider; and per every group key (org, app, key,
--   environment, model, provider, deployment, decision, status class). Statement
--   triggers on usage_records queue every change in usage_rollup_pending inside the
--   transaction that changes the rows (an insert adds its rows, a delete subtracts
--   them, an update - a record replaced by a higher-ranked one - subtracts the old row
--   and adds the new one), and usage_rollups_fold moves the queue into every rollup
--   table in one transaction. Late rows (spool replay, fallback records) are counted
--   when they land, exactly once.
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

-- The rollups: what usage_records' rows add up to per UTC hour, day (and week), at
-- three levels of detail, so that a query reads the fewest rows that still have what it
-- groups and filters by (ext_proc/usage/rollups.py picks the level):
--   usage_rollup_hourly / _daily / _weekly: per org, app, key, environment, model,
--       provider, deployment, decision and status class (the full detail: rows grow
--       with the keys and deployments in use; weeks keep a month's query short)
--   usage_rollup_app_hourly / _daily: per org, app, model and provider
--   usage_rollup_org_hourly / _daily: per org (time charts: a few rows per hour)
-- Weeks start on Monday, 00:00 UTC. One fold fills them all in one transaction
-- (usage_rollups_add_sql), so they always agree.

-- The measures every rollup row has: sums, so that a group's rows, and the rollup rows
-- of its buckets, add up (and subtract: a row taken out is undone exactly).
CREATE TEMPORARY TABLE usage_rollup_measures (
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
    errors                bigint        NOT NULL,  -- decision = 'error'
    denied                bigint        NOT NULL,  -- decision = 'denied'
    latency_rows          bigint        NOT NULL,  -- rows with a latency
    latency_sum_ms        numeric       NOT NULL,  -- exact, so subtracting a row undoes it
    latency_histogram     numeric       NOT NULL   -- packed (usage_latency_unit)
) ON COMMIT DROP;

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
    LIKE usage_rollup_measures,
    CONSTRAINT usage_rollup_hourly_key UNIQUE NULLS NOT DISTINCT
        (bucket, org_id, app_id, key_id, environment, model, provider, deployment,
         decision, status_class)
) WITH (fillfactor = 80);  -- room for HOT updates: every batch updates its groups

CREATE TABLE usage_rollup_daily (
    LIKE usage_rollup_hourly,
    CONSTRAINT usage_rollup_daily_key UNIQUE NULLS NOT DISTINCT
        (bucket, org_id, app_id, key_id, environment, model, provider, deployment,
         decision, status_class)
) WITH (fillfactor = 80);

CREATE TABLE usage_rollup_weekly (
    LIKE usage_rollup_hourly,
    CONSTRAINT usage_rollup_weekly_key UNIQUE NULLS NOT DISTINCT
        (bucket, org_id, app_id, key_id, environment, model, provider, deployment,
         decision, status_class)
) WITH (fillfactor = 80);

CREATE TABLE usage_rollup_app_hourly (
    bucket                timestamptz   NOT NULL,  -- the UTC hour
    org_id                text,
    app_id                text,
    model                 text,
    provider              text,
    LIKE usage_rollup_measures,
    CONSTRAINT usage_rollup_app_hourly_key UNIQUE NULLS NOT DISTINCT
        (bucket, org_id, app_id, model, provider)
) WITH (fillfactor = 80);

CREATE TABLE usage_rollup_app_daily (
    LIKE usage_rollup_app_hourly,
    CONSTRAINT usage_rollup_app_daily_key UNIQUE NULLS NOT DISTINCT
        (bucket, org_id, app_id, model, provider)
) WITH (fillfactor = 80);

CREATE TABLE usage_rollup_org_hourly (
    bucket                timestamptz   NOT NULL,  -- the UTC hour
    org_id                text,
    LIKE usage_rollup_measures,
    CONSTRAINT usage_rollup_org_hourly_key UNIQUE NULLS NOT DISTINCT (bucket, org_id)
) WITH (fillfactor = 80);

CREATE TABLE usage_rollup_org_daily (
    LIKE usage_rollup_org_hourly,
    CONSTRAINT usage_rollup_org_daily_key UNIQUE NULLS NOT DISTINCT (bucket, org_id)
) WITH (fillfactor = 80);

COMMENT ON TABLE usage_rollup_hourly IS
    'usage_records totals per UTC hour and group (every group key), kept exact (ext-proc)';
COMMENT ON TABLE usage_rollup_daily IS
    'usage_records totals per UTC day and group (every group key), kept exact (ext-proc)';
COMMENT ON TABLE usage_rollup_weekly IS
    'usage_records totals per week (from Monday 00:00 UTC) and group (every group key) (ext-proc)';
COMMENT ON TABLE usage_rollup_app_hourly IS
    'usage_records totals per UTC hour, org, app, model and provider (ext-proc)';
COMMENT ON TABLE usage_rollup_app_daily IS
    'usage_records totals per UTC day, org, app, model and provider (ext-proc)';
COMMENT ON TABLE usage_rollup_org_hourly IS 'usage_records totals per UTC hour and org (ext-proc)';
COMMENT ON TABLE usage_rollup_org_daily IS 'usage_records totals per UTC day and org (ext-proc)';

-- The rollup tables: level, time bucket, group columns, and the table whose totals
-- they sum (NULL: the rows themselves), in an order where that table comes first. The
-- fold, the rebuild, the truncate trigger and retention go through this list;
-- ext_proc/usage/rollups.py knows the same levels.
CREATE FUNCTION usage_rollup_tables(OUT name text, OUT level text, OUT grain text,
                                    OUT group_columns text[], OUT summed_from text)
    RETURNS SETOF record LANGUAGE sql IMMUTABLE AS $$
    SELECT t.name, t.level, t.grain, l.group_columns, t.summed_from
    FROM (VALUES (1, 'usage_rollup_hourly', 'full', 'hour', NULL),
                 (2, 'usage_rollup_daily', 'full', 'day', 'usage_rollup_hourly'),
                 (3, 'usage_rollup_weekly', 'full', 'week', 'usage_rollup_daily'),
                 (4, 'usage_rollup_app_hourly', 'app', 'hour', 'usage_rollup_hourly'),
                 (5, 'usage_rollup_app_daily', 'app', 'day', 'usage_rollup_app_hourly'),
                 (6, 'usage_rollup_org_hourly', 'org', 'hour', 'usage_rollup_app_hourly'),
                 (7, 'usage_rollup_org_daily', 'org', 'day', 'usage_rollup_org_hourly'))
         t(position, name, level, grain, summed_from)
    JOIN (VALUES ('full', '{org_id,app_id,key_id,environment,model,provider,deployment,decision,status_class}'::text[]),
                 ('app', '{org_id,app_id,model,provider}'),
                 ('org', '{org_id}')) l(level, group_columns)
        USING (level)
    ORDER BY t.position
$$;

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
    EXECUTE 'TRUNCATE usage_rollup_pending, '
        || (SELECT string_agg(quote_ident(name), ', ') FROM usage_rollup_tables());
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_rollups_truncate AFTER TRUNCATE ON usage_records
    FOR EACH STATEMENT EXECUTE FUNCTION usage_rollups_truncate();

-- The statement that adds totals to the rollup tables, for the fold and the rebuild.
-- `fine` is the text of one or more CTEs, the last named fine: one row per UTC hour
-- (bucket), group of the full rollup and latency bucket (latency_bucket), with the
-- columns requests, prompt_tokens, completion_tokens, total_tokens, cached_tokens,
-- cache_creation_tokens, reasoning_tokens, cost_usd, cost_rows, estimated_rows,
-- latency_rows, latency_sum_ms (NULL sums allowed) and taken (the changes it stands
-- for). The statement packs the latency histograms (per group, one numeric addition per
-- latency bucket, not per row: delta), sums each table's totals from the table before
-- it in the list (the hourly ones per app from the full hourly ones, and so on: each
-- sum reads the fewest rows), and adds them to the rows of the same bucket and group of
-- each table whose grain is one of `grains`: ON CONFLICT ... DO UPDATE, or, when
-- `upsert` is false (the rebuild, which has emptied those buckets), a plain INSERT.
-- It returns sum(taken).
CREATE FUNCTION usage_rollups_add_sql(fine text, grains text[] DEFAULT '{hour,day,week}',
                                      upsert boolean DEFAULT true)
    RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    measures CONSTANT text[] := '{requests,prompt_tokens,completion_tokens,total_tokens,cached_tokens,cache_creation_tokens,reasoning_tokens,cost_usd,cost_rows,estimated_rows,errors,denied,latency_rows,latency_sum_ms,latency_histogram}';
    sums     CONSTANT text := (SELECT string_agg(format('sum(%1$I) AS %1$I', m), ', ')
                               FROM unnest(measures) m);
    adds     CONSTANT text := (SELECT string_agg(format('%1$I = t.%1$I + EXCLUDED.%1$I', m), ', ')
                               FROM unnest(measures) m);
    sql      text := 'WITH ' || fine || $delta$,
delta AS MATERIALIZED (
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
           CASE decision WHEN 'error' THEN sum(requests) ELSE 0 END AS errors,
           CASE decision WHEN 'denied' THEN sum(requests) ELSE 0 END AS denied,
           coalesce(sum(latency_rows), 0) AS latency_rows,
           coalesce(sum(latency_sum_ms), 0) AS latency_sum_ms,
           coalesce(sum(latency_rows * usage_latency_unit(latency_bucket)), 0)
               AS latency_histogram,
           sum(taken) AS taken
    FROM fine
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
)$delta$;
    source   text;
    r        record;
BEGIN
    FOR r IN SELECT * FROM usage_rollup_tables() WHERE grain = ANY (grains) LOOP
        IF r.summed_from IS NULL THEN
            source := 'delta';  -- the full hourly rollup's groups: delta's own
        ELSE
            sql := sql || format(
                E',\n%I AS MATERIALIZED (SELECT date_trunc(%L, bucket, ''UTC'') AS bucket, %s, %s'
                ' FROM %I GROUP BY %s)',
                r.name || '_rows', r.grain, array_to_string(r.group_columns, ', '), sums,
                CASE WHEN (SELECT summed_from IS NULL FROM usage_rollup_tables() s
                           WHERE s.name = r.summed_from)
                     THEN 'delta' ELSE r.summed_from || '_rows' END,
                (SELECT string_agg(n::text, ', ')
                 FROM generate_series(1, 1 + cardinality(r.group_columns)) n));
            source := r.name || '_rows';
        END IF;
        sql := sql || format(
            E',\n%I AS (INSERT INTO %I AS t SELECT bucket, %s, %s FROM %I%s)',
            r.name || '_added', r.name, array_to_string(r.group_columns, ', '),
            array_to_string(measures, ', '), source,
            CASE WHEN upsert THEN format(' ON CONFLICT ON CONSTRAINT %I DO UPDATE SET %s',
                                         r.name || '_key', adds) ELSE '' END);
    END LOOP;
    RETURN sql || E'\nSELECT coalesce(sum(taken), 0) FROM delta';
END
$$;

-- Move up to max_rows pending rows into the rollups, in one statement: they leave the
-- pending table in the transaction that adds them to every rollup table, so each is
-- counted exactly once. Returns how many moved; -1 when another fold is running (they
-- take turns: pg_try_advisory_xact_lock). The ext_proc server folds every few seconds.
CREATE FUNCTION usage_rollups_fold(max_rows integer DEFAULT 100000) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(8463221784197426276) THEN  -- 'usg_fold'
        RETURN -1;
    END IF;
    EXECUTE usage_rollups_add_sql($fine$
taken AS (
    DELETE FROM usage_rollup_pending
    WHERE ctid = ANY (ARRAY(SELECT ctid FROM usage_rollup_pending LIMIT $1))
    RETURNING *
), fine AS (
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
)$fine$) INTO moved USING max_rows;
    RETURN moved;
END
$$;

-- The statement that counts the rows of `relation` (usage_records, or one of its
-- partitions) with created_at in [$1, $2) into the hourly and daily rollups, in one pass
-- over them, as plain INSERTs: those buckets must hold nothing yet (usage_rollups_rebuild
-- empties them first). Returns the rows counted.
CREATE FUNCTION usage_rollups_count_sql(relation regclass) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT usage_rollups_add_sql(format($fine$
fine AS (
    SELECT date_trunc('hour', created_at, 'UTC') AS bucket, org_id, app_id, key_id,
           environment, model, provider, deployment, decision,
           usage_status_class(status_code) AS status_class,
           usage_latency_bucket(latency_ms) AS latency_bucket,
           count(*) AS requests,
           sum(prompt_tokens) AS prompt_tokens,
           sum(completion_tokens) AS completion_tokens,
           sum(total_tokens) AS total_tokens,
           sum(cached_tokens) AS cached_tokens,
           sum(cache_creation_tokens) AS cache_creation_tokens,
           sum(reasoning_tokens) AS reasoning_tokens,
           sum(cost_usd) AS cost_usd,
           count(cost_usd) AS cost_rows,
           count(*) FILTER (WHERE tokens_estimated) AS estimated_rows,
           count(usage_latency(latency_ms)) AS latency_rows,
           sum(usage_latency(latency_ms)::numeric) AS latency_sum_ms,
           count(*) AS taken
    FROM %s
    WHERE created_at >= $1 AND created_at < $2
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
)$fine$, relation), '{hour,day}', false)
$$;

-- The weekly rollups of the weeks overlapping [since, until) (NULL: unbounded) summed
-- again from the daily ones: after a rebuild of some days, whose weeks hold other days
-- too.
CREATE FUNCTION usage_rollups_rebuild_weeks(since timestamptz, until timestamptz)
    RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    weeks_lo timestamptz := coalesce(date_trunc('week', since, 'UTC'), '-infinity');
    weeks_hi timestamptz := coalesce(
        date_trunc('week', until - interval '1 microsecond', 'UTC') + interval '7 days',
        'infinity');
    measures CONSTANT text := 'sum(requests), sum(prompt_tokens), sum(completion_tokens), '
        'sum(total_tokens), sum(cached_tokens), sum(cache_creation_tokens), '
        'sum(reasoning_tokens), sum(cost_usd), sum(cost_rows), sum(estimated_rows), '
        'sum(errors), sum(denied), sum(latency_rows), sum(latency_sum_ms), '
        'sum(latency_histogram)';
    r        record;
BEGIN
    FOR r IN SELECT * FROM usage_rollup_tables() WHERE grain = 'week' LOOP
        EXECUTE format('DELETE FROM %I WHERE bucket >= $1 AND bucket < $2', r.name)
            USING weeks_lo, weeks_hi;
        EXECUTE format(
            'INSERT INTO %I SELECT date_trunc(''week'', bucket, ''UTC''), %s, %s FROM %I '
            'WHERE bucket >= $1 AND bucket < $2 GROUP BY %s',
            r.name, array_to_string(r.group_columns, ', '), measures, r.summed_from,
            (SELECT string_agg(n::text, ', ')
             FROM generate_series(1, 1 + cardinality(r.group_columns)) n))
            USING weeks_lo, weeks_hi;
    END LOOP;
END
$$;

-- Recompute the rollups of the UTC days overlapping [since, until) (NULL: unbounded)
-- from the rows: for rows written around the triggers (straight into a partition, or
-- with triggers disabled), and for the rows this migration converts. One pass over the
-- rows (not through usage_rollup_pending), so it costs about what one query over them
-- costs; the weeks those days are in are then summed again from the daily rollups.
-- Writers wait while it runs (the table is locked in SHARE mode); what was pending for
-- those days is dropped (the rows count it). Returns the rows counted. Days already
-- gone from usage_records (retention) lose their rollups too: give a range that starts
-- after them.
CREATE FUNCTION usage_rollups_rebuild(since timestamptz DEFAULT NULL,
                                      until timestamptz DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    range_lo timestamptz := coalesce(date_trunc('day', since, 'UTC'), '-infinity');
    range_hi timestamptz := coalesce(
        date_trunc('day', until - interval '1 microsecond', 'UTC') + interval '24 hours',
        'infinity');
    counted  bigint;
    r        record;
BEGIN
    LOCK TABLE usage_records IN SHARE MODE;
    PERFORM pg_advisory_xact_lock(8463221784197426276);  -- no fold meanwhile
    FOR r IN SELECT name FROM usage_rollup_tables() WHERE grain IN ('hour', 'day') LOOP
        EXECUTE format('DELETE FROM %I WHERE bucket >= $1 AND bucket < $2', r.name)
            USING range_lo, range_hi;
    END LOOP;
    DELETE FROM usage_rollup_pending WHERE created_at >= range_lo AND created_at < range_hi;
    EXECUTE usage_rollups_count_sql('usage_records') INTO counted USING range_lo, range_hi;
    PERFORM usage_rollups_rebuild_weeks(range_lo, range_hi);
    RETURN counted;
END
$$;

-- Everything recorded before this migration: counted into the rollups now.
SELECT usage_rollups_rebuild();
