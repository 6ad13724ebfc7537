-- What a request cost, and how many upstream tries it took (DESIGN.md "Usage records",
-- "Cost and budgets"). Both nullable: rows written before this migration, and requests
-- to a model without a price, have no cost; attempts is unknown for requests that never
-- reached a provider.
ALTER TABLE usage_records ADD COLUMN cost_usd numeric(20, 10);
ALTER TABLE usage_records ADD COLUMN attempts integer;

COMMENT ON COLUMN usage_records.cost_usd IS
    'USD at the price in force when the request ran (the model''s price: in gateway.yaml, '
    'else the public table); exact to 1e-10; NULL only when the model has no price';
COMMENT ON COLUMN usage_records.attempts IS
    'upstream tries for this request (1 = the first target answered); NULL when none was made';
