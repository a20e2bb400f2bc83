-- rebuild: write budget counters lost from Redis with their ledger values, each only
-- if it is still missing (SET NX: a racing rebuilder wins), and beside each counter
-- written the time its ledger was read (its "rebuilt" mark). settle.lua reads the mark:
-- a settlement whose audit row was queued before it is in that counter already.
--
-- KEYS: n counters, then their n marks (same {t<id>} slot)
-- ARGV: 1 ledger read time (ms)   2 the marks' lifetime (ms)
--       then per counter: value, expiry in seconds (-1 = none)
local n = #KEYS / 2
for i = 1, n do
  local value = ARGV[1 + i * 2]
  local ttl = tonumber(ARGV[2 + i * 2])
  local written
  if ttl < 0 then
    written = redis.call("SET", KEYS[i], value, "NX")
  else
    written = redis.call("SET", KEYS[i], value, "NX", "EX", ttl)
  end
  if written then
    redis.call("SET", KEYS[n + i], ARGV[1], "PX", ARGV[2])
  end
end
return 0
