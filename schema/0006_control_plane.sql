-- 0006: the control plane (admin API): who manages each catalog object, organizations
-- as objects of their own, admin tokens, the audit log, and catalog changes announced
-- through Postgres NOTIFY (DESIGN.md "Admin API").
--
-- Who manages an object (`managed_by`): 'file' when `ext-proc apply` wrote it, 'api'
-- when the admin API created or last edited it (or plain SQL inserted it). `apply`
-- overwrites the file-managed objects its file declares; it skips API-managed ones
-- unless `--force`, and prunes them only with `--prune-api` (ext_proc/apply.py).
-- The column was `source` ('file' | 'admin').

ALTER TABLE providers RENAME COLUMN source TO managed_by;
ALTER TABLE models RENAME COLUMN source TO managed_by;
ALTER TABLE policies RENAME COLUMN source TO managed_by;
ALTER TABLE applications RENAME COLUMN source TO managed_by;

ALTER TABLE providers DROP CONSTRAINT providers_source_check;
ALTER TABLE models DROP CONSTRAINT models_source_check;
ALTER TABLE policies DROP CONSTRAINT policies_source_check;
ALTER TABLE applications DROP CONSTRAINT applications_source_check;

UPDATE providers SET managed_by = 'api' WHERE managed_by = 'admin';
UPDATE models SET managed_by = 'api' WHERE managed_by = 'admin';
UPDATE policies SET managed_by = 'api' WHERE managed_by = 'admin';
UPDATE applications SET managed_by = 'api' WHERE managed_by = 'admin';

ALTER TABLE providers ALTER COLUMN managed_by SET DEFAULT 'api',
    ADD CONSTRAINT providers_managed_by_check CHECK (managed_by IN ('file', 'api'));
ALTER TABLE models ALTER COLUMN managed_by SET DEFAULT 'api',
    ADD CONSTRAINT models_managed_by_check CHECK (managed_by IN ('file', 'api'));
ALTER TABLE policies ALTER COLUMN managed_by SET DEFAULT 'api',
    ADD CONSTRAINT policies_managed_by_check CHECK (managed_by IN ('file', 'api'));
ALTER TABLE applications ALTER COLUMN managed_by SET DEFAULT 'api',
    ADD CONSTRAINT applications_managed_by_check CHECK (managed_by IN ('file', 'api'));

-- Organizations: declared under `organizations:` (or named by an application), or made
-- through the API; a description of their own.
ALTER TABLE organizations
    ADD COLUMN description text,
    ADD COLUMN managed_by text NOT NULL DEFAULT 'api'
        CONSTRAINT organizations_managed_by_check CHECK (managed_by IN ('file', 'api')),
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
-- Every organization that exists came from an apply (they were implied by applications).
UPDATE organizations SET managed_by = 'file';
CREATE TRIGGER organizations_touch BEFORE UPDATE ON organizations
    FOR EACH ROW EXECUTE FUNCTION catalog_touch_updated_at();

-- Admin API tokens besides EXT_PROC_ADMIN_TOKEN (which is never stored). Like API keys,
-- only the sha256 and a visible prefix are kept (see 0002 on why a fast hash is right
-- for 256 random bits). A token is `admin` (reads and writes) or `viewer` (reads); an
-- org-scoped one sees and touches only its organization's objects.
CREATE TABLE admin_tokens (
    id              text        PRIMARY KEY CHECK (id ~ '^tok_[0-9a-f]{12}$'),
    name            text        NOT NULL
                    CHECK (name ~ '^[a-z0-9][a-z0-9._-]*$' AND char_length(name) <= 128),
    role            text        NOT NULL CHECK (role IN ('admin', 'viewer')),
    organization_id bigint      REFERENCES organizations (id) ON DELETE RESTRICT,
    token_hash      text        NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    prefix          text        NOT NULL CHECK (char_length(prefix) BETWEEN 4 AND 16),
    created_by      text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    revoked_at      timestamptz,
    last_used_at    timestamptz
);
-- A name names one usable token at a time (a revoked token's name can be reused).
CREATE UNIQUE INDEX admin_tokens_active_name_key ON admin_tokens (name) WHERE revoked_at IS NULL;

-- Every change made through the admin API (and every object `apply` wrote): who, what,
-- before and after (the objects as gateway.yaml writes them; never a key or a token).
CREATE TABLE audit_log (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,  -- the token's name; "ext-proc apply" for a file
    actor_role  text,
    action      text        NOT NULL,  -- create, update, delete, revoke, rotate, ...
    kind        text        NOT NULL,  -- organization, application, provider, model, ...
    name        text        NOT NULL,  -- the object's name (a key's or token's id)
    org         text,                  -- the organization it belongs to, if any
    before      jsonb,
    after       jsonb,
    request_id  text
);
CREATE INDEX audit_log_at_idx ON audit_log (at DESC, id DESC);
CREATE INDEX audit_log_object_idx ON audit_log (kind, name);
CREATE INDEX audit_log_org_idx ON audit_log (org) WHERE org IS NOT NULL;

-- A catalog change also NOTIFYs `config:*`, in the same transaction, so every replica
-- reloads within a second whoever made it (the API, apply, plain SQL), also while Redis
-- is down. NOTIFY sends one message per distinct payload per transaction.
CREATE OR REPLACE FUNCTION catalog_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE catalog_state SET revision = revision + 1, fingerprint = NULL, changed_at = now();
    PERFORM pg_notify('ext_proc_invalidate', 'config:*');
    RETURN NULL;
END
$$;

-- The catalog's canonical form now holds its organizations: recompute its fingerprint.
UPDATE catalog_state SET fingerprint = NULL;
