-- wrk script for mindroom-billing: POSTs signed Stripe events to /webhooks/stripe.
-- Generated inputs (see scripts/load.sh):
--   LOAD_DIR/body.json     the event, minified; its id is the placeholder evt_LOADTEST_000000000000
--   LOAD_DIR/sigs.txt      "<12-digit id suffix> <timestamp> <v1 hex>" per line (distinct mode)
--   LOAD_DIR/same.txt      "<timestamp> <v1 hex>" for the unchanged body (same mode)
-- Mode from LOAD_MODE: "same" (every request the same event: the duplicate path) or "distinct"
-- (every request a new event id: record + decide + commit).

local dir = os.getenv("LOAD_DIR") or "/tmp/mindroom-load"
local mode = os.getenv("LOAD_MODE") or "same"
local placeholder = "000000000000"

local function read(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. path)
  local s = f:read("*a")
  f:close()
  return s
end

local body = read(dir .. "/body.json")
local prefix, suffix
local sigs = {}
local n = 0
local i = 0
local counter = 0

-- Set in each thread's state by setup() (globals: thread:set cannot reach locals).
thread_id = 0
thread_total = 1
local threads = {}

function setup(thread)
  -- A thread starts (and runs init) right after its setup, so the total comes from the environment.
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if mode == "same" then
    local t, v1 = read(dir .. "/same.txt"):match("(%d+) (%x+)")
    wrk.headers["Stripe-Signature"] = "t=" .. t .. ",v1=" .. v1
    wrk.body = body
    req = wrk.format()
  else
    local at = body:find(placeholder, 1, true)
    prefix = body:sub(1, at - 1)
    suffix = body:sub(at + #placeholder)
    for line in io.lines(dir .. "/sigs.txt") do
      n = n + 1
      sigs[n] = line
    end
    thread_total = tonumber(os.getenv("LOAD_THREADS") or "1")
    i = thread_id
  end
end

function request()
  if mode == "same" then
    return req
  end
  i = i + thread_total
  if i > n then i = (i % thread_total) + 1 end  -- wrapped: from here on, duplicates
  counter = counter + 1
  local id, t, v1 = sigs[i]:match("(%d+) (%d+) (%x+)")
  return wrk.format(nil, nil, { ["Stripe-Signature"] = "t=" .. t .. ",v1=" .. v1 }, prefix .. id .. suffix)
end

function done(summary, latency, requests)
  io.write(string.format("mode=%s requests=%d duration_s=%.1f req_per_s=%.0f\n", mode, summary.requests,
    summary.duration / 1e6, summary.requests / (summary.duration / 1e6)))
  io.write(string.format("latency_ms p50=%.2f p90=%.2f p99=%.2f p99.9=%.2f max=%.2f\n",
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000))
  local e = summary.errors
  io.write(string.format("errors connect=%d read=%d write=%d status=%d timeout=%d\n", e.connect, e.read, e.write,
    e.status, e.timeout))
  local ids = tonumber(os.getenv("IDS") or "0")
  if mode == "distinct" and summary.requests > ids then
    io.write(string.format("note: %d requests > %d prepared ids: the rest were duplicates\n", summary.requests, ids))
  end
end
