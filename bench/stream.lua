-- wrk script for `python -m bench`: the streaming variant of post.lua
-- (`"stream": true`, `x-mock-chunks: 50` unless `chunks=` says otherwise).
-- Every argument of post.lua applies.

BENCH_DEFAULTS = {stream = "1", chunks = "50"}

local source = debug.getinfo(1, "S").source
local folder = string.match(string.sub(source, 2), "^(.*)/[^/]*$") or "."
dofile(folder .. "/post.lua")
