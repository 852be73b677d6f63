-- settle.lua: settle one request id once: its reservation, or the levels it names, and its
-- spend record (budget.lua is prepended).
--
-- KEYS[1]   the reservation written by admit.lua
-- KEYS[2]   the spend log, a list of JSON records, newest first
-- KEYS[3]   the running totals, one hash: field '<group>:<name>' (e.g. 'user:alice', 'global:')
--           holding '<cost> <input tokens> <output tokens> <requests>', integers in decimal
-- KEYS[4]   the end users' fields of KEYS[3], a sorted set scored by when they last counted:
--           only the most recent max(records kept, 1000) end users keep their totals (clients
--           name end users; the operator's groups are kept for ever)
--           (KEYS[2 .. 4] are only touched when a record is given: a cluster store's part
--           without one names keys of its own slot there instead)
-- KEYS[5]   the request id's tombstone (see admit.lua)
-- KEYS[6 ..] the budget counters to charge when no live reservation holds the id (see below)
--
-- ARGV[1] now (Unix seconds, float text)   ARGV[2] now in integer milliseconds
-- ARGV[3] actual cost (nano-USD)   ARGV[4] actual tokens ('' to keep the reserved count)
-- ARGV[5] request id   ARGV[6] '1' to give back the request-bucket hits too
-- ARGV[7] records kept   ARGV[8] the tombstone's TTL (ms)
-- ARGV[9] when to leave the tombstone: 'always', 'missing' (only when no live reservation
--         was found) or 'never' (a cluster store taking back a refused admission's parts)
-- ARGV[10] nc, the number of budget counters to charge, then per counter (2): its period
--         end ('' for none), '1' if clients name it (it expires when idle, see budget.lua)
-- then the record as JSON ('' for none, and nothing follows), its cost, input tokens, output
-- tokens, and the totals fields the record counts in
--
-- The rules, once per request id (see stores/_protocol.py):
-- 1. a live reservation: the reservation's own levels get the refund or top-up, its TPM hits
--    move to the actual tokens, its leases are freed, the record is appended; returns 1;
-- 2. a tombstone: a no-op (the id was settled, refunded or released already); returns 0;
-- 3. no live reservation (none, or an expired one): the cost is charged at KEYS[6 ..] exactly
--    as charge.lua charges it, and the record is appended; returns 0.
-- Then the tombstone is left (ARGV[9]), so the same settlement sent again (its reply was
-- lost) is rule 2, and a late admission of the id takes nothing.
--
-- The budget, bucket and lease keys to settle are named in the reservation: admit.lua got
-- them in its KEYS. A cluster store sends this script once per slot, with the part of the
-- request that lives there (see _redis_ledger.py): those keys are then in this slot too.

local now = tonumber(ARGV[1])
local now_ms = tonumber(ARGV[2])
local nc = tonumber(ARGV[10])
local rb = 10 + 2 * nc  -- ARGV[rb + 1] is the record

-- The exact sum of two integers written in decimal, for totals too large for a shortcut:
-- Lua numbers are doubles, exact only up to 2^53, so the sum is taken in base-10^7 limbs,
-- where every partial sum stays exact.
local LIMB, WIDTH = 10000000, 7

local function limbs(text)
  local sign = 1
  if string.sub(text, 1, 1) == '-' then
    sign, text = -1, string.sub(text, 2)
  end
  local out = {}
  for stop = #text, 1, -WIDTH do
    out[#out + 1] = sign * tonumber(string.sub(text, math.max(1, stop - WIDTH + 1), stop))
  end
  return out
end

local function add(a, b)
  local x, y = limbs(a), limbs(b)
  local sum = {}
  for i = 1, math.max(#x, #y) do
    sum[i] = (x[i] or 0) + (y[i] or 0)
  end
  -- With the operands' signs equal, every limb sum has that sign; with them different, each is
  -- within (-LIMB, LIMB), so the top non-zero limb outweighs all below it. Either way the top
  -- non-zero limb gives the sign; then the magnitude is normalized with carries.
  local sign = 1
  for i = #sum, 1, -1 do
    if sum[i] ~= 0 then
      if sum[i] < 0 then sign = -1 end
      break
    end
  end
  local carry = 0
  for i = 1, #sum do
    local v = sign * sum[i] + carry
    carry = math.floor(v / LIMB)
    sum[i] = v - carry * LIMB
  end
  if carry > 0 then sum[#sum + 1] = carry end
  local top = #sum
  while top > 1 and sum[top] == 0 do top = top - 1 end
  -- A negative sign was only taken from a non-zero limb, so it never yields '-0'.
  local parts = {sign < 0 and '-' or '', string.format('%d', sum[top])}
  for i = top - 1, 1, -1 do
    parts[#parts + 1] = string.format('%07d', sum[i])
  end
  return table.concat(parts)
end

local function append_record()
  if ARGV[rb + 1] == '' then
    return
  end
  local keep = tonumber(ARGV[7])
  if keep > 0 and redis.call('LPUSH', KEYS[2], ARGV[rb + 1]) > keep then
    redis.call('LTRIM', KEYS[2], 0, string.format('%d', keep - 1))
  end
  -- Totals survive the log's bound: they count every record ever appended. Each group's four
  -- counters are packed in one field, so all groups are read in one command and written in
  -- one, instead of one increment per counter and group.
  local cost, input, output = ARGV[rb + 2], ARGV[rb + 3], ARGV[rb + 4]
  -- Operands under 10^15 in size (15 characters at most) sum under 2^53: exact as Lua
  -- numbers, and %d prints them whole. Anything longer takes the exact decimal sum.
  local short = #cost < 16 and #input < 16 and #output < 16
  local cost_n, input_n, output_n = tonumber(cost), tonumber(input), tonumber(output)
  local fields = {unpack(ARGV, rb + 5)}
  local old = redis.call('HMGET', KEYS[3], unpack(fields))
  local new = {}
  for i, field in ipairs(fields) do
    local value
    if not old[i] then
      value = cost .. ' ' .. input .. ' ' .. output .. ' 1'
    else
      local c, n, o, r = string.match(old[i], '^(%S+) (%S+) (%S+) (%S+)$')
      if short and #c < 16 and #n < 16 and #o < 16 and #r < 16 then
        value = string.format('%d %d %d %d', tonumber(c) + cost_n, tonumber(n) + input_n,
          tonumber(o) + output_n, tonumber(r) + 1)
      else
        value = add(c, cost) .. ' ' .. add(n, input) .. ' ' .. add(o, output) .. ' '
          .. add(r, '1')
      end
    end
    new[2 * i - 1], new[2 * i] = field, value
  end
  redis.call('HSET', KEYS[3], unpack(new))
  local counted = false
  for _, field in ipairs(fields) do
    if string.sub(field, 1, 9) == 'end_user:' then
      redis.call('ZADD', KEYS[4], ARGV[2], field)
      counted = true
    end
  end
  if counted then
    local excess = redis.call('ZCARD', KEYS[4]) - math.max(keep, 1000)
    if excess > 0 then
      local gone = redis.call('ZPOPMIN', KEYS[4], excess)
      for i = 1, #gone, 2 do
        redis.call('HDEL', KEYS[3], gone[i])
      end
    end
  end
end


local function settle_reservation(r)
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
    if entry[3] == '1' and not redis.call('HGET', key, 'end') then
      -- A client-named counter without a period (see budget.lua): kept while it holds spend,
      -- expiring a minute after it is back at zero.
      if tonumber(redis.call('HGET', key, 'spent')) == 0 then
        local current = redis.call('PTTL', key)
        if current == -1 or (current >= 0 and current < 60000) then
          redis.call('PEXPIRE', key, 60000)
        end
      else
        redis.call('PERSIST', key)
      end
    end
  end

  -- Move a bucket's level by `change` units now, never below empty (MemoryLedger._adjust).
  -- entry: {key, window ms, the limit it was admitted under, units, key TTL (ms)}; it drains by
  -- that limit, as a settlement names none.
  -- Taking back a refused admission's part (a cluster store, ARGV[9] 'never'): a bucket
  -- nobody has touched since gets exactly what it held before (a refused admission writes no
  -- bucket); one that others hit meanwhile gives back this request's units, as below.
  local restored = {}
  if ARGV[9] == 'never' and r.undo then
    for _, u in ipairs(r.undo) do
      local key = u[1]
      local v = redis.call('HMGET', key, 'level', 't')
      if v[1] == u[4] and v[2] == u[5] then
        if u[2] == '' then
          redis.call('DEL', key)
        else
          redis.call('HSET', key, 'level', u[2], 't', u[3])
        end
        restored[key] = true
      end
    end
  end

  local function adjust(entry, change)
    if change == 0 or restored[entry[1]] then
      return
    end
    local key = entry[1]
    local size, limit = tonumber(entry[2]), tonumber(entry[3])
    local v = redis.call('HMGET', key, 'level', 't')
    -- A bucket that is gone expired empty: nothing to give back.
    if not v[1] and change < 0 then
      return
    end
    local level, t = tonumber(v[1] or '0'), tonumber(v[2] or '0')
    -- _window.drained, then the change.
    local full = limit * size
    if level > full then level = full end
    if now_ms > t then
      level = level - (now_ms - t) * limit
      t = now_ms
    end
    if level < 0 then level = 0 end
    level = level + change * size
    if level < 0 then level = 0 end
    redis.call('HSET', key, 'level', string.format('%.0f', level), 't', string.format('%d', t))
    redis.call('PEXPIRE', key, entry[5])
  end

  if ARGV[4] ~= '' then
    local tokens = tonumber(ARGV[4])
    for _, entry in ipairs(r.tokens) do
      adjust(entry, tokens - tonumber(entry[4]))
    end
  end
  if ARGV[6] == '1' then
    -- A later check refused the request: its request-bucket hits go back too.
    for _, entry in ipairs(r.requests or {}) do
      adjust(entry, -tonumber(entry[4]))
    end
  end

  for _, key in ipairs(r.slots) do
    redis.call('ZREM', key, ARGV[5])
  end
end

-- Rule 2: settled (or refunded, or released) already.
if redis.call('EXISTS', KEYS[5]) == 1 then
  return 0
end

local r = false
local raw = redis.call('GET', KEYS[1])
if raw then
  redis.call('DEL', KEYS[1])
  r = cjson.decode(raw)
  if tonumber(r.expires) <= now then
    r = false  -- expired: its reserved spend stays spent, and the id is unknown
  end
end

if r then
  settle_reservation(r)
else
  -- Rule 3: no admission holds the id; the cost lands where the settlement says, as
  -- charge.lua would put it.
  local cost = ARGV[3]
  for i = 1, nc do
    local key = KEYS[5 + i]
    local b = load_budget(key, now, ARGV[9 + 2 * i])
    redis.call('HINCRBY', key, 'spent', cost)
    redis.call('HINCRBY', key, 'total', cost)
    if ARGV[10 + 2 * i] == '1' then
      expire_client(key, b.ends, b.spent + tonumber(cost), now, CLIENT_GRACE_MS)
    end
  end
end
append_record()

local mode = ARGV[9]
if mode == 'always' or (mode == 'missing' and not r) then
  redis.call('SET', KEYS[5], '1', 'PX', ARGV[8])
end
if r then
  return 1
end
return 0
