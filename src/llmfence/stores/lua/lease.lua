-- lease.lua: slices of one budget counter leased to app instances (budget.lua is prepended).
--
-- On a Redis Cluster every request of a whole-app budget would touch the global counter's
-- slot; instead an instance leases a slice of the budget here, admits the global level
-- locally from it, and returns it (see stores/_redis_slices.py). The counter's `spent` holds
-- every outstanding slice in full, exactly as it holds a request's reservation, so admit.lua's
-- check (spent + cost <= limit) counts them and Σ of everything never passes the limit. The
-- counter's `leased` field is how much of `spent` is outstanding slices: reads subtract it
-- (budgets.lua), so they show spend, not leases. budget.lua's roll drops `leased` with the
-- period's `spent`.
--
-- KEYS[1]  the budget counter (see budget.lua)
-- KEYS[2]  its slices: a hash {lease id -> 'size epoch expiry'} (Unix seconds, float text)
--
-- ARGV[1] op, ARGV[2] now (Unix seconds, float text); then
--   lease   ARGV[3] period end ('' for none), ARGV[4] limit ('' for none), ARGV[5] lease id,
--           ARGV[6] divisor (a slice is 1/divisor of what is neither spent nor leased),
--           ARGV[7] the smallest slice worth having, ARGV[8] the largest (and the size of
--           every slice of a budget without a limit),
--           ARGV[9] the lease's expiry, ARGV[10] the lease id of the slice this one follows
--           ('' for none) and ARGV[11] what that one gives back first (the part of it no
--           request holds: it takes nothing more), ARGV[12 ..] the caller's own leases, which
--           no sweep takes (it is alive, and returns them whatever its clock says)
--           -> {size (0: none, admit per request), epoch, end ('' for none), spent - leased,
--               total, '1' if the slice followed gave its part back}
--   return  ARGV[3] lease id, ARGV[4] used (reserved + settled by its requests), ARGV[5]
--           settled (the actual cost of its settled requests)
--           -> {'ok'}, or {'gone'} (it expired and was swept: it counted as spent in full).
--           A lease past its expiry that no sweep took yet is returned as any other: its
--           instance stopped taking from it before it expired, and knows what it used.
--   adjust  ARGV[3] epoch, ARGV[4] reserved, ARGV[5] actual cost: a request admitted from a
--           slice that is gone (returned, or its period ended), settled as settle.lua
--           settles a reservation's level -> {'ok'}
--
-- An expired lease (its instance died, or never came back) counts as spent in full: its
-- size stays in `spent` and goes to `total`, and only `leased` forgets it. Conservative:
-- spend never passes the budget, and a dead instance's slice is lost to its period.
-- Money goes in as text and through HINCRBY or string.format('%d'), never cjson.

local key, slices = KEYS[1], KEYS[2]
local op, now = ARGV[1], tonumber(ARGV[2])

local function epoch_of()
  return redis.call('HGET', key, 'epoch') or '0'
end

local function drop(id, entry, current_epoch)
  local size, epoch = string.match(entry, '^(%S+) (%S+)')
  if epoch == current_epoch then
    redis.call('HINCRBY', key, 'leased', '-' .. size)
  end
  redis.call('HDEL', slices, id)
  return size
end

-- Leases past their expiry: counted as spent in full (but not the caller's own).
local function sweep(current_epoch, own)
  local all = redis.call('HGETALL', slices)
  for i = 1, #all, 2 do
    local expiry = tonumber(string.match(all[i + 1], '(%S+)$'))
    if expiry <= now and not own[all[i]] then
      redis.call('HINCRBY', key, 'total', drop(all[i], all[i + 1], current_epoch))
    end
  end
end

if op == 'lease' then
  local b = load_budget(key, now, ARGV[3])
  local epoch = string.format('%d', b.epoch)
  local own = {}
  for i = 12, #ARGV do own[ARGV[i]] = true end
  sweep(epoch, own)
  -- The slice this one follows gives back what none of its requests holds, first.
  local shrunk = ''
  local before = ARGV[10] ~= '' and redis.call('HGET', slices, ARGV[10])
  if before then
    local size, old_epoch, expiry = string.match(before, '^(%S+) (%S+) (%S+)$')
    local give = tonumber(ARGV[11])
    if old_epoch == epoch and give > 0 and give <= tonumber(size) then
      redis.call('HINCRBY', key, 'spent', '-' .. ARGV[11])
      redis.call('HINCRBY', key, 'leased', '-' .. ARGV[11])
      b.spent = b.spent - give
      redis.call('HSET', slices, ARGV[10],
        string.format('%d', tonumber(size) - give) .. ' ' .. old_epoch .. ' ' .. expiry)
      shrunk = '1'
    end
  end
  local leased = tonumber(redis.call('HGET', key, 'leased') or '0')
  local size = 0
  if ARGV[4] == '' then
    size = tonumber(ARGV[8])
  else
    -- Room and sizes stay under 2^53: exact as Lua numbers.
    local room = tonumber(ARGV[4]) - b.spent
    local divisor = tonumber(ARGV[6])
    if room > 0 then
      size = math.floor(room / divisor)
      while size > 0 and size * divisor > room do size = size - 1 end
    end
    if size > tonumber(ARGV[8]) then size = tonumber(ARGV[8]) end
    if size < tonumber(ARGV[7]) then size = 0 end
  end
  if size > 0 then
    local text = string.format('%d', size)
    redis.call('HINCRBY', key, 'spent', text)
    redis.call('HINCRBY', key, 'leased', text)
    redis.call('HSET', slices, ARGV[5], text .. ' ' .. epoch .. ' ' .. ARGV[9])
  end
  return {string.format('%d', size), epoch, b.ends or '', string.format('%d', b.spent - leased),
    b.total, shrunk}
end

if op == 'return' then
  local entry = redis.call('HGET', slices, ARGV[3])
  local current = epoch_of()
  if not entry then
    return {'gone'}
  end
  local size, epoch = string.match(entry, '^(%S+) (%S+)')
  drop(ARGV[3], entry, current)
  if epoch == current then
    -- The unused part back (or a top-up past the slice), never below zero.
    local delta = string.format('%d', tonumber(ARGV[4]) - tonumber(size))
    if redis.call('HINCRBY', key, 'spent', delta) < 0 then
      redis.call('HSET', key, 'spent', '0')
    end
  end
  -- A slice of an ended period: its spend stays with that period, which is gone.
  redis.call('HINCRBY', key, 'total', ARGV[5])
  return {'ok'}
end

-- adjust: as settle.lua settles one level of a reservation.
if epoch_of() == ARGV[3] then
  local delta = string.format('%d', tonumber(ARGV[5]) - tonumber(ARGV[4]))
  if redis.call('HINCRBY', key, 'spent', delta) < 0 then
    redis.call('HSET', key, 'spent', '0')
  end
else
  redis.call('HINCRBY', key, 'spent', ARGV[5])
end
redis.call('HINCRBY', key, 'total', ARGV[5])
return {'ok'}
