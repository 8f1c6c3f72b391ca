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
-- Keys. GCRA: a string, the TAT in ms ('%.3f'). Lease: a sorted set of lease ids scored by
-- expiry. Window: a hash of bucket start (ms) -> units, plus three fields with negative names
-- (never a bucket): '-1' the total of the buckets held, '-2' the start of the oldest one held (a
-- lower bound) and '-3' the start of the newest, so that a charge costs the same however many
-- buckets the window holds; the buckets are read only when the oldest leaves the window (once per
-- bucket width), a field is missing (a new key, or one written before they existed), or a
-- denial needs them (when would it fit).
--
-- Redis runs this for every request, so it is written for Redis's CPU (docs/quotas.md, "What
-- Redis spends per request"; bench/redis_scripts.py measures it). Each redis.call costs ~8 k
-- instructions, more than any logic here, so a request makes as few as its limits allow: TIME,
-- then a read and a write per limit. Numbers handed to redis.call would be printed with "%.14g"
-- (slow), so they go out as string.format('%d') or as the argument strings themselves; strings
-- become numbers by arithmetic ('x + 0', one strtod) rather than tonumber (two); an all-applied
-- request gets the short reply (every integer replied costs a type check); and per-charge state
-- lives in one flat table rather than a table per field.
local call, tonumber, floor, ceil, fmt = redis.call, tonumber, math.floor, math.ceil, string.format
local t = call('TIME')
local now = t[1] * 1000 + floor(t[2] / 1000)
local EPS = 0.01
local LEASE_RETRY_MS = 1000
local n = #KEYS

