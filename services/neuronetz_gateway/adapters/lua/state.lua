-- state: read a key's and its tenant's limit state, changing nothing (GET /v1/key, /api/key).
-- (Loaded after tpm_window.lua, which defines tpm_window.)
--
-- KEYS: the same 12 as decide.lua (1..6 key, 7..12 tenant), all in one {t<id>} slot:
--   rpm ZSET, conc ZSET, tpm HASH, daily / monthly / total budget counters
-- ARGV: 1 now ms   2 now unix second
--       3..8 key limits, 9..14 tenant limits: rpm tpm concurrency daily monthly total (-1 = unlimited)
-- Only read commands: no hit is counted, no lease taken, nothing expired is deleted
-- (decide.lua's clean-up does that); what left the window is just not counted.
-- Returns one of
--   {"missing", {"key:daily_tokens", ...}}   budget counters to rebuild from the ledger first
--   {"ok", key_state, tenant_state}
--     state = {requests, binding hit ms, concurrency, window_tokens, daily, monthly, total,
--              {second, tokens, second, tokens, ...}}
--     -1 where the limit is not set; the binding hit is the one whose departure from the
--     60 s window makes room again (-1 when the window is empty)
local now_ms = tonumber(ARGV[1])
local now_s = tonumber(ARGV[2])

local WINDOW_MS = 60000
local LEVELS = {"key", "tenant"}
local BUDGETS = {"daily_tokens", "monthly_tokens", "total_tokens"}

local function key_of(level, i) return KEYS[(level - 1) * 6 + i] end
local function limit_of(level, i)
  local v = tonumber(ARGV[2 + (level - 1) * 6 + i])
  if v < 0 then return nil end
  return v
end
-- limit index: 1 rpm, 2 tpm, 3 concurrency, 4 daily, 5 monthly, 6 total
-- key index:   1 rpm, 2 conc, 3 tpm, 4 daily, 5 monthly, 6 total

local states = {}
local missing = {}
for level = 1, 2 do
  local s = {-1, -1, -1, -1, -1, -1, -1, {}}
  local rpm = limit_of(level, 1)
  if rpm then
    local rpm_key = key_of(level, 1)
    local oldest = "(" .. (now_ms - WINDOW_MS)
    local count = redis.call("ZCOUNT", rpm_key, oldest, "+inf")
    s[1] = count
    if count > 0 then
      local index = count - rpm
      if index < 0 then index = 0 end
      local hit = redis.call("ZRANGEBYSCORE", rpm_key, oldest, "+inf", "WITHSCORES", "LIMIT", index, 1)
      s[2] = tonumber(hit[2]) or -1
    end
  end
  if limit_of(level, 3) then
    s[3] = redis.call("ZCOUNT", key_of(level, 2), "(" .. now_ms, "+inf")
  end
  if limit_of(level, 2) then
    local sum, live = tpm_window(redis.call("HGETALL", key_of(level, 3)), now_s)
    s[4] = sum
    s[8] = live
  end
  for b = 1, 3 do
    if limit_of(level, 3 + b) then
      local value = redis.call("GET", key_of(level, 3 + b))
      if value then
        s[4 + b] = tonumber(value)
      else
        missing[#missing + 1] = LEVELS[level] .. ":" .. BUDGETS[b]
      end
    end
  end
  states[level] = s
end
if #missing > 0 then return {"missing", missing} end
return {"ok", states[1], states[2]}
