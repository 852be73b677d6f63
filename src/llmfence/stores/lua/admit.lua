-- admit.lua: every check of one request, then every reservation: all or nothing.
--
-- KEYS[1]                   the reservation, kept for settle.lua
-- KEYS[2 .. 1+nr]           rate buckets, hashes {level, t} (see stores/_window.py)
-- KEYS[2+nr .. 1+nr+ns]     lease sets, sorted sets {request id -> expiry (Unix seconds)}
-- KEYS[2+nr+ns .. 1+nr+ns+nb]  budget counters (see budget.lua)
-- KEYS[2+nr+ns+nb]          the request id's tombstone, left by settle.lua or release.lua
--                           when a refund or release came before this admission
--
-- ARGV[1] now (Unix seconds, float text)   ARGV[2] now in integer milliseconds
-- ARGV[3] request id   ARGV[4] cost (nano-USD)   ARGV[5] reservation expiry (Unix seconds)
-- ARGV[6] reservation key TTL (ms)   ARGV[7] nr   ARGV[8] ns   ARGV[9] nb
-- ARGV[10] '1' to take nothing and only answer with the states (a cluster store's admission
--         of an id its home already holds, see _redis_shards.py)
-- ARGV[11] '1' to keep in the reservation what each bucket held before (a cluster store, which
--         may have to take this part back when another slot refuses: settle.lua restores a
--         bucket nobody has touched since exactly, so a refusal leaves it as it was)
-- then per bucket (5):  kind ('requests'|'tokens'), window ms, limit, cost, key TTL (ms)
-- then per lease (3):   limit, lease expiry (Unix seconds), key TTL (ms)
-- then per budget (3):  limit ('' for none), period end ('' for none), '1' if clients name it
--                       (an end user's: it expires when idle, see budget.lua)
--
-- On a single node one call names every key of the request. A cluster store sends this
-- script once per slot, with the checks whose keys live there (see _redis_shards.py).
-- Money never passes through a Lua number into a command: it goes in as the caller's text
-- (HINCRBY) or through string.format('%d'), because Lua 5.1 formats numbers with %.14g.
--
-- Returns 'verdict position current', then per bucket 'level t' (as stored; '0 0' for none),
-- then per budget 'spent total end' ('-' for no end), all in one space-separated string: the
-- states after the budgets rolled and before anything was reserved. One string, not
-- an array, because the client parses a reply element by element, and that cost more than the
-- script. verdict: 0 admitted, 1 a bucket refused, 2 a lease set refused, 3 a budget refused,
-- 4 admitted with nothing taken (the id holds a live reservation: a retried or duplicated
-- admission; or a tombstone: its refund or release came first); position is the 1-based position of the refusing check in its group; current is the leases
-- held when a lease set refused.

local now = tonumber(ARGV[1])
local now_ms = tonumber(ARGV[2])
local request_id = ARGV[3]
local cost_text = ARGV[4]
local cost = tonumber(cost_text)
local nr, ns, nb = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local rate_base, slot_base = 11, 11 + 5 * nr
local budget_base = slot_base + 3 * ns
-- A client-named budget counter outlives any reservation that may hold it.
local client_floor = tonumber(ARGV[6]) + CLIENT_GRACE_MS

-- _window.drained: the level now of a bucket, in units × window ms. A level above the
-- bucket's size reads as full; a caller whose clock is behind `t` (another host) reads it as
-- at `t`, so it neither wipes nor inflates it.
local function drained(b, size, limit)
  local level, full = b.level, limit * size
  if level > full then level = full end
  if now_ms > b.t then level = level - (now_ms - b.t) * limit end
  if level < 0 then return 0 end
  return level
end

-- Buckets: read only. A key named twice shares one state, as it does in MemoryStore. Nothing
-- is written unless the request is admitted (draining depends on the limit).
local buckets, rates = {}, {}
for i = 1, nr do
  local key = KEYS[1 + i]
  local a = rate_base + 5 * (i - 1)
  local rate = {
    key = key, kind = ARGV[a + 1], size = tonumber(ARGV[a + 2]), limit = tonumber(ARGV[a + 3]),
    cost = tonumber(ARGV[a + 4]), ttl = ARGV[a + 5],
    size_text = ARGV[a + 2], limit_text = ARGV[a + 3], cost_text = ARGV[a + 4],
  }
  rates[i] = rate
  local b = buckets[key]
  if not b then
    local v = redis.call('HMGET', key, 'level', 't')
    local level_text, t_text = v[1] or '0', v[2] or '0'
    b = {level = tonumber(level_text), t = tonumber(t_text), text = level_text .. ' ' .. t_text,
      old_level = v[1] or '', old_t = v[2] or ''}
    buckets[key] = b
  end
  rate.bucket = b
end

-- Budgets: roll every level first (MemoryStore rolls before it checks anything).
local budgets = {}
for i = 1, nb do
  local a = budget_base + 3 * (i - 1)
  local b = load_budget(KEYS[1 + nr + ns + i], now, ARGV[a + 2])
  b.key = KEYS[1 + nr + ns + i]
  b.limit = ARGV[a + 1]
  b.client = ARGV[a + 3] == '1'
  budgets[i] = b
end

-- Client-named counters get their TTLs whatever the verdict: a roll may have written one.
local function expire_clients(reserved)
  for i = 1, nb do
    local b = budgets[i]
    if b.client then
      expire_client(b.key, b.ends, b.spent + reserved, now, client_floor)
    end
  end
end

local function reply(verdict, position, current)
  local out = {string.format('%d %d %d', verdict, position, current)}
  for i = 1, nr do
    out[#out + 1] = rates[i].bucket.text
  end
  for i = 1, nb do
    out[#out + 1] = string.format('%d', budgets[i].spent)
    out[#out + 1] = budgets[i].total
    out[#out + 1] = budgets[i].ends or '-'
  end
  return table.concat(out, ' ')
end

-- Idempotent per request id: a live reservation (by the caller's clock, as settle.lua judges
-- it) or a tombstone makes this admission a no-op. An expired reservation is overwritten.
local held_raw = redis.call('GET', KEYS[1])
if ARGV[10] == '1' or (held_raw and tonumber(cjson.decode(held_raw).expires) > now)
    or redis.call('EXISTS', KEYS[2 + nr + ns + nb]) == 1 then
  expire_clients(0)
  return reply(4, 0, 0)
end

-- The checks, in MemoryStore's order: request buckets, token buckets, leases, budgets.
for _, kind in ipairs({'requests', 'tokens'}) do
  for i = 1, nr do
    local r = rates[i]
    -- A hit fits iff level_now + cost × W <= limit × W.
    if r.kind == kind and drained(r.bucket, r.size, r.limit) + r.cost * r.size > r.limit * r.size then
      expire_clients(0)
      return reply(1, i, 0)
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
    expire_clients(0)
    return reply(2, j, held)
  end
end

for i = 1, nb do
  local b = budgets[i]
  -- spent + cost > limit, compared without forming a sum that could pass 2^53.
  if b.limit ~= '' and b.spent > tonumber(b.limit) - cost then
    expire_clients(0)
    return reply(3, i, 0)
  end
end

-- Admitted: take everything.
local out = reply(0, 0, 0)
local tokens, requests = {}, {}
for i = 1, nr do
  -- Hit by hit, so a key named twice takes both, as in MemoryStore; never backwards in time.
  local r = rates[i]
  local b = r.bucket
  b.level = drained(b, r.size, r.limit) + r.cost * r.size
  if now_ms > b.t then b.t = now_ms end
  local hits = (r.kind == 'tokens') and tokens or requests
  -- The limit goes with the hit: settle.lua drains by it, as no settlement names one.
  hits[#hits + 1] = {r.key, r.size_text, r.limit_text, r.cost_text, r.ttl}
end
local undo = nil
if ARGV[11] == '1' then undo = {} end
for i = 1, nr do
  local key = rates[i].key
  local b = buckets[key]
  if b then
    -- %.0f, not %d: a level may pass 2^63 under an absurd limit, and %d would wrap it.
    local level, t = string.format('%.0f', b.level), string.format('%d', b.t)
    redis.call('HSET', key, 'level', level, 't', t)
    redis.call('PEXPIRE', key, rates[i].ttl)
    buckets[key] = nil
    if undo then undo[#undo + 1] = {key, b.old_level, b.old_t, level, t} end
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
  -- The third field tells settle.lua the counter is client-named (see budget.lua).
  reserved[i] = {b.key, string.format('%d', b.epoch), b.client and '1' or ''}
end
expire_clients(cost)

-- Every value is a string, so cjson's 14-digit number formatting never touches them.
redis.call('SET', KEYS[1], cjson.encode({
  expires = ARGV[5], cost = cost_text, budgets = reserved, tokens = tokens,
  requests = requests, slots = slots, undo = undo,
}), 'PX', ARGV[6])
return out
