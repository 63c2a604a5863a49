-- A run ended: replace its record, and keep record and reader count for the retention only.
-- KEYS: info, readers.  ARGV: the record (JSON), retention_ms.
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 0
