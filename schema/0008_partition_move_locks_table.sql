-- 0008: moving a day's rows out of the DEFAULT partition no longer hides them from a
-- concurrent reader.
--
-- 0007's usage_records_create_partition(day) moved the day's rows from the DEFAULT
-- partition into the new partition and attached it, locking only the DEFAULT partition.
-- A query on usage_records that had already read the partition list (the old one,
-- without the new day) then waited for that lock; once the move committed it ran with a
-- fresh snapshot: the rows were gone from DEFAULT and the new partition was not in its
-- plan, so it counted them missing (`SELECT count(*) FROM usage_records` answered 0 for
-- a day of rows; tests/integration/test_usage_partitions.py shows it).
--
-- Now, when the DEFAULT partition holds rows of the day, the function first locks
-- usage_records itself in ACCESS EXCLUSIVE mode (the only mode readers wait for): a
-- query takes the table's lock before it reads the partition list, so it waits and
-- then plans with the new partition. Readers and writers of every day wait for the
-- move; that happens only for a day that was written before its partition existed (the
-- server keeps a week ahead). Creating a day with no row in DEFAULT, the daily case,
-- locks only the DEFAULT partition, as before (ATTACH has to, to prove that it holds no
-- row of the day). A row of the day that reaches DEFAULT between the look and that lock
-- is refused with serialization_failure (the caller retries; the retry moves it under
-- the table's lock): taking the table's lock while holding the partition's would invert
-- the order readers lock in, and could deadlock them.

CREATE OR REPLACE FUNCTION usage_records_create_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    day_start timestamptz := day::timestamp AT TIME ZONE 'UTC';
    day_end   timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
    part      text := 'usage_records_p' || to_char(day, 'YYYYMMDD');
    has_rows  boolean;
BEGIN
    IF EXISTS (
        SELECT 1 FROM usage_records_partitions p
        WHERE NOT p.is_default
          AND coalesce(p.lo, '-infinity') < day_end AND coalesce(p.hi, 'infinity') > day_start
    ) THEN
        RETURN NULL;
    END IF;
    -- Through usage_records, so that its lock is taken before the partition's (the
    -- order readers take them in).
    has_rows := EXISTS (
        SELECT 1 FROM usage_records WHERE created_at >= day_start AND created_at < day_end);
    IF has_rows THEN
        LOCK TABLE usage_records IN ACCESS EXCLUSIVE MODE;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I (LIKE usage_records INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
        'INCLUDING STORAGE)', part);
    -- Proves the bounds to ATTACH, which then need not scan the new table.
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (created_at >= %L AND created_at < %L)',
                   part, part || '_bounds', day_start, day_end);
    LOCK TABLE usage_records_default IN ACCESS EXCLUSIVE MODE;
    IF has_rows THEN
        EXECUTE format(
            'WITH moved AS (DELETE FROM usage_records_default '
            'WHERE created_at >= %L AND created_at < %L RETURNING *) '
            'INSERT INTO %I SELECT * FROM moved', day_start, day_end, part);
    ELSIF EXISTS (
        SELECT 1 FROM usage_records_default
        WHERE created_at >= day_start AND created_at < day_end
    ) THEN
        RAISE EXCEPTION 'rows of % reached the DEFAULT partition while its partition was '
                        'being created', day
            USING ERRCODE = 'serialization_failure',
                  HINT = 'Retry: the next attempt moves them.';
    END IF;
    EXECUTE format('ALTER TABLE usage_records ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, day_start, day_end);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, part || '_bounds');
    RETURN part;
END
$$;
