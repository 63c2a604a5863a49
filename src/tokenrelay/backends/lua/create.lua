-- A new, empty log for a run: no events, and its state hash (a reused id starts over).
-- KEYS: events, meta.  ARGV: running_ttl_ms.
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[2], 'sealed', 0, 'dropped', 0, 'bytes', 0, 'last', 0)
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 0
