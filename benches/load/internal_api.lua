-- wrk script for mindroom-billing's internal API (see scripts/compare-pg.sh).
--   API_MODE=usage         POST /v1/usage {"account_id","metric":"api_calls","count":1}
--   API_MODE=entitlements  GET /v1/accounts/{id}/entitlements
-- Accounts: one uuid per line in API_ACCOUNTS (a file); each request takes the next one.
-- Bearer key from BILLING_API_KEY.

local mode = os.getenv("API_MODE") or "entitlements"
local key = os.getenv("BILLING_API_KEY")
assert(key, "set BILLING_API_KEY")
local path = os.getenv("API_ACCOUNTS")
assert(path, "set API_ACCOUNTS")
local accounts = {}
for line in io.lines(path) do
  if #line > 0 then accounts[#accounts + 1] = line end
end
local i = 0

function init(args)
  wrk.headers["Authorization"] = "Bearer " .. key
  wrk.headers["Content-Type"] = "application/json"
  i = math.random(#accounts)
end

function request()
  i = (i % #accounts) + 1
  local account = accounts[i]
  if mode == "usage" then
    return wrk.format("POST", "/v1/usage", nil,
      '{"account_id":"' .. account .. '","metric":"api_calls","count":1}')
  end
  return wrk.format("GET", "/v1/accounts/" .. account .. "/entitlements")
end

function done(summary, latency, requests)
  io.write(string.format("mode=%s requests=%d req_per_s=%.0f p50_ms=%.2f p99_ms=%.2f non2xx=%d\n", mode,
    summary.requests, summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, summary.errors.status))
end
