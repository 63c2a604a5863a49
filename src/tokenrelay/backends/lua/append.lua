-- Append a batch of one run's events, trim the run to its bounds, refresh the TTL of its keys
-- and wake its readers on every instance: one call per run per flush, one round trip per flush.
-- KEYS: events, meta, info, readers.
-- ARGV: max_events, max_bytes, running_ttl_ms, wake channel, then seq, type, data per event.
-- Returns the last stored seq, or -1 when the run does not exist (or has expired).
local events, meta = KEYS[1], KEYS[2]
local state = redis.call('HMGET', meta, 'bytes', 'dropped', 'last')
if not state[1] then
  return -1
end
local max_events, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local bytes, dropped, last = tonumber(state[1]), tonumber(state[2]), tonumber(state[3])
local added = 0
for i = 5, #ARGV, 3 do
  local seq = tonumber(ARGV[i])
  -- Skip what is already stored: a batch resent after a lost reply is not appended twice.
  if seq > last then
    redis.call('XADD', events, ARGV[i] .. '-0', 't', ARGV[i + 1], 'd', ARGV[i + 2])
    bytes = bytes + #ARGV[i + 2] + 48
    last = seq
    added = added + 1
  end
end
if added > 0 then
  local length = redis.call('XLEN', events)
  if length > max_events or bytes > max_bytes then
    -- Drop the oldest events, never the last one, until the run is within both bounds.
    local start = '-'
    while length > 1 and (length > max_events or bytes > max_bytes) do
      local chunk = math.max(math.min(length - max_events, length - 1), 16)
      local oldest = redis.call('XRANGE', events, start, '+', 'COUNT', chunk)
      if #oldest == 0 then
        break
      end
      for _, entry in ipairs(oldest) do
        if length <= 1 or (length <= max_events and bytes <= max_bytes) then
          break
        end
        bytes = bytes - (#entry[2][4] + 48) -- the fields are t, type, d, data
        length = length - 1
        dropped = tonumber(string.match(entry[1], '^%d+'))
        start = '(' .. entry[1]
      end
    end
    redis.call('XTRIM', events, 'MINID', (dropped + 1) .. '-0')
  end
  redis.call('HSET', meta, 'bytes', bytes, 'dropped', dropped, 'last', last)
  for _, key in ipairs(KEYS) do
    redis.call('PEXPIRE', key, ARGV[3])
  end
  redis.call('PUBLISH', ARGV[4], last)
end
return last
