-- Renew concurrency leases (port of lease_renew in gateway/store/algorithms.py).
-- KEYS[i]: lease key (sorted set, member = lease id, score = expiry ms). ARGV, 2 per lease:
--   lease id, ttl_ms
-- A lease is extended to now + ttl (never shortened) only if it is still held (score > now): a lease
-- that expired or was released is left gone, so a renewal racing a release cannot revive it.
-- Returns one 0/1 per key: 1 where the lease was held and extended.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local id = ARGV[2 * i - 1]
  local ttl = tonumber(ARGV[2 * i])
  local score = tonumber(redis.call('ZSCORE', key, id))
  out[i] = 0
  if score and score > now then
    local expires = now + ttl
    if expires > score then redis.call('ZADD', key, 'XX', expires, id) end
    -- the key lives until its latest lease ends (as charge.lua sets it)
    if redis.call('PTTL', key) < expires + 1 - now then redis.call('PEXPIRE', key, expires + 1 - now) end
    out[i] = 1
  end
end
return out
