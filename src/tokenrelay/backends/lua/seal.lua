-- A run has its terminal event: mark it sealed, keep all its keys for the retention, wake readers.
-- KEYS: events, meta, info, readers.  ARGV: retention_ms, wake channel.
-- Returns 0, or -1 when the run does not exist. Sealing again changes nothing.
local sealed = redis.call('HGET', KEYS[2], 'sealed')
if not sealed then
  return -1
end
if sealed == '1' then
  return 0
end
redis.call('HSET', KEYS[2], 'sealed', 1)
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, ARGV[1])
end
redis.call('PUBLISH', ARGV[2], 'sealed')
return 0
