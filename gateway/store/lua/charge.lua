-- Atomic, all-or-nothing check-and-charge of several limits for one request.
-- A port of gateway/store/algorithms.py; keep the two in step (tests/contract checks both).
-- Time comes from the server (TIME), so gateway replicas with skewed clocks agree.
-- KEYS[i]: one limit key. ARGV, 7 per charge:
--   algo ('g' GCRA | 'w' window | 'l' lease), limit, period_ms, cost,
--   param (GCRA burst | window bucket width ms), shadow ('1' never blocks others), lease id
-- Returns {allowed, now_ms, then per charge: ok, remaining, reset_ms, retry_ms, bucket_ms,
--   idle_remaining, idle_reset_ms} (the last two: state as if not applied, for cross-slot denials).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local EPS = 0.01
local LEASE_RETRY_MS = 1000
local NA = 7
local verdicts = {}
local allowed = true

for i = 1, #KEYS do
  local b = (i - 1) * NA
  local algo = ARGV[b + 1]
  local limit = tonumber(ARGV[b + 2])
  local period = tonumber(ARGV[b + 3])
  local cost = tonumber(ARGV[b + 4])
  local param = tonumber(ARGV[b + 5])
  local key = KEYS[i]
  -- remaining/reset: state if this charge is applied; idle/idle_reset: if it is not (a denied
  -- request or a shadow would-deny must report what is really left).
  local r = {ok = false, remaining = 0, reset = 0, retry = 0, bucket = 0, tat = 0, dead = {},
             idle = 0, idle_reset = 0}
  if algo == 'g' then
    local interval = period / limit
    local tau = interval * param
    local tat = tonumber(redis.call('GET', key))
    local start = now
    if tat and tat > now then start = tat end
    local new_tat = start + cost * interval
    local diff = new_tat - now
    r.idle = math.floor((tau - (start - now)) / interval + EPS / interval)
    r.idle_reset = math.ceil(start - now)
    if diff <= tau + EPS then
      r.ok = true
      r.remaining = math.floor((tau - diff) / interval + EPS / interval)
      r.reset = math.ceil(diff)
      r.tat = new_tat
    else
      r.remaining = r.idle
      r.reset = r.idle_reset
      if cost * interval <= tau + EPS then r.retry = math.ceil(diff - tau) else r.retry = -1 end
    end
  elseif algo == 'w' then
    -- A bucket counts until its end is a full period old: usage is held for period..period+gran.
    local gran = param
    local cur = now - (now % gran)
    local raw = redis.call('HGETALL', key)
    local live = {}
    for j = 1, #raw, 2 do
      local s = tonumber(raw[j])
      if s + gran > now - period then
        live[#live + 1] = {s, tonumber(raw[j + 1])}
      else
        r.dead[#r.dead + 1] = raw[j]
      end
    end
    table.sort(live, function(x, y) return x[1] < y[1] end)
    local used = 0
    for j = 1, #live do used = used + live[j][2] end
    r.bucket = cur
    r.idle = limit - used
    if #live > 0 then r.idle_reset = live[#live][1] + gran + period - now end
    if used < limit and used + cost <= limit then
      r.ok = true
      r.remaining = limit - used - cost
      if cost > 0 then r.reset = cur + gran + period - now else r.reset = r.idle_reset end
    else
      r.remaining = r.idle
      r.reset = r.idle_reset
      r.retry = -1
      if cost <= limit then
        local freed = 0
        for j = 1, #live do
          freed = freed + live[j][2]
          local left = used - freed
          if left < limit and left + cost <= limit then
            r.retry = live[j][1] + gran + period - now
            break
          end
        end
      end
    end
  else
    local used = redis.call('ZCOUNT', key, '(' .. now, '+inf')
    r.idle = limit - used
    if used + cost <= limit then
      r.ok = true
      r.remaining = limit - used - cost
    else
      r.remaining = limit - used
      if cost > limit then
        r.retry = -1
      else
        local first = redis.call('ZRANGEBYSCORE', key, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
        r.retry = math.min(LEASE_RETRY_MS, tonumber(first[2]) - now)
      end
    end
  end
  verdicts[i] = r
  if not r.ok and ARGV[b + 6] ~= '1' then allowed = false end
end

local out = {0, now}
if allowed then out[1] = 1 end
for i = 1, #KEYS do
  local b = (i - 1) * NA
  local r = verdicts[i]
  if allowed and r.ok then
    local key = KEYS[i]
    local algo = ARGV[b + 1]
    local period = tonumber(ARGV[b + 3])
    local cost = tonumber(ARGV[b + 4])
    if algo == 'g' then
      redis.call('SET', key, string.format('%.3f', r.tat), 'PX', math.ceil(r.tat) + 1 - now)
    elseif algo == 'w' then
      if #r.dead > 0 then redis.call('HDEL', key, unpack(r.dead)) end
      if cost > 0 then
        redis.call('HINCRBY', key, r.bucket, cost)
        redis.call('PEXPIRE', key, r.bucket + tonumber(ARGV[b + 5]) + period + 1 - now)
      end
    else
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      redis.call('ZADD', key, now + period, ARGV[b + 7])
      if redis.call('PTTL', key) < period + 1 then redis.call('PEXPIRE', key, period + 1) end
    end
  end
  local ok = 0
  if r.ok then ok = 1 end
  local remaining, reset = r.idle, r.idle_reset
  if allowed and r.ok then remaining, reset = r.remaining, r.reset end
  out[#out + 1] = ok
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = r.retry
  out[#out + 1] = r.bucket
  out[#out + 1] = r.idle
  out[#out + 1] = r.idle_reset
end
return out
