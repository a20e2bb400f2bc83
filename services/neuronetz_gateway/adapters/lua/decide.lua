-- admit / reserve: check key and tenant limits together, record only if all pass.
-- (Loaded after tpm_window.lua, which defines tpm_window.)
--
-- KEYS, 6 per level (1..6 key, 7..12 tenant), all in one {t<id>} slot:
--   rpm ZSET, conc ZSET, tpm HASH, daily / monthly / total budget counters
--   13 the tenant's reservation ZSET (id -> expiry ms), 14 its HASH (id -> record)
--   15 (optional) the single-use marker of the proxy's signed identity
-- ARGV:
--   1 mode "admit" | "reserve"     2 now ms      3 now unix second
--   4 RPM member (unique per hit)  5 lease id ("" = none)  6 lease expiry ms
--   7 lease ZSET ttl ms            8 tokens to reserve (reserve only)
--   9..14 key limits, 15..20 tenant limits: rpm tpm concurrency daily monthly total (-1 = unlimited)
--   21 reservation id ("" = none; reserve only)   22 reservation expiry ms
--   23 (with KEYS[15]) the marker's lifetime in ms
-- Every call first sweeps up to SWEEP reservations past their expiry (a proxy that
-- died before settling): their tokens leave the budget counters of their own period.
-- The TPM window needs no sweep: its buckets leave the 60 s window by themselves.
-- Its HASH keeps running totals beside the buckets (tpm_window.lua, tpm_totals below):
-- every change to a bucket changes them alike, here and in settle.lua.
-- A record is the reserved amount and the counters it was added to, one per line;
-- settle.lua turns it into the one-line mark "settled", which the sweep just deletes.
-- Returns one of
--   {"missing", {"key:daily_tokens", ...}}   budget counters to rebuild from the ledger first
--   {"replay"}   KEYS[13] was already set: the identity was used before; nothing recorded
--   {"ok" | "refused", key_stats, tenant_stats, refusals}
--     stats = {requests, window_tokens, daily, monthly, total, oldest hit ms, oldest
--     token second}, -1 where not counted (reserve does not count requests: -1)
--     refusal = {reason, level, details...}: rpm -> leaving hit ms; tpm -> second, tokens, ...
local mode = ARGV[1]
local now_ms = tonumber(ARGV[2])
local now_s = tonumber(ARGV[3])
local member = ARGV[4]
local lease_id = ARGV[5]
local lease_expiry_ms = ARGV[6]
local lease_set_ttl_ms = ARGV[7]
local tokens = tonumber(ARGV[8])

local WINDOW_MS = 60000
local RPM_TTL_MS = 61000
local TPM_TTL_S = 120
local TPM_TTL_EVERY_S = 10
local SWEEP = 4
local LEVELS = {"key", "tenant"}
local BUDGETS = {"daily_tokens", "monthly_tokens", "total_tokens"}
-- admit asks "is there any room left?" (one token), reserve asks for the request's tokens
local need = tokens
if mode == "admit" then need = 1 end

local function key_of(level, i) return KEYS[(level - 1) * 6 + i] end
local function limit_of(level, i)
  local v = tonumber(ARGV[8 + (level - 1) * 6 + i])
  if v < 0 then return nil end
  return v
end
-- limit index: 1 rpm, 2 tpm, 3 concurrency, 4 daily, 5 monthly, 6 total
-- key index:   1 rpm, 2 conc, 3 tpm, 4 daily, 5 monthly, 6 total

