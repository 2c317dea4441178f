-- Revoke one session (its whole token family) and keep a small tombstone until it would expire.
-- KEYS[1] session hash, KEYS[2] grace blob; ARGV[1] reason
-- Reply: sub of the session, or false when there was none (or it was already revoked)
local sub = redis.call('HGET', KEYS[1], 'sub')
if not sub then return false end
if redis.call('HEXISTS', KEYS[1], 'rv') == 1 then return false end
redis.call('HSET', KEYS[1], 'rv', ARGV[1])
redis.call('HDEL', KEYS[1], 'h', 'p', 'k', 'ua', 'e')
local n = 1  -- and the rest of a long User-Agent: chunks ua1, ua2, ... (store.py)
while redis.call('HDEL', KEYS[1], 'ua' .. n) == 1 do n = n + 1 end
redis.call('DEL', KEYS[2])
return sub
