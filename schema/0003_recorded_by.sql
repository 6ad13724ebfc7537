-- Who wrote a usage record: the request side (its own denials), the response processor
-- (streams, translated answers), or the access-log handler (plain answers, and requests
-- Envoy answered itself). When two wrote one request, the access log's record is the
-- one kept: it is Envoy's account of what the app actually received.
ALTER TABLE usage_records ADD COLUMN recorded_by text;
