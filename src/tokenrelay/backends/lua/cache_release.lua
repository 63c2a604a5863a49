-- Forget a claim on a cache key, only if the run that releases it still holds it.
-- KEYS: the claim.  ARGV: run id.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
