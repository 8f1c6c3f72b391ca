-- One request's risk-signal operations in one round trip (gateway/risk/redis_sigstore.py).
-- KEYS: one per operation (hash-tagged base keys). ARGV: per operation a kind and its params.
-- Floats are returned as strings: Redis truncates Lua numbers to integers.
-- Keep the account rule in step with gateway/risk/sigstore.py:touch_account.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local nows = tostring(now)
local out = {nows}
local a = 1
local MAX_GAP, ALPHA, DAY = 21600, 0.2, 86400
local pfadd, pfcount = 'PFADD', 'PFCOUNT'
local call = redis.call

local VFIELDS = {'v1', 'v2', 'v3', 'v4'}  -- decaying sums' fields (more made when needed)

local function decay(v, elapsed, hl)
  if elapsed <= 0 or v == 0 then return v end
  return v * math.pow(2, -elapsed / hl)
end

for i = 1, #KEYS do
  local key = KEYS[i]
  local kind = ARGV[a]; a = a + 1
  if kind == 'h' then
    -- Distinct members over this bucket and the previous one. ``cur`` holds the bucket's own
    -- members (read only to start the next bucket's view); ``view`` = cur ∪ previous bucket,
    -- made by one PFMERGE when the bucket starts and then added to alongside ``cur``. Its
    -- registers are those of the two-key merge, so PFCOUNT gives the very same estimate, from
    -- one key whose cached cardinality stays valid while no register changes.
    local member, window = ARGV[a], tonumber(ARGV[a + 1]); a = a + 2
    local b = math.floor(now / window)
    local cur = key .. ':' .. b
    local view = key .. ':u' .. b
    local n = 0
    if call(pfadd, cur, member) == 0 then  -- no register of cur changed: nor of view
      n = call(pfcount, view)  -- 0: no view (never empty otherwise): make it below
    end
    if n == 0 then
      if call('EXISTS', view) == 1 then
        call(pfadd, view, member)
      else
        local prev = key .. ':' .. (b - 1)
        if call('EXISTS', prev) == 1 then
          call('PFMERGE', view, cur, prev)
        else  -- a copy: PFMERGE would walk every register even of a small sparse HLL
          call('COPY', cur, view)
        end
        -- cur is read until the next bucket ends, the view until this one ends
        call('PEXPIRE', cur, math.floor(((b + 2) * window - now + 1) * 1000))
        call('PEXPIRE', view, math.floor(((b + 1) * window - now + 1) * 1000))
      end
      n = call(pfcount, view)
    end
    out[#out + 1] = n
  elseif kind == 'd' then
    local hl, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1]); a = a + 2
    for j = #VFIELDS + 1, n do VFIELDS[j] = 'v' .. j end
    local old = call('HMGET', key, 't', unpack(VFIELDS, 1, n))
    local elapsed = now - tonumber(old[1] or now)
    local set = {'t', nows}
    for j = 1, n do
      local v = tostring(decay(tonumber(old[j + 1] or '0'), elapsed, hl) + tonumber(ARGV[a]))
      a = a + 1
      set[2 * j + 1] = VFIELDS[j]
      set[2 * j + 2] = v
      out[#out + 1] = v
    end
    call('HSET', key, unpack(set))
    call('PEXPIRE', key, math.floor(hl * 8000))
  elseif kind == 'a' then
    local ttl, hl, tpl, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 3])
    a = a + 4
    local st = call('HMGET', key, 'l', 'f', 'gm', 'gv', 'gk', 'h', 'hs', 'tp', 'tc',
                    'c1', 'c2', 'c3', 'c4', 'c5', 'c6', 'c7', 'c8')
    if n > 8 then
      for j = 9, n do st[9 + j] = call('HGET', key, 'c' .. j) end
    end
    local prev = st[1]
    local first = tonumber(st[2] or now)
    local gm, gv, gk = tonumber(st[3] or '0'), tonumber(st[4] or '0'), tonumber(st[5] or '0')
    local hours, hs = tonumber(st[6] or '0'), tonumber(st[7] or now)
    local tp, tc = st[8] or '', tonumber(st[9] or '0')
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
    if now - hs > DAY then hours, hs = 0, now end
    hours = bit.bor(hours, bit.lshift(1, math.floor(now / 3600) % 24))
    if tpl ~= '' then
      if tp == tpl then tc = tc + 1
      elseif tc <= 1 then tp, tc = tpl, 1
      else tc = tc - 1 end
    end
    local sf, sgm, sgv, sgk, sh, stc = tostring(first), tostring(gm), tostring(gv), tostring(gk),
                                       tostring(hours), tostring(tc)
    local fields = {'l', nows, 'f', sf, 'gm', sgm, 'gv', sgv, 'gk', sgk, 'h', sh, 'hs', tostring(hs),
                    'tp', tp, 'tc', stc}
    local o = #out
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] = prev or '', sf, sgm, sgv
    out[o + 5], out[o + 6], out[o + 7], out[o + 8] = sgk, sh, tp, stc
    o = o + 8
    for j = 1, n do
      local c = tostring(decay(tonumber(st[9 + j] or '0'), elapsed, hl) + tonumber(ARGV[a]))
      a = a + 1
      fields[#fields + 1] = 'c' .. j
      fields[#fields + 1] = c
      out[o + j] = c
    end
    call('HSET', key, unpack(fields))
    call('PEXPIRE', key, math.floor(ttl * 1000))
  elseif kind == 'g' then
    local raw = call('HGETALL', key)
    local live = {}
    for j = 1, #raw, 2 do
      local sep = string.find(raw[j + 1], '|', 1, true)
      if sep and tonumber(string.sub(raw[j + 1], 1, sep - 1)) > now then
        live[#live + 1] = raw[j]
        live[#live + 1] = string.sub(raw[j + 1], sep + 1)
      end
    end
    out[#out + 1] = #live / 2
    for _, v in ipairs(live) do out[#out + 1] = v end
  elseif kind == 'p' then
    local field, value, ttl = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]); a = a + 3
    call('HSET', key, field, tostring(now + ttl) .. '|' .. value)
    if call('PTTL', key) < ttl * 1000 then
      call('PEXPIRE', key, math.floor(ttl * 1000) + 1)
    end
  elseif kind == 'x' then
    local field = ARGV[a]; a = a + 1
    if field == '' then call('DEL', key) else call('HDEL', key, field) end
  end
end
return out
