-- One request's risk-signal operations in one round trip (gateway/risk/redis_sigstore.py).
-- KEYS: one per operation (hash-tagged base keys). ARGV: per operation a kind and its params;
-- 'H' and 'D' stand for an 'h' or 'd' with the parameters of the previous one (a request adds its
-- one entity to ~5 HyperLogLogs and the same amounts to ~4 decaying sums: half the arguments
-- were repeats, each a Lua string and a tonumber here and a conversion in the client).
-- Reply: TIME's seconds and microseconds, then each operation's result.
--
-- Decaying sums and account state are one string each: packed little-endian doubles
-- (struct.pack), handed back to the client as stored. Formatting and parsing floats in Lua
-- (tostring/tonumber, and HMGET/HSET of a dozen fields) was about half of the script's time;
-- GET + SET ... PX is one call fewer than HMGET + HSET + PEXPIRE, and doubles keep full
-- precision, as the memory store does. Hashes written by the earlier format are read once and
-- replaced (SET overwrites a key of any type).
-- Keep the account rule in step with gateway/risk/sigstore.py:touch_account.
local call = redis.call
local t = call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {t[1], t[2]}
local a = 1
local MAX_GAP, ALPHA, DAY = 21600, 0.2, 86400
local pfadd, pfcount = 'PFADD', 'PFCOUNT'
local pack, sunpack, floor, pow = struct.pack, struct.unpack, math.floor, math.pow
local ACCOUNT = '<ddddddddd'  -- last, first, gap mean, gap var, gaps, hours, hours start, top count, n
local ACCOUNT_SIZE = 72

local FORMATS = {}
local function doubles(n)  -- the struct format of n doubles
  local f = FORMATS[n]
  if not f then
    f = '<' .. string.rep('d', n)
    FORMATS[n] = f
  end
  return f
end

local function unpack_doubles(raw, at, n)  -- n doubles from byte ``at`` as a table
  local v = {sunpack(doubles(n), raw, at)}
  v[n + 1] = nil  -- struct.unpack's last value is the next position
  return v
end

-- The earlier format (a hash), read once: the SET that follows replaces it.
local function legacy_decay(key, n)
  local names = {'t'}
  for j = 1, n do names[j + 1] = 'v' .. j end
  local old = call('HMGET', key, unpack(names))
  local v = {tonumber(old[1] or now)}
  for j = 1, n do v[j + 1] = tonumber(old[j + 1] or '0') end
  return v
end

local function legacy_account(key, n)
  local names = {'l', 'f', 'gm', 'gv', 'gk', 'h', 'hs', 'tc', 'tp'}
  for j = 1, n do names[9 + j] = 'c' .. j end
  local st = call('HMGET', key, unpack(names))
  local c = {}
  for j = 1, n do c[j] = tonumber(st[9 + j] or '0') end
  return tonumber(st[1]), tonumber(st[2] or now), tonumber(st[3] or '0'), tonumber(st[4] or '0'),
         tonumber(st[5] or '0'), tonumber(st[6] or '0'), tonumber(st[7] or now), tonumber(st[8] or '0'),
         c, st[9] or ''
end

