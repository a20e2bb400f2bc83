-- A backend's slots and its queue, fair across tenants (start-time fair queuing).
--
-- KEYS (one {b<backend>} hash tag, so one Redis Cluster slot):
--   1 slots  ZSET lease id -> expiry ms         (the slots held now)
--   2 queue  ZSET ticket   -> start tag         (waiting; ties by ticket = arrival order)
--   3 alive  ZSET ticket   -> deadline ms       (a waiter that stops polling is dropped)
--   4 meta   HASH v = virtual time, seq = arrival counter, f:<tenant> = tenant's finish tag
--   5 wake   STREAM of tickets just given a slot (every replica's waker reads it)
-- ARGV: 1 mode (acquire | poll | release | renew | state)
--       2 now ms   3 capacity   4 lease ttl ms   5 grace ms (a waiter's poll deadline,
--       and how long a slot handed to a waiter waits for it to take it)
--       6 lease id / ticket (acquire: a nonce)   7 tenant (acquire)   8 cost = 1/weight (acquire)
--
-- Fairness: a tenant's request gets start tag max(v, f[tenant]); f[tenant] becomes
-- start + cost; the smallest start tag is served first and v follows the tags served.
-- A tenant with 30 waiting holds tags v .. v+29, a newcomer gets v: it waits for one
-- slot to free, not for the other tenant's backlog. Per tenant, tags grow: FIFO.
local slots, queue, alive, meta, wake = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local mode = ARGV[1]
local now = tonumber(ARGV[2])
local capacity = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local grace = tonumber(ARGV[5])
local id = ARGV[6]
local keep = ttl + grace + 60000 -- every key outlives its longest entry

local function purge()
  redis.call("ZREMRANGEBYSCORE", slots, "-inf", now)
  local dead = redis.call("ZRANGEBYSCORE", alive, "-inf", now)
  for i = 1, #dead do
    redis.call("ZREM", queue, dead[i])
  end
  if #dead > 0 then
    redis.call("ZREMRANGEBYSCORE", alive, "-inf", now)
  end
end

local function advance(tag)
  local v = tonumber(redis.call("HGET", meta, "v") or "0")
  if tag > v then
    redis.call("HSET", meta, "v", tostring(tag))
  end
end

-- hand free slots to the queue's head, in tag order; the waiters learn it from the stream
local function pump()
  local held = redis.call("ZCARD", slots)
  local woke = 0
  while held < capacity do
    local head = redis.call("ZRANGE", queue, 0, 0, "WITHSCORES")
    if #head == 0 then
      break
    end
    redis.call("ZREM", queue, head[1])
    redis.call("ZREM", alive, head[1])
    redis.call("ZADD", slots, now + grace, head[1])
    advance(tonumber(head[2]))
    redis.call("XADD", wake, "MAXLEN", "~", 512, "*", "t", head[1])
    held = held + 1
    woke = woke + 1
  end
  if woke > 0 then
    redis.call("PEXPIRE", wake, keep)
  end
  return held
end

local function touch()
  redis.call("PEXPIRE", slots, keep)
  redis.call("PEXPIRE", meta, keep)
  if redis.call("ZCARD", queue) > 0 then
    redis.call("PEXPIRE", queue, keep)
    redis.call("PEXPIRE", alive, keep)
  end
end

purge()

if mode == "renew" then
  -- never resurrects a lease that expired: its slot may be someone else's now
  local renewed = redis.call("ZADD", slots, "XX", "CH", now + ttl, id)
  touch()
  return renewed
end

if mode == "release" then
  redis.call("ZREM", slots, id)
  redis.call("ZREM", queue, id)
  redis.call("ZREM", alive, id)
  local held = pump()
  touch()
  return {held, redis.call("ZCARD", queue)}
end

if mode == "state" then
  local held = pump()
  return {held, redis.call("ZCARD", queue)}
end

local last = redis.call("XREVRANGE", wake, "+", "-", "COUNT", 1)
local last_id = "0-0"
if #last > 0 then
  last_id = last[1][1]
end

if mode == "acquire" then
  local held = pump()
  local tenant = "f:" .. ARGV[7]
  local cost = tonumber(ARGV[8])
  local v = tonumber(redis.call("HGET", meta, "v") or "0")
  local start = math.max(v, tonumber(redis.call("HGET", meta, tenant) or "0"))
  redis.call("HSET", meta, tenant, tostring(start + cost))
  if held < capacity and redis.call("ZCARD", queue) == 0 then
    redis.call("ZADD", slots, now + ttl, id)
    advance(start)
    touch()
    return {"granted", id, held + 1, 0, last_id}
  end
  local seq = redis.call("HINCRBY", meta, "seq", 1)
  local ticket = string.format("%016d", seq) .. "-" .. id
  redis.call("ZADD", queue, start, ticket)
  redis.call("ZADD", alive, now + grace, ticket)
  touch()
  return {"queued", ticket, held, redis.call("ZRANK", queue, ticket), last_id}
end

if mode == "poll" then
  local held = pump()
  if redis.call("ZSCORE", slots, id) then
    redis.call("ZADD", slots, now + ttl, id) -- taken: the full lease from now
    touch()
    return {"granted", id, held, 0, last_id}
  end
  local rank = redis.call("ZRANK", queue, id)
  if rank then
    redis.call("ZADD", alive, now + grace, id)
    touch()
    return {"queued", id, held, rank, last_id}
  end
  return {"gone", id, held, -1, last_id}
end

return redis.error_reply("slots.lua: unknown mode " .. tostring(mode))
