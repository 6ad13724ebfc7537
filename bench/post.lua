-- wrk script for `python -m bench`: POST an OpenAI chat completion, count exactly what
-- was sent, optionally hold a fixed rate, stop cleanly, and print one JSON summary line.
--
--   wrk -t1 -c16 -d12s --latency -s bench/post.lua URL -- key=value ...
--
-- Arguments (all optional):
--   key=<api key>        sent as `Authorization: Bearer <key>`
--   stream=1             `"stream": true` (the body; the mock's chunk count is `chunks`)
--   chunks=<n>           `x-mock-chunks: n` (streamed content chunks the mock sends)
--   chunk_delay_ms=<n>   `x-mock-chunk-delay-ms: n` (the mock's pause between chunks)
--   completion_tokens=<n> `x-mock-completion-tokens: n` (the mock's answer length; it
--                        streams min(chunks, tokens) chunks, so streams need n >= chunks)
--   rate=<rps>           fixed request rate over all of this run's threads (0: as fast as
--                        the connections go). wrk2 is not available, so this is a per-
--                        thread schedule in `delay()`: every request takes the thread's
--                        next free slot (slots 1/rate_per_thread apart); a late request is
--                        sent at once, never in a burst to catch up.
--   threads=<n>          wrk's -t, to split `rate` between threads
--   stop_after=<s>       stop SENDING after this many seconds (then wait, idle, until
--                        wrk's -d ends), so no request is in flight when wrk exits and
--                        "sent" is exact: the usage rows written must equal it.
--
-- Why `delay()` always: a clean stop needs it, and every target gets the same script so
-- the comparison stays fair (it costs wrk one timer event per request).
-- Why `request()` (a dynamic script): it is the only place to count requests sent; it
-- returns one request string built once in init(), so the cost is a Lua call.
-- No `response()`: that would make wrk parse every response's headers and body. wrk
-- itself counts responses with status > 399 (`errors.status`) and socket errors.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
int clock_gettime(int clk_id, bench_timespec_t *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec_t")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

-- The request body: bench/request.json (next to this script; h2load posts the same file),
-- a ~450-byte chat completion like the one ENVOY-NOTES.md's costs were measured with.
local function script_folder()
  local source = debug.getinfo(1, "S").source
  return string.match(string.sub(source, 2), "^(.*)/[^/]*$") or "."
end

local function read_body()
  local path = script_folder() .. "/request.json"
  local file = assert(io.open(path, "rb"), "bench post.lua: cannot read " .. path)
  local text = file:read("*a")
  file:close()
  return (string.gsub(text, "%s+$", ""))
end

-- Defaults a wrapper script (stream.lua) may set before loading this file.
BENCH_DEFAULTS = BENCH_DEFAULTS or {}

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua VM).
local req_string
local interval_ms = nil
local next_slot = 0
local stop_at = nil
local started = false -- wrk calls request() once to verify it before any delay()
sent = 0
first_sent_ms = -1
last_sent_ms = -1

local function parse_args(args)
  local options = {}
  for k, v in pairs(BENCH_DEFAULTS) do options[k] = v end
  for _, arg in ipairs(args) do
    local k, v = string.match(arg, "^([%w_]+)=(.*)$")
    if k == nil then
      error("bench post.lua: argument must be key=value, got " .. arg)
    end
    options[k] = v
  end
  return options
end

function init(args)
  local o = parse_args(args)
  local stream = o.stream == "1" or o.stream == "true"
  local body = read_body()
  if stream then
    body = string.sub(body, 1, -2) .. ',"stream":true}' -- the file ends with its object's }
  end
  local headers = {["Content-Type"] = "application/json"}
  if o.key and o.key ~= "" then
    headers["Authorization"] = "Bearer " .. o.key
  end
  if o.chunks and o.chunks ~= "" then
    headers["x-mock-chunks"] = o.chunks
  end
  if o.completion_tokens and o.completion_tokens ~= "" then
    headers["x-mock-completion-tokens"] = o.completion_tokens
  end
  if o.chunk_delay_ms and o.chunk_delay_ms ~= "" and o.chunk_delay_ms ~= "0" then
    headers["x-mock-chunk-delay-ms"] = o.chunk_delay_ms
  end
  req_string = wrk.format("POST", nil, headers, body)

  local rate = tonumber(o.rate or "0") or 0
  local nthreads = tonumber(o.threads or "1") or 1
  if rate > 0 then
    interval_ms = 1000.0 * nthreads / rate
  end
  local start = now_ms()
  next_slot = start
  local stop_after = tonumber(o.stop_after or "0") or 0
  if stop_after > 0 then
    stop_at = start + stop_after * 1000.0
  end
end

function delay()
  started = true
  local now = now_ms()
  if stop_at ~= nil and now >= stop_at then
    return 3600000 -- idle until wrk's -d ends: no new request, none in flight
  end
  if interval_ms == nil then
    return 0
  end
  local slot = next_slot
  if slot < now then slot = now end
  next_slot = slot + interval_ms
  return math.floor(slot - now)
end

function request()
  if not started then return req_string end
  local now = now_ms()
  if first_sent_ms < 0 then first_sent_ms = now end
  last_sent_ms = now
  sent = sent + 1
  return req_string
end

function done(summary, latency, requests)
  local total_sent, first, last = 0, -1, -1
  for _, t in ipairs(threads) do
    total_sent = total_sent + (t:get("sent") or 0)
    local f, l = t:get("first_sent_ms"), t:get("last_sent_ms")
    if f ~= nil and f >= 0 and (first < 0 or f < first) then first = f end
    if l ~= nil and l > last then last = l end
  end
  local e = summary.errors
  local parts = {
    string.format('"sent":%d', total_sent),
    string.format('"requests":%d', summary.requests),
    string.format('"duration_us":%d', summary.duration),
    string.format('"send_window_ms":%.3f', (first >= 0 and last >= first) and (last - first) or 0),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,' ..
      '"p50":%d,"p90":%d,"p99":%d,"p999":%d}',
      latency.min, latency.mean, latency.max, latency.stdev,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9)),
  }
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
