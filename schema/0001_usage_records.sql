-- One row per request that reached the gateway (DESIGN.md "Usage records").
-- Column names are contract: SREs and analysts query this table directly, and
-- ext_proc/usage/record.py's UsageRecord fields map one to one onto these columns.
-- Everything the gateway may not know for a request (denied before routing, client gone
-- before the response, provider that reports no usage) is nullable and stays NULL.

CREATE TABLE usage_records (
    request_id              text             PRIMARY KEY,
    created_at              timestamptz      NOT NULL DEFAULT now(),
    org_id                  text,
    app_id                  text,
    key_id                  text,
    endpoint                text,
    model                   text,             -- as the app asked for it
    response_model          text,             -- as the provider reported it
    provider                text,
    deployment              text,
    stream                  boolean          NOT NULL DEFAULT false,
    status_code             integer,          -- what the app received (499: it went away first)
    decision                text             NOT NULL DEFAULT 'allowed'
                            CONSTRAINT usage_records_decision_check
                            CHECK (decision IN ('allowed', 'denied', 'error')),
    policy                  text,             -- the deciding policy, if any
    prompt_tokens           integer,
    completion_tokens       integer,
    total_tokens            integer,
    tokens_estimated        boolean          NOT NULL DEFAULT false,
    latency_ms              double precision,
    ttft_ms                 double precision,
    -- beyond the contract's columns
    environment             text,
    estimated_prompt_tokens integer,          -- our estimate before the call
    cached_tokens           integer,
    cache_creation_tokens   integer,
    reasoning_tokens        integer,
    request_bytes           bigint,
    response_bytes          bigint,
    partial                 boolean          NOT NULL DEFAULT false,
    error_code              text,
    error_message           text,
    policy_violations       text[]            -- post-check policies that flagged the call
);

COMMENT ON TABLE usage_records IS
    'One row per request that reached the gateway, denied ones included (ext-proc).';
COMMENT ON COLUMN usage_records.tokens_estimated IS
    'true when the token counts were computed by the gateway, not reported by the provider';

-- The rollups (ext-proc usage, admin API) filter by a time range, optionally by org,
-- app or model, and group by those.
CREATE INDEX usage_records_created_at_idx ON usage_records (created_at);
CREATE INDEX usage_records_org_created_at_idx ON usage_records (org_id, created_at);
CREATE INDEX usage_records_app_created_at_idx ON usage_records (app_id, created_at);
CREATE INDEX usage_records_model_created_at_idx ON usage_records (model, created_at);
