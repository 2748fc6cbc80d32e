-- wrk script for mindroom-billing's internal API (see scripts/scale.sh and scripts/compare-pg.sh):
--   API_MODE=usage         POST /v1/usage {"account_id","metric":"messages","count":1}
--   API_MODE=entitlements  GET /v1/accounts/{id}/entitlements
-- Account ids, one per line, from LOAD_DIR/accounts.txt (each thread walks them from its own offset);
-- the bearer key from BILLING_API_KEY. Responses other than 2xx (a 429 over the daily limit) are
-- counted by wrk as "Non-2xx"; 429 is an answer, not a failure, for this load.

local dir = os.getenv("LOAD_DIR") or "/tmp/mindroom-load"
local mode = os.getenv("API_MODE") or "usage"
local key = os.getenv("BILLING_API_KEY") or ""

local ids = {}
local n = 0
local i = 0
local threads = {}
thread_id = 0

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(dir .. "/accounts.txt") do
    n = n + 1
    ids[n] = line
  end
  assert(n > 0, "no account ids in " .. dir .. "/accounts.txt")
  i = (thread_id * 7919) % n
  wrk.headers["Authorization"] = "Bearer " .. key
  if mode == "usage" then
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
  else
    wrk.method = "GET"
  end
end

function request()
  i = i % n + 1
  local id = ids[i]
  if mode == "usage" then
    return wrk.format(nil, "/v1/usage", nil, '{"account_id":"' .. id .. '","metric":"messages","count":1}')
  end
  return wrk.format(nil, "/v1/accounts/" .. id .. "/entitlements")
end
