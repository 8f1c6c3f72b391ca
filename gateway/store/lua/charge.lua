-- Atomic, all-or-nothing check-and-charge of several limits for one request.
-- A port of gateway/store/algorithms.py; keep the two in step (tests/contract checks both).
-- Time comes from the server (TIME), so gateway replicas with skewed clocks agree.
-- KEYS[i]: one limit key. ARGV[1]: reply form, 'c' (compact when every charge applied) or 'f'
-- (always full). Then ARGV, 7 per charge:
--   algo ('g' GCRA | 'w' window | 'l' lease), limit, period_ms, cost,
--   param (GCRA burst | window bucket width ms), shadow ('1' never blocks others), lease id
-- Returns, full: {allowed (0|1), now_ms, then per charge: ok, remaining, reset_ms, retry_ms,
--   bucket_ms, idle_remaining, idle_reset_ms} (the last two: state as if not applied, for
--   cross-slot denials); compact: {2, now_ms, then per charge: remaining, reset_ms, bucket_ms}.
--
-- Redis runs this for every request, so it is written for Redis's CPU. Measured under callgrind
-- (bench/redis_lua.py), the costs are not the logic but the conversions: every number Lua hands
-- to redis.call is printed with "%.14g" (slow float formatting), so numbers go out as
-- string.format('%d') or as the argument strings themselves; every integer replied costs Redis
-- a type check, so an all-applied request gets the short reply; and writes that cannot change
-- anything are skipped (a window bucket that already holds usage already set the key's expiry).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local EPS = 0.01
local LEASE_RETRY_MS = 1000
local n = #KEYS
-- per charge i: ok, remaining, reset, retry, bucket, idle, idle_reset; new TAT / dead buckets
local oks, rems, resets, retries, buckets, idles, idle_resets, tats, deads = {}, {}, {}, {}, {}, {}, {}, {}, {}
local allowed, all_ok = true, true

for i = 1, n do
  local b = (i - 1) * 7 + 1
  local algo = ARGV[b + 1]
  local limit = tonumber(ARGV[b + 2])
  local period = tonumber(ARGV[b + 3])
  local cost = tonumber(ARGV[b + 4])
  local param = tonumber(ARGV[b + 5])
  local key = KEYS[i]
  -- remaining/reset: state if this charge is applied; idle/idle_reset: if it is not (a denied
  -- request or a shadow would-deny must report what is really left).
  local ok, remaining, reset, retry, bucket, idle, idle_reset = false, 0, 0, 0, 0, 0, 0
  if algo == 'g' then
    local interval = period / limit
    local tau = interval * param
    local tat = tonumber(redis.call('GET', key))
    local start = now
    if tat and tat > now then start = tat end
    local new_tat = start + cost * interval
    local diff = new_tat - now
    idle = math.floor((tau - (start - now)) / interval + EPS / interval)
    idle_reset = math.ceil(start - now)
    if diff <= tau + EPS then
      ok = true
      remaining = math.floor((tau - diff) / interval + EPS / interval)
      reset = math.ceil(diff)
      tats[i] = new_tat
    else
      remaining = idle
      reset = idle_reset
      if cost * interval <= tau + EPS then retry = math.ceil(diff - tau) else retry = -1 end
    end
  elseif algo == 'w' then
    -- A bucket counts until its end is a full period old: usage is held for period..period+gran.
    local gran = param
    local horizon = now - period
    local raw = redis.call('HGETALL', key)
    local used, newest, dead = 0, nil, nil
    for j = 1, #raw, 2 do
      local s = tonumber(raw[j])
      if s + gran > horizon then
        used = used + tonumber(raw[j + 1])
        if newest == nil or s > newest then newest = s end
      else
        if dead == nil then dead = {} end
        dead[#dead + 1] = raw[j]
      end
    end
    deads[i] = dead
    bucket = now - (now % gran)
    idle = limit - used
    if newest then idle_reset = newest + gran + period - now end
    if used < limit and used + cost <= limit then
      ok = true
      remaining = limit - used - cost
      if cost > 0 then reset = bucket + gran + period - now else reset = idle_reset end
    else
      remaining = idle
      reset = idle_reset
      retry = -1
      if cost <= limit then
        -- when would it fit: free the live buckets oldest first (sorting only on this path)
        local live = {}
        for j = 1, #raw, 2 do
          local s = tonumber(raw[j])
          if s + gran > horizon then live[#live + 1] = {s, tonumber(raw[j + 1])} end
        end
        table.sort(live, function(x, y) return x[1] < y[1] end)
        local freed = 0
        for j = 1, #live do
          freed = freed + live[j][2]
          local left = used - freed
          if left < limit and left + cost <= limit then
            retry = live[j][1] + gran + period - now
            break
          end
        end
      end
    end
  else
    local used = redis.call('ZCOUNT', key, string.format('(%d', now), '+inf')
    idle = limit - used
    if used + cost <= limit then
      ok = true
      remaining = limit - used - cost
    else
      remaining = limit - used
      if cost > limit then
        retry = -1
      else
        local first = redis.call('ZRANGEBYSCORE', key, string.format('(%d', now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
        retry = math.min(LEASE_RETRY_MS, tonumber(first[2]) - now)
      end
    end
  end
  oks[i], rems[i], resets[i], retries[i], buckets[i], idles[i], idle_resets[i] =
    ok, remaining, reset, retry, bucket, idle, idle_reset
  if not ok then
    all_ok = false
    if ARGV[b + 6] ~= '1' then allowed = false end
  end
end

local compact = allowed and all_ok and ARGV[1] == 'c'
local out
if compact then out = {2, now} elseif allowed then out = {1, now} else out = {0, now} end
local at = 2
for i = 1, n do
  local ok = oks[i]
  if allowed and ok then
    local b = (i - 1) * 7 + 1
    local key = KEYS[i]
    local algo = ARGV[b + 1]
    local period = tonumber(ARGV[b + 3])
    if algo == 'g' then
      local tat = tats[i]
      -- '%.3f' as two integers: the same text, without float printing
      local whole = math.floor(tat)
      local frac = math.floor((tat - whole) * 1000 + 0.5)
      if frac >= 1000 then whole, frac = whole + 1, frac - 1000 end
      redis.call('SET', key, string.format('%d.%03d', whole, frac), 'PX',
                 string.format('%d', math.ceil(tat) + 1 - now))
    elseif algo == 'w' then
      local dead = deads[i]
      if dead then redis.call('HDEL', key, unpack(dead)) end
      local cost = tonumber(ARGV[b + 4])
      if cost > 0 then
        -- A bucket that already held usage was created by an earlier charge (or adjust) in
        -- this same bucket, which set the key's expiry to this same end: only a new bucket
        -- (HINCRBY answers just the cost) needs PEXPIRE. Buckets never hold 0 (deleted instead).
        local bucket = buckets[i]
        if redis.call('HINCRBY', key, string.format('%d', bucket), ARGV[b + 4]) == cost then
          redis.call('PEXPIRE', key, string.format('%d', bucket + tonumber(ARGV[b + 5]) + period + 1 - now))
        end
      end
    else
      redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now))
      redis.call('ZADD', key, string.format('%d', now + period), ARGV[b + 7])
      if redis.call('PTTL', key) < period + 1 then redis.call('PEXPIRE', key, string.format('%d', period + 1)) end
    end
  end
  if compact then
    out[at + 1] = rems[i]
    out[at + 2] = resets[i]
    out[at + 3] = buckets[i]
    at = at + 3
  else
    local remaining, reset = idles[i], idle_resets[i]
    if allowed and ok then remaining, reset = rems[i], resets[i] end
    if ok then out[at + 1] = 1 else out[at + 1] = 0 end
    out[at + 2] = remaining
    out[at + 3] = reset
    out[at + 4] = retries[i]
    out[at + 5] = buckets[i]
    out[at + 6] = idles[i]
    out[at + 7] = idle_resets[i]
    at = at + 7
  end
end
return out
