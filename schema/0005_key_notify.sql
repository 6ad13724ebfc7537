-- 0005: key changes are announced through Postgres NOTIFY as well as Redis pub/sub.
--
-- Every replica LISTENs on channel `ext_proc_invalidate` (ext_proc/stores/invalidation.py,
-- PostgresInvalidationListener) and drops what a message names from its key cache. The
-- payload has the Redis messages' shape, "kind:id": `key:<sha256 of the key>` for one
-- key, `key:*` for every key. Because the triggers run inside the transaction that makes
-- the change, the message is sent exactly when the change commits, whoever makes it
-- (`ext-proc keys revoke|rotate`, the admin API, plain SQL), and also while Redis is
-- down: a revoked key is refused by every replica within about a second as long as
-- either Redis or Postgres reaches it. NOTIFY is transactional and de-duplicated within
-- a transaction, so a statement touching many keys sends each payload once.

-- One key changed in a way its cached record shows (revoked, expiry, moved, re-hashed)
-- or was deleted (its application was): drop it.
CREATE FUNCTION api_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('ext_proc_invalidate', 'key:' || OLD.key_hash);
        RETURN OLD;
    END IF;
    PERFORM pg_notify('ext_proc_invalidate', 'key:' || OLD.key_hash);
    IF NEW.key_hash IS DISTINCT FROM OLD.key_hash THEN
        PERFORM pg_notify('ext_proc_invalidate', 'key:' || NEW.key_hash);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER api_keys_notify_update AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.key_hash IS DISTINCT FROM NEW.key_hash
          OR OLD.application_id IS DISTINCT FROM NEW.application_id
          OR OLD.environment_id IS DISTINCT FROM NEW.environment_id
          OR OLD.prefix IS DISTINCT FROM NEW.prefix)
    EXECUTE FUNCTION api_keys_notify();
CREATE TRIGGER api_keys_notify_delete AFTER DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_notify();

-- Cached key records carry their application's, org's and environment's names: a
-- rename (or an application moved to another org) touches every cached key.
CREATE FUNCTION keys_notify_all() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ext_proc_invalidate', 'key:*');
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_notify_truncate AFTER TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION keys_notify_all();
CREATE TRIGGER applications_notify_keys AFTER UPDATE ON applications
    FOR EACH ROW
    WHEN (OLD.name IS DISTINCT FROM NEW.name
          OR OLD.organization_id IS DISTINCT FROM NEW.organization_id)
    EXECUTE FUNCTION keys_notify_all();
CREATE TRIGGER organizations_notify_keys AFTER UPDATE ON organizations
    FOR EACH ROW WHEN (OLD.name IS DISTINCT FROM NEW.name)
    EXECUTE FUNCTION keys_notify_all();
CREATE TRIGGER application_environments_notify_keys AFTER UPDATE ON application_environments
    FOR EACH ROW WHEN (OLD.name IS DISTINCT FROM NEW.name)
    EXECUTE FUNCTION keys_notify_all();
