-- Check-and-rotate a refresh token in one atomic step.
-- KEYS[1] session hash, KEYS[2] grace blob (same hash tag: one slot)
-- ARGV: gen, presented_hash, new_hash, now_ms, idle_ms, grace_ms, grace_blob
-- Replies: {'rotated', exp_ms, sub, roles, extra, mac_key} | {'grace', blob, sub, roles, extra, mac_key}
--          {'reused', sub} | {'verify', mac_key, sub} | {'revoked'} | {'expired'} | {'missing'} | {'invalid'}
local s = KEYS[1]
local f = redis.call('HMGET', s, 'g', 'h', 'p', 'x', 'm', 'rv', 'sub', 'r', 'e', 'k')
if not f[1] then return {'missing'} end
if f[6] then return {'revoked'} end
local g = tonumber(f[1])
local gen = tonumber(ARGV[1])
local now = tonumber(ARGV[4])
if tonumber(f[4]) <= now then return {'expired'} end
local sub, roles, extra = f[7], f[8] or '', f[9] or ''
if gen == g and f[2] == ARGV[2] then
  local exp = math.min(now + tonumber(ARGV[5]), tonumber(f[5]))
  redis.call('HSET', s, 'g', g + 1, 'h', ARGV[3], 'p', f[2], 'u', now, 'x', exp)
  redis.call('PEXPIREAT', s, exp)
  redis.call('SET', KEYS[2], ARGV[7], 'PX', ARGV[6])
  return {'rotated', exp, sub, roles, extra, f[10]}
end
if gen == g - 1 and f[3] == ARGV[2] then
  local blob = redis.call('GET', KEYS[2])
  if blob then return {'grace', blob, sub, roles, extra, f[10]} end
  -- The previous token, presented after the grace window: theft. Revoke the family now, in the
  -- same step, so the successor the thief (or victim) holds stops working.
  redis.call('HSET', s, 'rv', 'reused')
  redis.call('HDEL', s, 'h', 'p', 'k', 'ua', 'e')
  local n = 1  -- and the rest of a long User-Agent: chunks ua1, ua2, ... (store.py)
  while redis.call('HDEL', s, 'ua' .. n) == 1 do n = n + 1 end
  redis.call('DEL', KEYS[2])
  return {'reused', sub}
end
if gen < g - 1 then return {'verify', f[10], sub} end
return {'invalid'}
