-- Reconcile, refund or release earlier charges (port of the *_adjust functions in
-- gateway/store/algorithms.py). KEYS[i]: limit key. ARGV, 6 per adjustment:
--   algo, limit, period_ms, bucket width ms, delta, reference (window bucket start | lease id)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local NA = 6
for i = 1, #KEYS do
  local b = (i - 1) * NA
  local algo = ARGV[b + 1]
  local limit = tonumber(ARGV[b + 2])
  local period = tonumber(ARGV[b + 3])
  local gran = tonumber(ARGV[b + 4])
  local delta = tonumber(ARGV[b + 5])
  local ref = ARGV[b + 6]
  local key = KEYS[i]
  if algo == 'g' then
    local tat = tonumber(redis.call('GET', key))
    if tat then
      local new_tat = tat + delta * (period / limit)
      if new_tat > now then
        redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat) + 1 - now)
      else
        redis.call('DEL', key)
      end
    end
  elseif algo == 'w' then
    -- Only the bucket the reservation was charged in; once it left the window it no longer counts.
    local bucket = tonumber(ref)
    if bucket + gran > now - period then
      local value = (tonumber(redis.call('HGET', key, ref)) or 0) + delta
      if value > 0 then
        redis.call('HSET', key, ref, value)
        local want = bucket + gran + period + 1 - now
        if redis.call('PTTL', key) < want then redis.call('PEXPIRE', key, want) end
      else
        redis.call('HDEL', key, ref)
      end
    end
  elseif delta < 0 then
    redis.call('ZREM', key, ref)
  end
end
return #KEYS
