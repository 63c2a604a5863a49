-- Count a run's readers on every instance; never below 0, and expiring with the run's record.
-- KEYS: readers, info.  ARGV: delta, ttl_ms used when the run has no record.
local delta = tonumber(ARGV[1])
if delta == 0 then
  return math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), 0)
end
local count = redis.call('INCRBY', KEYS[1], delta)
if count <= 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
local ttl = redis.call('PTTL', KEYS[2])
if ttl <= 0 then
  ttl = ARGV[2]
end
redis.call('PEXPIRE', KEYS[1], ttl)
return count