-- Drop the buckets that left the window and write the total, the oldest and the newest again.
-- Returns total, oldest, newest (nil, nil: the key holds nothing).
local function recount(key, horizon, gran)
  local raw = call('HGETALL', key)
  if #raw == 0 then return 0, nil, nil end
  local total, oldest, newest, dead = 0, nil, nil, nil
  for j = 1, #raw, 2 do
    local s = raw[j] + 0
    if s + gran > horizon then
      total = total + raw[j + 1] + 0
      if oldest == nil or s < oldest then oldest = s end
      if newest == nil or s > newest then newest = s end
    elseif s >= 0 then
      if dead == nil then dead = {} end
      dead[#dead + 1] = raw[j]
    end
  end
  if oldest == nil then
    call('DEL', key)
    return 0, nil, nil
  end
  if dead then call('HDEL', key, unpack(dead)) end
  call('HSET', key, '-1', fmt('%d', total), '-2', fmt('%d', oldest), '-3', fmt('%d', newest))
  return total, oldest, newest
end

-- The live buckets of a window key as {start, units}, oldest first.
local function live_buckets(key, horizon, gran)
  local raw = call('HGETALL', key)
  local live = {}
  for j = 1, #raw, 2 do
    local s = raw[j] + 0
    if s + gran > horizon then live[#live + 1] = {s, raw[j + 1] + 0} end
  end
  table.sort(live, function(x, y) return x[1] < y[1] end)
  return live
end

-- Per charge i, S fields from (i - 1) * S: ok, remaining, reset, retry, bucket, idle,
-- idle_reset, then what its write needs: GCRA the new TAT; window the bucket's field, its units
-- (false: a new bucket), the total, the oldest and the newest (nil: none).
local S = 12
-- (made with room for three charges: filling a table created empty costs a reallocation per
-- power of two)
local st = {false, 0, 0, 0, 0, 0, 0, false, false, false, false, false,
  false, 0, 0, 0, 0, 0, 0, false, false, false, false, false,
  false, 0, 0, 0, 0, 0, 0, false, false, false, false, false}
local allowed, all_ok = true, true

for i = 1, n do
  local b = (i - 1) * 7 + 1
  local algo = ARGV[b + 1]
  local limit = ARGV[b + 2] + 0
  local period = ARGV[b + 3] + 0
  local cost = ARGV[b + 4] + 0
  local key = KEYS[i]
  -- remaining/reset: state if this charge is applied; idle/idle_reset: if it is not (a denied
  -- request or a shadow would-deny must report what is really left).
  local ok, remaining, reset, retry, bucket, idle, idle_reset = false, 0, 0, 0, 0, 0, 0
  local w1, w2, w3, w4, w5 = false, false, false, nil, nil
  if algo == 'g' then
    local interval = period / limit
    local tau = interval * (ARGV[b + 5] + 0)
    local tat = call('GET', key)
    if tat then tat = tat + 0 end
    local start = now
    if tat and tat > now then start = tat end
    local new_tat = start + cost * interval
    local diff = new_tat - now
    idle = floor((tau - (start - now)) / interval + EPS / interval)
    idle_reset = ceil(start - now)
    if diff <= tau + EPS then
      ok = true
      remaining = floor((tau - diff) / interval + EPS / interval)
      reset = ceil(diff)
      w1 = new_tat
    else
      remaining = idle
      reset = idle_reset
      if cost * interval <= tau + EPS then retry = ceil(diff - tau) else retry = -1 end
    end
  elseif algo == 'w' then
    -- A bucket counts until its end is a full period old: usage is held for period..period+gran.
    local gran = ARGV[b + 5] + 0
    local horizon = now - period
    bucket = now - (now % gran)
    local field = fmt('%d', bucket)
    local got = call('HMGET', key, '-1', '-2', '-3', field)
    local used, oldest, newest = got[1], got[2], got[3]
    if used and oldest and newest and oldest + gran > horizon then
      used, oldest, newest = used + 0, oldest + 0, newest + 0
    else
      used, oldest, newest = recount(key, horizon, gran)
    end
    idle = limit - used
    if newest then idle_reset = newest + gran + period - now end  -- when all of it has left
    if used < limit and used + cost <= limit then
      ok = true
      remaining = limit - used - cost
      if cost > 0 then reset = bucket + gran + period - now else reset = idle_reset end
      w1, w2, w3, w4, w5 = field, got[4] and got[4] + 0, used, oldest, newest
    else
      remaining = idle
      reset = idle_reset
      retry = -1
      if cost <= limit then
        -- when would it fit: free the live buckets oldest first (only here are they read)
        local live = live_buckets(key, horizon, gran)
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
    local used = call('ZCOUNT', key, fmt('(%d', now), '+inf')
    idle = limit - used
    if used + cost <= limit then
      ok = true
      remaining = limit - used - cost
    else
      remaining = limit - used
      if cost > limit then
        retry = -1
      else
        local first = call('ZRANGEBYSCORE', key, fmt('(%d', now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
        retry = math.min(LEASE_RETRY_MS, tonumber(first[2]) - now)
      end
    end
  end
  local o = (i - 1) * S
  st[o + 1], st[o + 2], st[o + 3], st[o + 4], st[o + 5], st[o + 6], st[o + 7] =
    ok, remaining, reset, retry, bucket, idle, idle_reset
  st[o + 8], st[o + 9], st[o + 10], st[o + 11], st[o + 12] = w1, w2, w3, w4, w5
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
  local o = (i - 1) * S
  local ok = st[o + 1]
  local b = (i - 1) * 7 + 1
  if allowed and ok then
    local key = KEYS[i]
    local algo = ARGV[b + 1]
    if algo == 'g' then
      local tat = st[o + 8]
      -- '%.3f' as two integers: the same text, without float printing
      local whole = floor(tat)
      local frac = floor((tat - whole) * 1000 + 0.5)
      if frac >= 1000 then whole, frac = whole + 1, frac - 1000 end
      call('SET', key, fmt('%d.%03d', whole, frac), 'PX', fmt('%d', ceil(tat) + 1 - now))
    elseif algo == 'w' then
      local cost = ARGV[b + 4] + 0
      if cost > 0 then
        -- One HSET for the bucket and the total. A bucket that already held usage was created
        -- by an earlier charge (or adjust) in this same bucket, which set the key's expiry to
        -- this same end: only a new bucket needs PEXPIRE. Buckets never hold 0 (deleted instead).
        local field, units, total = st[o + 8], st[o + 9], fmt('%d', st[o + 10] + cost)
        if units then
          call('HSET', key, field, fmt('%d', units + cost), '-1', total)
        else
          -- A new bucket: the newest, unless the server's clock stepped back (then it may even
          -- be older than the oldest, and the key's expiry already covers it).
          local bucket, oldest, newest = st[o + 5], st[o + 11], st[o + 12]
          if oldest == nil then
            call('HSET', key, field, ARGV[b + 4], '-1', total, '-2', field, '-3', field)
          elseif bucket > newest then
            call('HSET', key, field, ARGV[b + 4], '-1', total, '-3', field)
          elseif bucket < oldest then
            call('HSET', key, field, ARGV[b + 4], '-1', total, '-2', field)
          else
            call('HSET', key, field, ARGV[b + 4], '-1', total)
          end
          if oldest == nil or bucket > newest then
            call('PEXPIRE', key, fmt('%d', bucket + ARGV[b + 5] + 0 + ARGV[b + 3] + 0 + 1 - now))
          end
        end
      end
    else
      local period = ARGV[b + 3] + 0
      call('ZREMRANGEBYSCORE', key, '-inf', fmt('%d', now))
      call('ZADD', key, fmt('%d', now + period), ARGV[b + 7])
      if call('PTTL', key) < period + 1 then call('PEXPIRE', key, fmt('%d', period + 1)) end
    end
  end
  if compact then
    out[at + 1] = st[o + 2]
    out[at + 2] = st[o + 3]
    out[at + 3] = st[o + 5]
    at = at + 3
  else
    local remaining, reset = st[o + 6], st[o + 7]
    if allowed and ok then remaining, reset = st[o + 2], st[o + 3] end
    if ok then out[at + 1] = 1 else out[at + 1] = 0 end
    out[at + 2] = remaining
    out[at + 3] = reset
    out[at + 4] = st[o + 4]
    out[at + 5] = st[o + 5]
    out[at + 6] = st[o + 6]
    out[at + 7] = st[o + 7]
    at = at + 7
  end
end
return out
