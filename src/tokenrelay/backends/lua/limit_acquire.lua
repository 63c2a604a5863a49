-- Take a concurrent-stream slot for a holder unless the limit is held. Each slot has a lease,
-- so the slots of an instance that died without releasing them come back by themselves.
-- KEYS: the slots, a sorted set: holder -> end of its lease (ms, Redis time).
-- ARGV: limit, lease_ms, holder.
-- Returns {acquired (1|0), slots held, ms until the oldest lease ends (refused) or 0}.
local key = KEYS[1]
local limit, lease, holder = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local held = redis.call('ZCARD', key)
local renewing = redis.call('ZSCORE', key, holder)
if not renewing and held >= limit then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return {0, held, tonumber(oldest[2]) - now}
end
redis.call('ZADD', key, now + lease, holder)
if redis.call('PTTL', key) < lease then
  redis.call('PEXPIRE', key, lease)
end
if not renewing then
  held = held + 1
end
return {1, held, 0}
