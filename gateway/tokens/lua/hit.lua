-- Fixed-window counter: KEYS[1] counter; ARGV[1] window_ms, ARGV[2] increment
-- (0 = peek; negative = give back earlier increments still in the window, never below zero)
-- Reply: {count, ms_until_reset}
local n
local inc = tonumber(ARGV[2])
if inc > 0 then
  n = redis.call('INCRBY', KEYS[1], inc)
  if n == inc then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
else
  n = tonumber(redis.call('GET', KEYS[1]) or '0')
  if inc < 0 and n > 0 then n = redis.call('DECRBY', KEYS[1], math.min(-inc, n)) end
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
elseif ttl < 0 then
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
