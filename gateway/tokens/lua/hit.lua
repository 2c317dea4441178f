-- Fixed-window counter: KEYS[1] counter; ARGV[1] window_ms, ARGV[2] increment (0 = peek)
-- Reply: {count, ms_until_reset}
local n
if tonumber(ARGV[2]) > 0 then
  n = redis.call('INCRBY', KEYS[1], ARGV[2])
  if n == tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
else
  n = tonumber(redis.call('GET', KEYS[1]) or '0')
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
elseif ttl < 0 then
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