-- Parameters of the last 'h' (member, window, and its bucket's key suffixes, formatted once) and
-- of the last 'd' (half-life, amounts, the packed format and the key's expiry).
local member, window, b, cur_sfx, view_sfx, prev_sfx
local hl, n_amounts, amounts, dfmt, dpx

for i = 1, #KEYS do
  local key = KEYS[i]
  local kind = ARGV[a]; a = a + 1
  if kind == 'h' or kind == 'H' then
    -- Distinct members over this bucket and the previous one. ``cur`` holds the bucket's own
    -- members (read only to start the next bucket's view); ``view`` = cur ∪ previous bucket,
    -- made by one PFMERGE when the bucket starts and then added to alongside ``cur``. Its
    -- registers are those of the two-key merge, so PFCOUNT gives the very same estimate, from
    -- one key whose cached cardinality stays valid while no register changes.
    if kind == 'h' then
      member, window = ARGV[a], tonumber(ARGV[a + 1]); a = a + 2
      b = floor(now / window)
      cur_sfx, view_sfx, prev_sfx = ':' .. b, ':u' .. b, ':' .. (b - 1)
    end
    local cur = key .. cur_sfx
    local view = key .. view_sfx
    local n = 0
    if call(pfadd, cur, member) == 0 then  -- no register of cur changed: nor of view
      n = call(pfcount, view)  -- 0: no view (never empty otherwise): make it below
    end
    if n == 0 then
      if call('EXISTS', view) == 1 then
        call(pfadd, view, member)
      else
        local prev = key .. prev_sfx
        if call('EXISTS', prev) == 1 then
          call('PFMERGE', view, cur, prev)
        else  -- a copy: PFMERGE would walk every register even of a small sparse HLL
          call('COPY', cur, view)
        end
        -- cur is read until the next bucket ends, the view until this one ends
        call('PEXPIRE', cur, floor(((b + 2) * window - now + 1) * 1000))
        call('PEXPIRE', view, floor(((b + 1) * window - now + 1) * 1000))
      end
      n = call(pfcount, view)
    end
    out[#out + 1] = n
  elseif kind == 'd' or kind == 'D' then
    -- Stored: time of the last add, then the n sums. Reply: the stored string.
    if kind == 'd' then
      hl, n_amounts = tonumber(ARGV[a]), tonumber(ARGV[a + 1]); a = a + 2
      amounts = {}
      for j = 1, n_amounts do amounts[j] = tonumber(ARGV[a + j - 1]) end
      a = a + n_amounts
      dfmt, dpx = doubles(n_amounts + 1), math.max(1, floor(hl * 8000))
    end
    local n = n_amounts
    local raw = redis.pcall('GET', key)
    local packed
    if n == 2 and type(raw) == 'string' and #raw == 24 then
      -- (count, sum), every decaying sum of the risk stage: no tables; the same arithmetic
      local t0, v1, v2 = sunpack('<ddd', raw)
      local elapsed = now - t0
      local factor = elapsed > 0 and pow(2, -elapsed / hl) or 1
      packed = pack('<ddd', now, v1 * factor + amounts[1], v2 * factor + amounts[2])
    else
      local v
      if type(raw) == 'string' then
        v = unpack_doubles(raw, 1, #raw / 8)
      elseif raw then  -- WRONGTYPE: the earlier format
        v = legacy_decay(key, n)
      end
      local vals = {now}
      if v then
        local elapsed = now - v[1]
        local factor = elapsed > 0 and pow(2, -elapsed / hl) or 1
        for j = 1, n do vals[j + 1] = (v[j + 1] or 0) * factor + amounts[j] end
      else
        for j = 1, n do vals[j + 1] = amounts[j] end
      end
      packed = pack(dfmt, unpack(vals))
    end
    call('SET', key, packed, 'PX', dpx)
    out[#out + 1] = packed
  elseif kind == 'a' then
    -- Stored: ACCOUNT's nine doubles, the n counts, then the top template's text. Reply: the
    -- previous string ('' for a new account; its first double is the previous request's time)
    -- and the new one.
    local ttl, hl, tpl, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 3])
    a = a + 4
    local raw = redis.pcall('GET', key)
    local prev, first, gm, gv, gk, hours, hs, tc, c, tp
    if type(raw) == 'string' then
      local m
      prev, first, gm, gv, gk, hours, hs, tc, m = sunpack(ACCOUNT, raw)
      c = unpack_doubles(raw, ACCOUNT_SIZE + 1, m)
      tp = string.sub(raw, ACCOUNT_SIZE + 1 + 8 * m)
    elseif raw then  -- WRONGTYPE: the earlier format
      prev, first, gm, gv, gk, hours, hs, tc, c, tp = legacy_account(key, n)
      raw = prev and pack('<d', prev) or ''
    else
      first, gm, gv, gk, hours, hs, tc, c, tp, raw = now, 0, 0, 0, 0, now, 0, {}, '', ''
    end
    local factor = 1
    if prev then
      local elapsed = now - prev
      if elapsed > 0 then
        factor = pow(2, -elapsed / hl)
        tc = tc * factor
        if elapsed <= MAX_GAP then
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
    end
    if now - hs > DAY then hours, hs = 0, now end
    hours = bit.bor(hours, bit.lshift(1, floor(now / 3600) % 24))
    if tpl ~= '' then
      if tp == tpl then tc = tc + 1
      elseif tc <= 1 then tp, tc = tpl, 1
      else tc = tc - 1 end
    end
    local counts = {}
    for j = 1, n do counts[j] = (c[j] or 0) * factor + tonumber(ARGV[a + j - 1]) end
    a = a + n
    local packed = pack(ACCOUNT, now, first, gm, gv, gk, hours, hs, tc, n)
        .. pack(doubles(n), unpack(counts)) .. tp
    call('SET', key, packed, 'PX', floor(ttl * 1000))
    out[#out + 1] = raw
    out[#out + 1] = packed
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
      call('PEXPIRE', key, floor(ttl * 1000) + 1)
    end
  elseif kind == 'x' then
    local field = ARGV[a]; a = a + 1
    if field == '' then call('DEL', key) else call('HDEL', key, field) end
  end
end
return out
