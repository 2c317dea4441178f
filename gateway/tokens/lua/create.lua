-- Create a session hash with its expiry. KEYS[1] session hash; ARGV[1] expire_at_ms, then field/value pairs
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
return 1
