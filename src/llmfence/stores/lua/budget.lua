-- budget.lua: the budget period roll, shared by admit.lua and charge.lua.
--
-- Not a script on its own: the store prepends it to the scripts that roll budgets, so the rule
-- lives in one place. A budget counter is a hash {spent, total, end, epoch}:
--   spent   nano-USD spent in the current period (an integer, changed only by HINCRBY)
--   total   nano-USD spent ever (settled or charged)
--   end     Unix seconds (float text, as the caller wrote it) when the period ends; absent
--           while the spend never resets
--   epoch   bumped at every roll, so settle can tell that a reservation's period is gone
--   leased  how much of `spent` is slices leased to app instances (lease.lua); absent if none
--
-- Times stay the caller's float text: comparing two doubles parsed from Python's repr is
-- exact, so a period ends at exactly the instant MemoryStore says it does.
--
-- A client-named counter (an end user's: clients choose the names) expires once nobody needs
-- it, so Redis holds what the operator created and what clients used lately, not every name
-- ever sent. `expire_client` sets its TTL: CLIENT_GRACE_MS after its period ends (by the
-- caller's clock), never sooner than `floor_ms` from now (the life of a reservation that may
-- hold it), and never shorter than the TTL it has. A counter without a period keeps spend that
-- never resets, so it is kept for ever (PERSIST) unless its spend is zero. An expired counter
-- reads as a missing one: nothing spent, in a period that starts at the next touch; only its
-- all-time total is gone, which no answer about an end user shows. The operator's counters
-- (global, team, user, key, models) get no TTL: their totals are kept for ever.

local CLIENT_GRACE_MS = 60000
local MAX_TTL_MS = 315360000000  -- ten years: no TTL passes what PEXPIRE takes

local function expire_client(key, ends, spent, now, floor_ms)
  local ttl
  if ends then
    ttl = math.ceil((tonumber(ends) - now) * 1000) + CLIENT_GRACE_MS
  elseif spent == 0 then
    ttl = 0
  else
    redis.call('PERSIST', key)
    return
  end
  if ttl < floor_ms then ttl = floor_ms end
  if ttl > MAX_TTL_MS then ttl = MAX_TTL_MS end
  local current = redis.call('PTTL', key)  -- -2: no such key, -1: no TTL
  if current == -1 or (current >= 0 and current < ttl) then
    redis.call('PEXPIRE', key, string.format('%d', ttl))
  end
end

-- Load a budget counter and roll it (persisted at once, as MemoryStore does even when the
-- admission is refused). `period_end` is '' when a period starting now would never end.
local function load_budget(key, now, period_end)
  local v = redis.call('HMGET', key, 'spent', 'total', 'end', 'epoch')
  local b = {
    spent = tonumber(v[1] or '0'),
    total = v[2] or '0',
    ends = v[3],
    epoch = tonumber(v[4] or '0'),
  }
  if not b.ends then
    -- First touch, or a duration configured since: the first period starts now.
    if period_end ~= '' then
      redis.call('HSET', key, 'end', period_end)
      b.ends = period_end
    end
  elseif now >= tonumber(b.ends) then
    b.spent = 0
    b.epoch = b.epoch + 1
    redis.call('HSET', key, 'spent', '0', 'epoch', string.format('%d', b.epoch))
    -- Slices leased in the ended period (lease.lua) went with its spend.
    redis.call('HDEL', key, 'leased')
    if period_end ~= '' then
      redis.call('HSET', key, 'end', period_end)
      b.ends = period_end
    else
      redis.call('HDEL', key, 'end')
      b.ends = false
    end
  end
  return b
end
