-- Take an amount from a sliding window if it fits under the limit (requests or tokens).
-- Two fixed buckets aligned to multiples of the window approximate it: the current bucket
-- counts fully, the previous one by the part of it still inside the window (guards/counters.py).
-- KEYS: the counter, a hash: b (the current bucket's number), c (its count), p (the previous's).
-- ARGV: amount, limit, window_ms.
-- Returns {allowed (1|0), remaining, ms until the amount fits (refused) or the bucket ends, b}.
local key = KEYS[1]
local amount, limit, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local bucket = math.floor(now / window)
local elapsed = now - bucket * window
local state = redis.call('HMGET', key, 'b', 'c', 'p')
local stored = tonumber(state[1])
local current, previous = 0, 0
if stored == bucket then
  current, previous = tonumber(state[2]), tonumber(state[3])
elseif stored == bucket - 1 then
  previous = tonumber(state[2])
end
local used = previous * (window - elapsed) / window + current
if used + amount <= limit then
  redis.call('HSET', key, 'b', bucket, 'c', current + amount, 'p', previous)
  -- A bucket counts for two windows at most: as the current one, then as the previous one.
  redis.call('PEXPIRE', key, 2 * window)
  return {1, math.floor(limit - used - amount), window - elapsed, bucket}
end
local wait
if amount > limit then
  wait = 2 * window -- never fits
elseif current + amount <= limit then
  -- Within this bucket, once the previous bucket's weight has fallen enough.
  wait = math.max(0, (1 - (limit - current - amount) / previous) * window - elapsed)
else
  -- In the next bucket, once this bucket's count, then the previous one, has faded enough.
  wait = window - elapsed + (1 - (limit - amount) / current) * window
end
return {0, math.max(0, math.floor(limit - used)), math.ceil(wait), bucket}
