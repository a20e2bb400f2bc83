-- renew / release one concurrency lease at both levels (absent members are left alone).
--
-- KEYS: 1 key-level lease ZSET, 2 tenant-level lease ZSET (one {t<id>} slot)
-- ARGV: 1 "renew" | "release"   2 lease id   3 new expiry ms   4 lease ZSET ttl ms
-- A renewal never resurrects a lease that already expired and was purged:
-- its slot may have been given to someone else meanwhile.
for i = 1, 2 do
  if ARGV[1] == "release" then
    redis.call("ZREM", KEYS[i], ARGV[2])
  elseif redis.call("ZADD", KEYS[i], "XX", "CH", ARGV[3], ARGV[2]) == 1 then
    redis.call("PEXPIRE", KEYS[i], ARGV[4])
  end
end
return 0
