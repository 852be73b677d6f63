-- admit.lua: every check of one request, then every reservation: all or nothing.
--
-- KEYS[1]                   the reservation, kept for settle.lua
-- KEYS[2 .. 1+nr]           window counters, hashes {index, cur, prev}
-- KEYS[2+nr .. 1+nr+ns]     lease sets, sorted sets {request id -> expiry (Unix seconds)}
-- KEYS[2+nr+ns .. ]         budget counters (see budget.lua)
--
-- ARGV[1] now (Unix seconds, float text)   ARGV[2] now in integer milliseconds
-- ARGV[3] request id   ARGV[4] cost (nano-USD)   ARGV[5] reservation expiry (Unix seconds)
-- ARGV[6] reservation key TTL (ms)   ARGV[7] nr   ARGV[8] ns   ARGV[9] nb
-- then per window (6):  kind ('requests'|'tokens'), window ms, window index, limit, cost,
--                       key TTL (ms)
-- then per lease (3):   limit, lease expiry (Unix seconds), key TTL (ms)
-- then per budget (2):  limit ('' for none), period end ('' for none)
--
-- Every key is hash-tagged with the store's prefix, so they all live in one cluster slot.
-- Money never passes through a Lua number into a command: it goes in as the caller's text
-- (HINCRBY) or through string.format('%d'), because Lua 5.1 formats numbers with %.14g.
--
-- Returns 'verdict position current', then per window 'cur prev index', then per budget
-- 'spent total end' ('-' for no end), all in one space-separated string: the states after the
-- windows advanced and the budgets rolled and before anything was reserved. One string, not
-- an array, because the client parses a reply element by element, and that cost more than the
-- script. verdict: 0 admitted, 1 a window refused, 2 a lease set refused, 3 a budget refused;
-- position is the 1-based position of the refusing check in its group; current is the leases
-- held when a lease set refused.

local now = tonumber(ARGV[1])
local now_ms = tonumber(ARGV[2])
local request_id = ARGV[3]
local cost_text = ARGV[4]
local cost = tonumber(cost_text)
local nr, ns, nb = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local rate_base, slot_base = 9, 9 + 6 * nr
local budget_base = slot_base + 3 * ns

-- Windows: read and advance to the current window. A key named twice shares one state, as
-- it does in MemoryStore. Nothing is written unless the request is admitted: advancing is
-- path-independent, so a refused request that leaves the counter alone changes nothing.
local windows, window_order, rates = {}, {}, {}
for i = 1, nr do
  local key = KEYS[1 + i]
  local a = rate_base + 6 * (i - 1)
  local rate = {
    key = key, kind = ARGV[a + 1], size = tonumber(ARGV[a + 2]), index = tonumber(ARGV[a + 3]),
    limit = tonumber(ARGV[a + 4]), cost = tonumber(ARGV[a + 5]), ttl = ARGV[a + 6],
    index_text = ARGV[a + 3], size_text = ARGV[a + 2], cost_text = ARGV[a + 5],
  }
  rates[i] = rate
  local w = windows[key]
  if not w then
    local v = redis.call('HMGET', key, 'index', 'cur', 'prev')
    w = {index = tonumber(v[1] or '0'), cur = tonumber(v[2] or '0'), prev = tonumber(v[3] or '0')}
    windows[key] = w
    window_order[#window_order + 1] = key
  end
  -- Only ever forward: a caller whose clock is a little behind (another host) counts in the
  -- current window instead of wiping it.
  if rate.index > w.index then
    w.prev = (rate.index == w.index + 1) and w.cur or 0
    w.cur = 0
    w.index = rate.index
  end
  rate.window = w
end

-- Budgets: roll every level first (MemoryStore rolls before it checks anything).
local budgets = {}
for i = 1, nb do
  local a = budget_base + 2 * (i - 1)
  local b = load_budget(KEYS[1 + nr + ns + i], now, ARGV[a + 2])
  b.key = KEYS[1 + nr + ns + i]
  b.limit = ARGV[a + 1]
  budgets[i] = b
end

local function reply(verdict, position, current)
  local out = {string.format('%d %d %d', verdict, position, current)}
  for i = 1, nr do
    out[#out + 1] = string.format('%d', rates[i].window.cur)
    out[#out + 1] = string.format('%d', rates[i].window.prev)
    out[#out + 1] = string.format('%d', rates[i].window.index)
  end
  for i = 1, nb do
    out[#out + 1] = string.format('%d', budgets[i].spent)
    out[#out + 1] = budgets[i].total
    out[#out + 1] = budgets[i].ends or '-'
  end
  return table.concat(out, ' ')
end

-- The checks, in MemoryStore's order: request windows, token windows, leases, budgets.
for _, kind in ipairs({'requests', 'tokens'}) do
  for i = 1, nr do
    local r = rates[i]
    if r.kind == kind then
      local w = r.window
      local elapsed = math.max(0, now_ms - w.index * r.size)
      -- _window.fits, scaled by the window length so the test is exact in integers.
      local used = w.cur * r.size + w.prev * (r.size - elapsed)
      if used + r.cost * r.size > r.limit * r.size then
        return reply(1, i, 0)
      end
    end
  end
end

for j = 1, ns do
  local key = KEYS[1 + nr + j]
  local limit = tonumber(ARGV[slot_base + 3 * (j - 1) + 1])
  -- Leases whose expiry is at or before now belong to requests that never came back.
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
  local held = redis.call('ZCARD', key)
  if held >= limit then
    return reply(2, j, held)
  end
end

for i = 1, nb do
  local b = budgets[i]
  -- spent + cost > limit, compared without forming a sum that could pass 2^53.
  if b.limit ~= '' and b.spent > tonumber(b.limit) - cost then
    return reply(3, i, 0)
  end
end

-- Admitted: take everything.
local out = reply(0, 0, 0)
local tokens, requests = {}, {}
for i = 1, nr do
  local r = rates[i]
  r.window.cur = r.window.cur + r.cost
  local hits = (r.kind == 'tokens') and tokens or requests
  hits[#hits + 1] = {r.key, r.size_text, string.format('%d', r.window.index), r.cost_text, r.ttl}
end
for i = 1, nr do
  local key = rates[i].key
  local w = windows[key]
  if w then
    redis.call('HSET', key, 'index', string.format('%d', w.index),
      'cur', string.format('%d', w.cur), 'prev', string.format('%d', w.prev))
    redis.call('PEXPIRE', key, rates[i].ttl)
    windows[key] = nil
  end
end

local slots = {}
for j = 1, ns do
  local key = KEYS[1 + nr + j]
  local a = slot_base + 3 * (j - 1)
  redis.call('ZADD', key, ARGV[a + 2], request_id)
  -- Only ever lengthen the set's TTL: another lease in it may outlive this one.
  if redis.call('PTTL', key) < tonumber(ARGV[a + 3]) then
    redis.call('PEXPIRE', key, ARGV[a + 3])
  end
  slots[j] = key
end

local reserved = {}
for i = 1, nb do
  local b = budgets[i]
  redis.call('HINCRBY', b.key, 'spent', cost_text)
  reserved[i] = {b.key, string.format('%d', b.epoch)}
end

-- Every value is a string, so cjson's 14-digit number formatting never touches them.
redis.call('SET', KEYS[1], cjson.encode({
  expires = ARGV[5], cost = cost_text, budgets = reserved, tokens = tokens,
  requests = requests, slots = slots,
}), 'PX', ARGV[6])
return out
