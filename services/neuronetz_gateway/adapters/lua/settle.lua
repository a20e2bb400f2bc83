-- settle: correct a reservation by delta = actual - reserved (may be negative),
-- and release the request's concurrency lease in the same round trip.
--
-- KEYS, 7 per level (1..7 key, 8..14 tenant), then 15 / 16, all in one {t<id>} slot:
--   rpm ZSET, tpm HASH, daily and monthly counters of the reservation's period,
--   total counter, daily and monthly counters of the current period;
--   15 key-level and 16 tenant-level lease ZSETs;
--   17 the tenant's reservation ZSET, 18 its HASH (see decide.lua)
--   19..24 the rebuilt marks (rebuild.lua) of KEYS 3, 4, 5, 10, 11, 12
-- ARGV: 1 delta   2 reservation unix second   3 now ms   4 now unix second
--       5 lease id to release ("" = none)   6 "1" = return the stats, "0" = return {}
--       7 reservation id ("" = none recorded)   8 actual tokens
--       9 until when (ms) the reservation's "settled" mark is kept
--       10 when the request's audit row was queued (ms; "" = not yet)
-- The reservation's record becomes the mark "settled" (expiring at ARGV[9]: decide.lua
-- sweeps it then and gives nothing back). If the record was gone already (decide.lua
-- swept it after its expiry and took its tokens back, or none was recorded), the budget
-- counters get the whole actual amount instead of the delta, so a late settle is never
-- corrected twice. If the mark is there, this settle ran before (a retry of one whose
-- answer was lost): no counter and no bucket is touched again, so a settle applied twice
-- charges once. The TPM bucket is never swept: it gets the delta (once).
-- A counter rebuilt from a ledger read after the audit row was queued (its rebuilt
-- mark at or after ARGV[10]) holds this request already: with the record gone (Redis
-- lost it with the counter), that counter is not charged again.
-- Only what exists is adjusted: a missing counter is rebuilt from the ledger
-- later (which then holds the real count), a TPM bucket that left the window
-- no longer matters. Counters never go below zero.
-- Returns {key_stats, tenant_stats}: {requests, window_tokens, daily, monthly, total},
-- -1 where the counter does not exist (or {} when not asked for).
local delta = tonumber(ARGV[1])
local reserved_s = tonumber(ARGV[2])
local now_ms = tonumber(ARGV[3])
local now_s = tonumber(ARGV[4])

local function key_of(level, i) return KEYS[(level - 1) * 7 + i] end

local counter_delta = delta
local rebuilt = {}
if ARGV[7] ~= "" then
  local record = redis.call("HGET", KEYS[18], ARGV[7])
  if record == "settled" then
    counter_delta = 0
    delta = 0
  elseif not record then
    counter_delta = tonumber(ARGV[8])
    if ARGV[10] ~= "" then
      rebuilt = redis.call("MGET", KEYS[19], KEYS[20], KEYS[21], KEYS[22], KEYS[23], KEYS[24])
    end
  end
  redis.call("HSET", KEYS[18], ARGV[7], "settled")
  redis.call("ZADD", KEYS[17], ARGV[9], ARGV[7])
end

-- which of the six reservation-period counters exist, in one MGET (not six EXISTS:
-- each redis.call costs the script more than the read); adjusting one never makes
-- another appear or go
local present = {}
if counter_delta ~= 0 then
  present = redis.call("MGET", KEYS[3], KEYS[4], KEYS[5], KEYS[10], KEYS[11], KEYS[12])
end

local function adjust(counter_key, index)
  if counter_delta == 0 or not present[index] then return end
  if rebuilt[index] and tonumber(rebuilt[index]) >= tonumber(ARGV[10]) then return end
  if redis.call("INCRBY", counter_key, counter_delta) < 0 then
    redis.call("SET", counter_key, 0, "KEEPTTL")
  end
end

local function read(counter_key)
  local value = redis.call("GET", counter_key)
  if value then return tonumber(value) end
  return -1
end

-- The caller reads its clock just before reserve; the script may have charged
-- the next second's bucket, so that one is tried too. Either way the window
-- sum is what is corrected; only when the tokens expire moves by a second.
-- The hash's running total TPM_SUM (see tpm_window.lua) takes the bucket's change
-- too, if it is there (missing, decide.lua sums the buckets anew).
local TPM_SUM = "0"
local function adjust_bucket(tpm_key)
  if delta == 0 then return end
  -- (the next second only when the first is not there: a miss reads the whole hash)
  local found = redis.call("HMGET", tpm_key, reserved_s, TPM_SUM)
  local second
  if reserved_s > now_s - 60 and found[1] then
    second = reserved_s
  elseif reserved_s + 1 > now_s - 60 and redis.call("HEXISTS", tpm_key, reserved_s + 1) == 1 then
    second = reserved_s + 1
  else
    return
  end
  local change = delta
  local value = redis.call("HINCRBY", tpm_key, second, delta)
  if value < 0 then
    redis.call("HSET", tpm_key, second, 0)
    change = delta - value
  end
  if found[2] then redis.call("HINCRBY", tpm_key, TPM_SUM, string.format("%d", change)) end
end

if ARGV[5] ~= "" then
  redis.call("ZREM", KEYS[15], ARGV[5])
  redis.call("ZREM", KEYS[16], ARGV[5])
end

local result = {}
for level = 1, 2 do
  local tpm_key = key_of(level, 2)
  adjust_bucket(tpm_key)
  adjust(key_of(level, 3), (level - 1) * 3 + 1)
  adjust(key_of(level, 4), (level - 1) * 3 + 2)
  adjust(key_of(level, 5), (level - 1) * 3 + 3)

  if ARGV[6] == "1" then
    local requests = redis.call("ZCOUNT", key_of(level, 1), "(" .. (now_ms - 60000), "+inf")
    local fields = redis.call("HGETALL", tpm_key)
    local window = 0
    for i = 1, #fields, 2 do
      if tonumber(fields[i]) > now_s - 60 then window = window + tonumber(fields[i + 1]) end
    end
    result[level] = {requests, window, read(key_of(level, 6)), read(key_of(level, 7)),
                     read(key_of(level, 5))}
  end
end
return result
