-- Risk-signal primitives on one key, with server time and a TTL on every write.
-- ARGV[1] = mode:
--   'h' HyperLogLog: ttl_ms, members...            -> estimated cardinality
--   'w' sliding-window counter: period_ms, bucket width ms, amount -> sum over the window
--   'd' decaying counter: half_life_ms, amount     -> current value (string, full precision)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
local mode = ARGV[1]
if mode == 'h' then
  if #ARGV > 2 then redis.call('PFADD', key, unpack(ARGV, 3)) end
  if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ARGV[2]) end
  return redis.call('PFCOUNT', key)
elseif mode == 'w' then
  local period = tonumber(ARGV[2])
  local gran = tonumber(ARGV[3])
  local amount = tonumber(ARGV[4])
  local cur = now - (now % gran)
  local raw = redis.call('HGETALL', key)
  local sum = 0
  local dead = {}
  for j = 1, #raw, 2 do
    if tonumber(raw[j]) + gran > now - period then
      sum = sum + tonumber(raw[j + 1])
    else
      dead[#dead + 1] = raw[j]
    end
  end
  if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
  if amount ~= 0 then
    redis.call('HINCRBY', key, cur, amount)
    redis.call('PEXPIRE', key, cur + gran + period + 1 - now)
    sum = sum + amount
  end
  return sum
else
  local half_life = tonumber(ARGV[2])
  local amount = tonumber(ARGV[3])
  local cur = redis.call('HMGET', key, 'v', 't')
  local value = 0
  if cur[1] then
    value = tonumber(cur[1]) * math.pow(2, -(now - tonumber(cur[2])) / half_life)
  end
  value = value + amount
  redis.call('HSET', key, 'v', string.format('%.17g', value), 't', now)
  redis.call('PEXPIRE', key, math.ceil(20 * half_life))
  return string.format('%.17g', value)
end
