-- Correct what a reservation took, in the bucket it was taken in, if that bucket still counts.
-- KEYS: the counter (see limit_window.lua).  ARGV: delta (negative: a refund), bucket.
-- Returns 1 if a count changed, 0 if the bucket no longer counts.
local state = redis.call('HMGET', KEYS[1], 'b', 'c', 'p')
local stored = tonumber(state[1])
local delta, bucket = tonumber(ARGV[1]), tonumber(ARGV[2])
if stored == bucket then
  redis.call('HSET', KEYS[1], 'c', math.max(0, tonumber(state[2]) + delta))
elseif stored == bucket + 1 then
  redis.call('HSET', KEYS[1], 'p', math.max(0, tonumber(state[3]) + delta))
else
  return 0
end
return 1
