-- Reconcile, refund or release earlier charges (port of the *_adjust functions in
-- gateway/store/algorithms.py); window keys as in charge.lua (buckets; '-1' total, '-2' oldest
-- and '-3' newest bucket start).
-- KEYS[i]: limit key. ARGV, 6 per adjustment:
--   algo, limit, period_ms, bucket width ms, delta, reference (window bucket start | lease id)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local NA = 6
for i = 1, #KEYS do
  local b = (i - 1) * NA
  local algo = ARGV[b + 1]
  local delta = ARGV[b + 5] + 0
  local ref = ARGV[b + 6]
  local key = KEYS[i]
  -- numbers parsed only where used, by arithmetic ('x + 0': one strtod; tonumber makes two)
  if algo == 'g' then
    local limit = ARGV[b + 2] + 0
    local period = ARGV[b + 3] + 0
    local tat = tonumber(redis.call('GET', key))
    if tat then
      local new_tat = tat + delta * (period / limit)
      if new_tat > now then
        -- '%.3f' as two integers (see charge.lua: no float printing)
        local whole = math.floor(new_tat)
        local frac = math.floor((new_tat - whole) * 1000 + 0.5)
        if frac >= 1000 then whole, frac = whole + 1, frac - 1000 end
        redis.call('SET', key, string.format('%d.%03d', whole, frac), 'PX',
                   string.format('%d', math.ceil(new_tat) + 1 - now))
      else
        redis.call('DEL', key)
      end
    end
  elseif algo == 'w' then
    -- Only the bucket the reservation was charged in; once it left the window it no longer counts.
    local period = ARGV[b + 3] + 0
    local gran = ARGV[b + 4] + 0
    local bucket = ref + 0
    if bucket + gran > now - period then
      local value = redis.call('HINCRBY', key, ref, ARGV[b + 5])
      local change = delta  -- what the bucket really moved by (it never goes below zero)
      if value <= 0 then
        redis.call('HDEL', key, ref)
        change = delta - value
      end
      -- The running total moves with the bucket (charge.lua: '-1'); nothing left at all (the
      -- total is 0 and only the three fields of charge.lua remain): the key goes.
      local text = change == delta and ARGV[b + 5] or string.format('%d', change)
      if change ~= 0 and redis.call('HINCRBY', key, '-1', text) <= 0 and redis.call('HLEN', key) <= 3 then
        redis.call('DEL', key)
      elseif value <= 0 then
        -- The bucket went: if it was the newest ('-3'), the newest is now the latest one left.
        if redis.call('HGET', key, '-3') == ref then
          local raw, newest = redis.call('HGETALL', key), nil
          for j = 1, #raw, 2 do
            local s = raw[j] + 0
            if s >= 0 and (newest == nil or s > newest) then newest = s end
          end
          if newest then
            redis.call('HSET', key, '-3', string.format('%d', newest))
          else
            redis.call('HDEL', key, '-3')
          end
        end
      elseif value == delta then
        -- The bucket was gone (buckets never hold 0), so the key may be new, without expiry, and
        -- the bucket may be older than the oldest one recorded ('-2') or newer than the newest
        -- ('-3'). A bucket that still held usage needs nothing more: the charge that created it
        -- set the key's expiry to at least this bucket's end.
        local want = bucket + gran + period + 1 - now
        if redis.call('PTTL', key) < want then redis.call('PEXPIRE', key, string.format('%d', want)) end
        local ends = redis.call('HMGET', key, '-2', '-3')
        local oldest, newest = tonumber(ends[1]), tonumber(ends[2])
        if oldest == nil or bucket < oldest then redis.call('HSET', key, '-2', ref) end
        if newest == nil or bucket > newest then redis.call('HSET', key, '-3', ref) end
      end
    end
  elseif delta < 0 then
    redis.call('ZREM', key, ref)
  end
end
return #KEYS
