-- settle.lua: settle one reservation with the actual cost and append its spend record.
--
-- KEYS[1]      the reservation written by admit.lua
-- KEYS[2]      the spend log, a list of JSON records, newest first
-- KEYS[3 ..]   the running totals the record counts in, hashes
--              {cost, input_tokens, output_tokens, requests}
--
-- ARGV[1] now (Unix seconds, float text)   ARGV[2] now in integer milliseconds
-- ARGV[3] actual cost (nano-USD)   ARGV[4] actual tokens ('' to keep the reserved count)
-- ARGV[5] request id   ARGV[6] the record as JSON ('' for none)   ARGV[7] records kept
-- ARGV[8] record cost   ARGV[9] record input tokens   ARGV[10] record output tokens
-- ARGV[11] '1' to give back the request-window hits too
--
-- The budget, window and lease keys to settle are named in the reservation: admit.lua got
-- them in its KEYS, and they carry the same hash tag, so they live in this cluster slot too.
-- Returns 1 if this call settled the reservation, 0 if it was already settled, expired or
-- unknown (the record is appended either way).

if ARGV[6] ~= '' then
  local keep = tonumber(ARGV[7])
  if keep > 0 then
    redis.call('LPUSH', KEYS[2], ARGV[6])
    redis.call('LTRIM', KEYS[2], 0, string.format('%d', keep - 1))
  end
  -- Totals survive the log's bound: they count every record ever appended.
  for i = 3, #KEYS do
    redis.call('HINCRBY', KEYS[i], 'cost', ARGV[8])
    redis.call('HINCRBY', KEYS[i], 'input_tokens', ARGV[9])
    redis.call('HINCRBY', KEYS[i], 'output_tokens', ARGV[10])
    redis.call('HINCRBY', KEYS[i], 'requests', 1)
  end
end

local raw = redis.call('GET', KEYS[1])
if not raw then
  return 0
end
redis.call('DEL', KEYS[1])
local r = cjson.decode(raw)
local now = tonumber(ARGV[1])
if tonumber(r.expires) <= now then
  return 0
end

local cost_text = ARGV[3]
-- Both are at most 2^53, so their difference is exact in a double.
local delta = string.format('%d', tonumber(cost_text) - tonumber(r.cost))
for _, entry in ipairs(r.budgets) do
  local key, epoch = entry[1], entry[2]
  if (redis.call('HGET', key, 'epoch') or '0') == epoch then
    -- Same period as the reservation: refund or top up the difference, never below zero.
    if redis.call('HINCRBY', key, 'spent', delta) < 0 then
      redis.call('HSET', key, 'spent', '0')
    end
  else
    -- The period rolled: the reservation went with the old one, the whole cost lands here.
    redis.call('HINCRBY', key, 'spent', cost_text)
  end
  redis.call('HINCRBY', key, 'total', cost_text)
end

local now_ms = tonumber(ARGV[2])
-- Move a window hit by `change` units in the window it was counted in, if still seen.
local function adjust(entry, change)
  local key = entry[1]
  local size, index = tonumber(entry[2]), tonumber(entry[3])
  local v = redis.call('HMGET', key, 'index', 'cur', 'prev')
  -- A counter that is gone expired with its windows: nothing left to adjust.
  if not v[1] then
    return
  end
  local w = {index = tonumber(v[1]), cur = tonumber(v[2] or '0'), prev = tonumber(v[3] or '0')}
  local target = math.max(w.index, math.floor(now_ms / size))
  if target ~= w.index then
    w.prev = (target == w.index + 1) and w.cur or 0
    w.cur = 0
    w.index = target
  end
  if index == w.index then
    w.cur = math.max(0, w.cur + change)
  elseif index == w.index - 1 then
    w.prev = math.max(0, w.prev + change)
  end
  redis.call('HSET', key, 'index', string.format('%d', w.index),
    'cur', string.format('%d', w.cur), 'prev', string.format('%d', w.prev))
  redis.call('PEXPIRE', key, entry[5])
end

if ARGV[4] ~= '' then
  local tokens = tonumber(ARGV[4])
  for _, entry in ipairs(r.tokens) do
    adjust(entry, tokens - tonumber(entry[4]))
  end
end
if ARGV[11] == '1' then
  -- A later check refused the request: its request-window hits go back too.
  for _, entry in ipairs(r.requests or {}) do
    adjust(entry, -tonumber(entry[4]))
  end
end

for _, key in ipairs(r.slots) do
  redis.call('ZREM', key, ARGV[5])
end
return 1
