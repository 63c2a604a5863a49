-- Record which run generates a cache key, unless another run already does.
-- KEYS: the claim.  ARGV: run id, ttl_ms.  Returns nil when the claim is the run's, else the
-- id of the run that holds it.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return holder
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
