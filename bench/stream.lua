-- wrk script for `python -m bench`: the streaming variant of post.lua
-- (`"stream": true`, `x-mock-chunks: 50` and `x-mock-completion-tokens: 50` unless
-- `chunks=` / `completion_tokens=` say otherwise: the mock streams min(chunks, tokens)).
-- Every argument of post.lua applies.

BENCH_DEFAULTS = {stream = "1", chunks = "50", completion_tokens = "50"}

local source = debug.getinfo(1, "S").source
local folder = string.match(string.sub(source, 2), "^(.*)/[^/]*$") or "."
dofile(folder .. "/post.lua")
