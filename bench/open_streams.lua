-- wrk script for `python -m bench --open-streams N` (bench/open_streams.py): every
-- connection sends ONE streaming chat completion, the connections' first requests spread
-- evenly over `ramp_ms`, and each stream is held until the mock's last chunk. Prints one
-- JSON summary line (BENCH_JSON ...).
--
--   wrk -t1 -c1950 -d600s --timeout 600s -s bench/open_streams.lua URL -- key=value ...
--
-- Arguments:
--   key=<api key>            `Authorization: Bearer <key>`
--   chunks=<n>               `x-mock-chunks`, `x-mock-completion-tokens` and the body's
--                            `max_tokens` (the mock streams min(chunks, tokens, max_tokens))
--   chunk_delay_ms=<n>       `x-mock-chunk-delay-ms` (the mock's schedule between chunks)
--   ramp_ms=<n>              spread the first requests over this long
--   connections=<n>          wrk's -c (to spread the ramp over all threads' connections)
--   threads=<n>              wrk's -t
--
-- One request per connection: after its response a connection idles (delay() returns an
-- hour) until the bench stops wrk with SIGINT. wrk itself re-sends at once, without
-- asking delay(), when a connection breaks before its response: request() counts those
-- as `resent` (they are real requests and leave usage rows like any other).
-- response() checks each body: `data: [DONE]` at the end and exactly `chunks` content
-- events (`"delta":{"content":`). It costs one pass over a ~100 KB body per stream.

local CONTENT = '"delta":{"content":'
local DONE_EVENT = "data: [DONE]"

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local function script_folder()
  local source = debug.getinfo(1, "S").source
  return string.match(string.sub(source, 2), "^(.*)/[^/]*$") or "."
end

local function read_body()
  local path = script_folder() .. "/request.json"
  local file = assert(io.open(path, "rb"), "bench open_streams.lua: cannot read " .. path)
  local text = file:read("*a")
  file:close()
  return (string.gsub(text, "%s+$", ""))
end

-- Per-thread state (each wrk thread has its own Lua VM); read by done() via thread:get.
local req_string
local quota = 0          -- connections of this thread: requests before any re-send
local spacing_ms = 0     -- ramp step between two connections (over all threads)
local calls = 0          -- delay() calls so far
local started = false    -- wrk calls request() once to verify it before any delay()
local expected_chunks = 0
local nthreads = 1
tid = tid or 0
sent = 0
resent = 0
completed = 0
body_ok = 0
body_short = 0
body_no_done = 0
chunks_seen = 0
statuses = {}

function init(args)
  local o = {}
  for _, arg in ipairs(args) do
    local k, v = string.match(arg, "^([%w_]+)=(.*)$")
    if k == nil then
      error("bench open_streams.lua: argument must be key=value, got " .. arg)
    end
    o[k] = v
  end
  expected_chunks = tonumber(o.chunks or "600")
  local body = read_body()
  body = string.gsub(body, '"max_tokens":%s*%d+', '"max_tokens":' .. expected_chunks)
  body = string.sub(body, 1, -2) .. ',"stream":true}' -- the file ends with its object's }
  local headers = {
    ["Content-Type"] = "application/json",
    ["x-mock-chunks"] = tostring(expected_chunks),
    ["x-mock-completion-tokens"] = tostring(expected_chunks),
  }
  if o.key and o.key ~= "" then
    headers["Authorization"] = "Bearer " .. o.key
  end
  if o.chunk_delay_ms and o.chunk_delay_ms ~= "0" then
    headers["x-mock-chunk-delay-ms"] = o.chunk_delay_ms
  end
  req_string = wrk.format("POST", nil, headers, body)
  nthreads = tonumber(o.threads or "1")
  local connections = tonumber(o.connections or "1")
  quota = math.floor(connections / nthreads) -- wrk gives each thread c / t connections
  spacing_ms = tonumber(o.ramp_ms or "0") / connections
end

function delay()
  started = true
  local i = calls
  calls = calls + 1
  if i >= quota then
    return 3600000 -- this connection's stream is done: idle until SIGINT
  end
  -- Connection i of thread tid is number i * threads + tid of all wrk's connections.
  return math.floor((i * nthreads + tid) * spacing_ms)
end

function request()
  if not started then return req_string end
  if sent >= quota then resent = resent + 1 end
  sent = sent + 1
  return req_string
end

local function count(body, pattern)
  local n, at = 0, 1
  while true do
    local s, e = string.find(body, pattern, at, true)
    if s == nil then return n end
    n = n + 1
    at = e + 1
  end
end

function response(status, headers, body)
  completed = completed + 1
  statuses[status] = (statuses[status] or 0) + 1
  if status ~= 200 then return end
  local n = count(body, CONTENT)
  chunks_seen = chunks_seen + n
  if string.find(body, DONE_EVENT, 1, true) == nil then
    body_no_done = body_no_done + 1
  elseif n ~= expected_chunks then
    body_short = body_short + 1
  else
    body_ok = body_ok + 1
  end
end

function done(summary, latency, requests)
  local totals = {sent = 0, resent = 0, completed = 0, body_ok = 0, body_short = 0,
                  body_no_done = 0, chunks_seen = 0}
  local by_status = {}
  for _, t in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + (t:get(name) or 0)
    end
    for code, n in pairs(t:get("statuses") or {}) do
      by_status[code] = (by_status[code] or 0) + n
    end
  end
  local parts = {}
  for name, value in pairs(totals) do
    table.insert(parts, string.format('"%s":%d', name, value))
  end
  local codes = {}
  for code, n in pairs(by_status) do
    table.insert(codes, string.format('"%d":%d', code, n))
  end
  local e = summary.errors
  table.insert(parts, '"statuses":{' .. table.concat(codes, ",") .. "}")
  table.insert(parts, string.format('"requests":%d', summary.requests))
  table.insert(parts, string.format('"duration_us":%d', summary.duration))
  table.insert(parts, string.format(
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
    e.connect, e.read, e.write, e.status, e.timeout))
  table.insert(parts, string.format(
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d}',
    latency.min, latency.mean, latency.max, latency:percentile(50),
    latency:percentile(90), latency:percentile(99)))
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