-- The TPM window of one level: its token sum and oldest second (-1: empty), from the
-- running totals its HASH keeps beside the buckets (see tpm_window.lua): while the
-- oldest bucket is in the window, every bucket is, and their sum is the window's. Once
-- it left (about once a second for a busy key), or the totals are missing (a hash
-- written without them), the buckets are summed as before, those that left deleted,
-- and the totals written anew: one HMGET of two fields instead of a HGETALL of up to
-- 60 buckets (turning those into Lua strings and numbers was most of a decision's
-- cost).
-- Also returns when the hash's TTL was last set (TPM_EXPIRED, unix s; nil: not known).
local function tpm_totals(tpm_key)
  local totals = redis.call("HMGET", tpm_key, TPM_SUM, TPM_OLDEST, TPM_EXPIRED)
  local sum, oldest, expired = tonumber(totals[1]), tonumber(totals[2]), tonumber(totals[3])
  if sum and oldest and oldest > now_s - 60 then return sum, oldest, expired end
  local fields = redis.call("HGETALL", tpm_key)
  if #fields == 0 then return 0, -1, nil end
  local live
  sum, live, oldest = tpm_window(fields, now_s, function(field)
    if tonumber(field) > TOTALS then redis.call("HDEL", tpm_key, field) end
  end)
  if oldest < 0 then
    redis.call("DEL", tpm_key) -- every bucket left the window: nothing to keep
    return 0, -1, nil
  end
  redis.call("HSET", tpm_key, TPM_SUM, string.format("%d", sum),
    TPM_OLDEST, string.format("%d", oldest))
  return sum, oldest, expired
end

-- 0. release reservations nobody settled in time (each is swept once: O(1) amortised,
-- as every reserve adds at most one and every call sweeps up to SWEEP)
local resv_set, resv_data = KEYS[13], KEYS[14]
for _, id in ipairs(redis.call("ZRANGEBYSCORE", resv_set, "-inf", now_ms, "LIMIT", 0, SWEEP)) do
  local record = redis.call("HGET", resv_data, id)
  if record then
    local amount = nil
    for part in string.gmatch(record, "[^\n]+") do
      if not amount then
        amount = part
      elseif redis.call("EXISTS", part) == 1 and redis.call("DECRBY", part, amount) < 0 then
        redis.call("SET", part, 0, "KEEPTTL")
      end
    end
    redis.call("HDEL", resv_data, id)
  end
  redis.call("ZREM", resv_set, id)
end

