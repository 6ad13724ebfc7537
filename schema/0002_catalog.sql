-- 0002: the runtime catalog and the API keys (DESIGN.md "Configuration").
--
-- Postgres is the runtime truth: `ext-proc apply -f gateway.yaml` writes the file's
-- providers, models, policies and applications here (ext_proc/apply.py), the admin API
-- edits the same rows, and every replica builds its GatewayConfig from these tables
-- (ext_proc/stores/catalog.py). Each object keeps its fields as gateway.yaml would write
-- them (a few columns, the rest in `config` jsonb), so the catalog re-validates through
-- the same loader as the file and has the same fingerprint as the file it came from.
--
-- Invariants kept by the database itself, whoever writes (apply or the admin API):
--   * every application has a "default" environment, which cannot be dropped alone;
--   * an application or environment with active API keys cannot be deleted;
--   * a policy's `version` goes up by one on every change of what it enforces;
--   * `updated_at` moves only when a row really changed;
--   * any change to the catalog bumps catalog_state.revision and clears its
--     fingerprint (recomputed on demand by ext_proc.stores.catalog.config_version).
-- The file runs inside one transaction (ext_proc.stores.postgres.migrate).

-- Organizations are implied by applications (`org:` in gateway.yaml).
CREATE TABLE organizations (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL UNIQUE
                CHECK (name ~ '^[a-z0-9][a-z0-9._-]*$' AND char_length(name) <= 128),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE providers (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL UNIQUE
                CHECK (name ~ '^[a-z0-9][a-z0-9._-]*$' AND char_length(name) <= 128),
    type        text        NOT NULL,
    base_url    text        NOT NULL,
    -- The other gateway.yaml fields (api_key_env, api_version, timeout, retries, ...).
    -- Credentials are never here: only the name of the variable or file holding them.
    config      jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    source      text        NOT NULL DEFAULT 'admin' CHECK (source IN ('file', 'admin')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE models (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL UNIQUE CHECK (char_length(name) <= 128),  -- what apps send
    provider_id bigint      NOT NULL REFERENCES providers (id) ON DELETE RESTRICT,
    deployment  text        NOT NULL,
    config      jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    source      text        NOT NULL DEFAULT 'admin' CHECK (source IN ('file', 'admin')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX models_provider_id_idx ON models (provider_id);

CREATE TABLE policies (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL UNIQUE
                CHECK (name ~ '^[a-z0-9][a-z0-9._-]*$' AND char_length(name) <= 128),
    type        text        NOT NULL,            -- a key of ext_proc.policies.POLICY_TYPES
    config      jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    enabled     boolean     NOT NULL DEFAULT true,
    on_error    text        NOT NULL DEFAULT 'allow' CHECK (on_error IN ('allow', 'deny')),
    -- Bumped by policies_bump_version on every change of type/config/enabled/on_error,
    -- so caches and counters keyed by (policy, version) never mix two definitions.
    version     integer     NOT NULL DEFAULT 1 CHECK (version >= 1),
    source      text        NOT NULL DEFAULT 'admin' CHECK (source IN ('file', 'admin')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE applications (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text        NOT NULL UNIQUE
                    CHECK (name ~ '^[a-z0-9][a-z0-9._-]*$' AND char_length(name) <= 128),
    organization_id bigint      NOT NULL REFERENCES organizations (id) ON DELETE RESTRICT,
    description     text,
    source          text        NOT NULL DEFAULT 'admin' CHECK (source IN ('file', 'admin')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX applications_organization_id_idx ON applications (organization_id);

-- An application's environments (dev, prod, ...). A key belongs to one; an environment
-- may add policies after the application's own. "default" always exists.
CREATE TABLE application_environments (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    application_id bigint      NOT NULL REFERENCES applications (id) ON DELETE CASCADE,
    name           text        NOT NULL
                   CHECK (name ~ '^[a-z0-9][a-z0-9._-]*$' AND char_length(name) <= 128),
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (application_id, name),
    UNIQUE (id, application_id)  -- target of the composite foreign keys below
);

-- Policy <-> application bindings, ordered by position (the evaluation order).
-- environment_id NULL is the application's own list, applied in every environment;
-- a non-NULL environment_id is that environment's additions, applied after it. NULL
-- rather than the "default" environment because gateway.yaml lets "default" add
-- policies of its own, like any other environment.
CREATE TABLE application_policies (
    application_id bigint  NOT NULL REFERENCES applications (id) ON DELETE CASCADE,
    environment_id bigint,
    policy_id      bigint  NOT NULL REFERENCES policies (id) ON DELETE RESTRICT,
    position       integer NOT NULL CHECK (position >= 0),
    FOREIGN KEY (environment_id, application_id)
        REFERENCES application_environments (id, application_id) ON DELETE CASCADE
);
-- Partial indexes instead of NULLS NOT DISTINCT, which needs Postgres 15.
CREATE UNIQUE INDEX application_policies_app_policy_key
    ON application_policies (application_id, policy_id) WHERE environment_id IS NULL;
CREATE UNIQUE INDEX application_policies_app_position_key
    ON application_policies (application_id, position) WHERE environment_id IS NULL;
CREATE UNIQUE INDEX application_policies_env_policy_key
    ON application_policies (environment_id, policy_id) WHERE environment_id IS NOT NULL;
CREATE UNIQUE INDEX application_policies_env_position_key
    ON application_policies (environment_id, position) WHERE environment_id IS NOT NULL;
CREATE INDEX application_policies_policy_id_idx ON application_policies (policy_id);

CREATE TABLE api_keys (
    id             text        PRIMARY KEY CHECK (id ~ '^key_[0-9a-f]{12}$'),
    application_id bigint      NOT NULL REFERENCES applications (id) ON DELETE CASCADE,
    environment_id bigint      NOT NULL,
    -- sha256 (hex) of the whole key; the key itself is never stored. A fast, unsalted
    -- hash is right here, unlike for passwords: keys are 256 bits from `secrets`, so
    -- there is no dictionary to try and brute force is out of reach whatever the hash
    -- costs, while a slow hash (bcrypt, argon2) would cost every request milliseconds
    -- and rule out the indexed lookup by hash that authentication needs.
    key_hash       text        NOT NULL CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    prefix         text        NOT NULL CHECK (char_length(prefix) BETWEEN 4 AND 16),
    description    text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,              -- NULL: never; a rotated key's grace end
    revoked_at     timestamptz,
    rotated_from   text        REFERENCES api_keys (id) ON DELETE SET NULL,
    last_used_at   timestamptz,              -- optional; not written on the hot path
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash),
    FOREIGN KEY (environment_id, application_id)
        REFERENCES application_environments (id, application_id) ON DELETE CASCADE
);
CREATE INDEX api_keys_application_id_idx ON api_keys (application_id);
CREATE INDEX api_keys_environment_id_idx ON api_keys (environment_id, application_id);
CREATE INDEX api_keys_rotated_from_idx ON api_keys (rotated_from) WHERE rotated_from IS NOT NULL;

-- One row: what was last applied, and the catalog's current revision and fingerprint.
CREATE TABLE catalog_state (
    id                  boolean     PRIMARY KEY DEFAULT true CHECK (id),
    revision            bigint      NOT NULL DEFAULT 0,  -- +1 per statement that changed it
    fingerprint         text,        -- of the catalog now; NULL: changed, not computed yet
    changed_at          timestamptz,
    applied_fingerprint text,        -- of the gateway.yaml last applied
    applied_source      text,        -- its path, as given to `apply`
    applied_at          timestamptz
);
INSERT INTO catalog_state DEFAULT VALUES;

-- --- invariants -------------------------------------------------------------------

CREATE FUNCTION catalog_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF row(NEW.*) IS DISTINCT FROM row(OLD.*) THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER providers_touch BEFORE UPDATE ON providers
    FOR EACH ROW EXECUTE FUNCTION catalog_touch_updated_at();
CREATE TRIGGER models_touch BEFORE UPDATE ON models
    FOR EACH ROW EXECUTE FUNCTION catalog_touch_updated_at();
CREATE TRIGGER applications_touch BEFORE UPDATE ON applications
    FOR EACH ROW EXECUTE FUNCTION catalog_touch_updated_at();

CREATE FUNCTION policies_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.type, NEW.config, NEW.enabled, NEW.on_error)
       IS DISTINCT FROM (OLD.type, OLD.config, OLD.enabled, OLD.on_error) THEN
        NEW.version := OLD.version + 1;
        NEW.updated_at := now();
        RETURN NEW;
    END IF;
    NEW.version := OLD.version;  -- writers do not set versions by hand
    IF row(NEW.*) IS DISTINCT FROM row(OLD.*) THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER policies_bump_version BEFORE UPDATE ON policies
    FOR EACH ROW EXECUTE FUNCTION policies_bump_version();

CREATE FUNCTION applications_add_default_environment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO application_environments (application_id, name) VALUES (NEW.id, 'default');
    RETURN NULL;
END
$$;

CREATE TRIGGER applications_add_default_environment AFTER INSERT ON applications
    FOR EACH ROW EXECUTE FUNCTION applications_add_default_environment();

-- Deleting an application or environment would delete its keys (ON DELETE CASCADE):
-- refused while any of them is still usable. Revoke them first.
CREATE FUNCTION applications_guard_delete() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    active integer;
BEGIN
    SELECT count(*) INTO active FROM api_keys
     WHERE application_id = OLD.id AND revoked_at IS NULL
       AND (expires_at IS NULL OR expires_at > now());
    IF active > 0 THEN
        RAISE EXCEPTION 'application % still has % active API key(s); revoke them first',
            OLD.name, active USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END
$$;

CREATE TRIGGER applications_guard_delete BEFORE DELETE ON applications
    FOR EACH ROW EXECUTE FUNCTION applications_guard_delete();

CREATE FUNCTION environments_guard_delete() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    active integer;
BEGIN
    -- When the application itself is being deleted (a cascade), its row is gone already.
    IF NOT EXISTS (SELECT 1 FROM applications WHERE id = OLD.application_id) THEN
        RETURN OLD;
    END IF;
    IF OLD.name = 'default' THEN
        RAISE EXCEPTION 'the default environment of an application cannot be deleted'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    SELECT count(*) INTO active FROM api_keys
     WHERE environment_id = OLD.id AND revoked_at IS NULL
       AND (expires_at IS NULL OR expires_at > now());
    IF active > 0 THEN
        RAISE EXCEPTION 'environment % still has % active API key(s); revoke them first',
            OLD.name, active USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END
$$;

CREATE TRIGGER environments_guard_delete BEFORE DELETE ON application_environments
    FOR EACH ROW EXECUTE FUNCTION environments_guard_delete();

-- Any write to the catalog: one more revision, fingerprint to be recomputed.
CREATE FUNCTION catalog_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE catalog_state SET revision = revision + 1, fingerprint = NULL, changed_at = now();
    RETURN NULL;
END
$$;

CREATE TRIGGER organizations_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON organizations FOR EACH STATEMENT EXECUTE FUNCTION catalog_changed();
CREATE TRIGGER providers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON providers FOR EACH STATEMENT EXECUTE FUNCTION catalog_changed();
CREATE TRIGGER models_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON models FOR EACH STATEMENT EXECUTE FUNCTION catalog_changed();
CREATE TRIGGER policies_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON policies FOR EACH STATEMENT EXECUTE FUNCTION catalog_changed();
CREATE TRIGGER applications_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON applications FOR EACH STATEMENT EXECUTE FUNCTION catalog_changed();
CREATE TRIGGER application_environments_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON application_environments FOR EACH STATEMENT EXECUTE FUNCTION catalog_changed();
CREATE TRIGGER application_policies_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON application_policies FOR EACH STATEMENT EXECUTE FUNCTION catalog_changed();
