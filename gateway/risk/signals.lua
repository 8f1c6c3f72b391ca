-- One request's risk-signal operations in one round trip (gateway/risk/redis_sigstore.py).
-- KEYS: one per operation (hash-tagged base keys). ARGV: per operation a kind and its params.
-- Floats are returned as strings: Redis truncates Lua numbers to integers.
-- Keep the account rule in step with gateway/risk/sigstore.py:touch_account.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {tostring(now)}
local a = 1
local MAX_GAP, ALPHA, DAY = 21600, 0.2, 86400

local function decay(v, elapsed, hl)
  if elapsed <= 0 or v == 0 then return v end
  return v * math.pow(2, -elapsed / hl)
end

for i = 1, #KEYS do
  local key = KEYS[i]
  local kind = ARGV[a]; a = a + 1
  if kind == 'h' then
    local member, window = ARGV[a], tonumber(ARGV[a + 1]); a = a + 2
    local b = math.floor(now / window)
    local cur = key .. ':' .. b
    redis.call('PFADD', cur, member)
    redis.call('PEXPIRE', cur, math.floor((2 * window + 1) * 1000))
    out[#out + 1] = tostring(redis.call('PFCOUNT', cur, key .. ':' .. (b - 1)))
  elseif kind == 'd' then
    local hl, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1]); a = a + 2
    local last = tonumber(redis.call('HGET', key, 't') or now)
    for j = 1, n do
      local v = decay(tonumber(redis.call('HGET', key, 'v' .. j) or '0'), now - last, hl) + tonumber(ARGV[a])
      a = a + 1
      redis.call('HSET', key, 'v' .. j, tostring(v))
      out[#out + 1] = tostring(v)
    end
    redis.call('HSET', key, 't', tostring(now))
    redis.call('PEXPIRE', key, math.floor(hl * 8000))
  elseif kind == 'a' then
    local ttl, hl, tpl, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 3])
    a = a + 4
    local raw = redis.call('HGETALL', key)
    local st = {}
    for j = 1, #raw, 2 do st[raw[j]] = raw[j + 1] end
    local prev = st['l']
    local first = tonumber(st['f'] or now)
    local gm, gv, gk = tonumber(st['gm'] or '0'), tonumber(st['gv'] or '0'), tonumber(st['gk'] or '0')
    local hours, hs = tonumber(st['h'] or '0'), tonumber(st['hs'] or now)
    local tp, tc = st['tp'] or '', tonumber(st['tc'] or '0')
    local elapsed = 0
    if prev then
      elapsed = now - tonumber(prev)
      tc = decay(tc, elapsed, hl)
      if elapsed > 0 and elapsed <= MAX_GAP then
        if gk == 0 then
          gm, gv = elapsed, 0
        else
          local d = elapsed - gm
          gm = gm + ALPHA * d
          gv = (1 - ALPHA) * (gv + ALPHA * d * d)
        end
        gk = math.min(gk + 1, 1000)
      end
    end
    local fields = {'l', tostring(now), 'f', tostring(first), 'gm', tostring(gm), 'gv', tostring(gv),
                    'gk', tostring(gk)}
    local counts = {}
    for j = 1, n do
      counts[j] = decay(tonumber(st['c' .. j] or '0'), elapsed, hl) + tonumber(ARGV[a])
      a = a + 1
      fields[#fields + 1] = 'c' .. j
      fields[#fields + 1] = tostring(counts[j])
    end
    if now - hs > DAY then hours, hs = 0, now end
    hours = bit.bor(hours, bit.lshift(1, math.floor(now / 3600) % 24))
    if tpl ~= '' then
      if tp == tpl then tc = tc + 1
      elseif tc <= 1 then tp, tc = tpl, 1
      else tc = tc - 1 end
    end
    for _, v in ipairs({'h', tostring(hours), 'hs', tostring(hs), 'tp', tp, 'tc', tostring(tc)}) do
      fields[#fields + 1] = v
    end
    redis.call('HSET', key, unpack(fields))
    redis.call('PEXPIRE', key, math.floor(ttl * 1000))
    out[#out + 1] = prev or ''
    for _, v in ipairs({tostring(first), tostring(gm), tostring(gv), tostring(gk), tostring(hours), tp,
                        tostring(tc)}) do
      out[#out + 1] = v
    end
    for j = 1, n do out[#out + 1] = tostring(counts[j]) end
  elseif kind == 'g' then
    local raw = redis.call('HGETALL', key)
    local live = {}
    for j = 1, #raw, 2 do
      local sep = string.find(raw[j + 1], '|', 1, true)
      if sep and tonumber(string.sub(raw[j + 1], 1, sep - 1)) > now then
        live[#live + 1] = raw[j]
        live[#live + 1] = string.sub(raw[j + 1], sep + 1)
      end
    end
    out[#out + 1] = tostring(#live / 2)
    for _, v in ipairs(live) do out[#out + 1] = v end
  elseif kind == 'p' then
    local field, value, ttl = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]); a = a + 3
    redis.call('HSET', key, field, tostring(now + ttl) .. '|' .. value)
    if redis.call('PTTL', key) < ttl * 1000 then
      redis.call('PEXPIRE', key, math.floor(ttl * 1000) + 1)
    end
  elseif kind == 'x' then
    local field = ARGV[a]; a = a + 1
    if field == '' then redis.call('DEL', key) else redis.call('HDEL', key, field) end
  end
end
return out