-- 1. every budget that applies must be known, or the ledger has to rebuild it
-- (one MGET of the six counters: each redis.call costs the script more than the read)
local budget_values = {{}, {}}
local missing = {}
local counters = redis.call("MGET", KEYS[4], KEYS[5], KEYS[6], KEYS[10], KEYS[11], KEYS[12])
for level = 1, 2 do
  for b = 1, 3 do
    local value = counters[(level - 1) * 3 + b]
    if value then
      budget_values[level][b] = tonumber(value)
    elseif limit_of(level, 3 + b) then
      missing[#missing + 1] = LEVELS[level] .. ":" .. BUDGETS[b]
    end
  end
end
if #missing > 0 then return {"missing", missing} end

-- 1b. single use: claim the identity (after the rebuild check, so a rerun is no replay)
if KEYS[15] and not redis.call("SET", KEYS[15], "1", "NX", "PX", ARGV[23]) then
  return {"replay"}
end

-- 2. count and check every limit at both levels; nothing is recorded yet
local stats = {}
local refusals = {}
local tpm_expired = {}
for level = 1, 2 do
  local s = {-1, -1, -1, -1, -1, -1, -1}
  local rpm = limit_of(level, 1)
  -- reserve leaves RPM alone (admit counted the request); its caller uses token values only
  if rpm and mode == "admit" then
    local rpm_key = key_of(level, 1)
    redis.call("ZREMRANGEBYSCORE", rpm_key, "-inf", now_ms - WINDOW_MS)
    local count = redis.call("ZCARD", rpm_key)
    s[1] = count
    local oldest = redis.call("ZRANGE", rpm_key, 0, 0, "WITHSCORES")
    if oldest[2] then s[6] = tonumber(oldest[2]) end
    if count >= rpm then
      -- the hit whose departure brings the count below the limit
      local leaving = redis.call("ZRANGE", rpm_key, count - rpm, count - rpm, "WITHSCORES")
      -- a limit of 0 has no hit to wait for: a whole window (defensive; the CLI refuses 0)
      refusals[#refusals + 1] = {"rpm", LEVELS[level], tonumber(leaving[2]) or now_ms}
    end
  end
  local conc = limit_of(level, 3)
  if conc and mode == "admit" then
    local conc_key = key_of(level, 2)
    redis.call("ZREMRANGEBYSCORE", conc_key, "-inf", now_ms)
    if redis.call("ZCARD", conc_key) >= conc then
      refusals[#refusals + 1] = {"concurrency", LEVELS[level]}
    end
  end
  local tpm = limit_of(level, 2)
  if tpm then
    local tpm_key = key_of(level, 3)
    local sum, oldest, expired = tpm_totals(tpm_key)
    s[7] = oldest
    s[2] = sum
    tpm_expired[level] = expired
    if sum + need > tpm then
      -- every bucket is in the window now (tpm_totals): the refusal lists them
      local _, live = tpm_window(redis.call("HGETALL", tpm_key), now_s)
      local refusal = {"tpm", LEVELS[level]}
      for i = 1, #live do refusal[#refusal + 1] = live[i] end
      refusals[#refusals + 1] = refusal
    end
  end
  for b = 1, 3 do
    local value = budget_values[level][b]
    if value then s[2 + b] = value end
    local budget = limit_of(level, 3 + b)
    if budget and value + need > budget then
      refusals[#refusals + 1] = {BUDGETS[b], LEVELS[level]}
    end
  end
  stats[level] = s
end
if #refusals > 0 then return {"refused", stats[1], stats[2], refusals} end

-- 3. all passed: record at both levels
local reserved_in = {}
for level = 1, 2 do
  local s = stats[level]
  if mode == "admit" then
    if limit_of(level, 1) then
      local rpm_key = key_of(level, 1)
      redis.call("ZADD", rpm_key, ARGV[2], member)
      redis.call("PEXPIRE", rpm_key, RPM_TTL_MS)
      s[1] = s[1] + 1
      if s[6] < 0 then s[6] = now_ms end
    end
    if lease_id ~= "" and limit_of(level, 3) then
      local conc_key = key_of(level, 2)
      redis.call("ZADD", conc_key, lease_expiry_ms, lease_id)
      redis.call("PEXPIRE", conc_key, lease_set_ttl_ms)
    end
  else
    if limit_of(level, 2) and tokens ~= 0 then
      local tpm_key = key_of(level, 3)
      redis.call("HINCRBY", tpm_key, ARGV[3], ARGV[8])
      -- the totals stay true (tpm_totals made them so, or the hash is new)
      redis.call("HINCRBY", tpm_key, TPM_SUM, ARGV[8])
      if s[7] < 0 or now_s < s[7] then redis.call("HSET", tpm_key, TPM_OLDEST, ARGV[3]) end
      -- the hash must outlive its newest bucket's minute: a TTL of TPM_TTL_S set at
      -- most TPM_TTL_EVERY_S ago (by this clock) does, so it is not set on every call
      local expired = tpm_expired[level]
      if not expired or now_s - expired >= TPM_TTL_EVERY_S or now_s < expired then
        redis.call("EXPIRE", tpm_key, TPM_TTL_S)
        redis.call("HSET", tpm_key, TPM_EXPIRED, ARGV[3])
      end
      s[2] = s[2] + tokens
      if s[7] < 0 then s[7] = now_s end
    end
    for b = 1, 3 do
      -- an existing counter of an unset budget is kept true too, so that
      -- setting the budget later starts from the right value
      if budget_values[level][b] and tokens ~= 0 then
        s[2 + b] = redis.call("INCRBY", key_of(level, 3 + b), ARGV[8])
        reserved_in[#reserved_in + 1] = key_of(level, 3 + b)
      end
    end
  end
end
-- (no counter took the tokens: nothing to give back, no record; settle then finds none
-- and charges the actual to whatever counter exists by then, i.e. one rebuilt since)
if mode == "reserve" and #reserved_in > 0 and ARGV[21] ~= "" then
  table.insert(reserved_in, 1, ARGV[8])
  redis.call("HSET", resv_data, ARGV[21], table.concat(reserved_in, "\n"))
  redis.call("ZADD", resv_set, ARGV[22], ARGV[21])
end
return {"ok", stats[1], stats[2], {}}
