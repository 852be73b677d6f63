-- budget.lua: the budget period roll, shared by admit.lua and charge.lua.
--
-- Not a script on its own: the store prepends it to the scripts that roll budgets, so the rule
-- lives in one place. A budget counter is a hash {spent, total, end, epoch}:
--   spent   nano-USD spent in the current period (an integer, changed only by HINCRBY)
--   total   nano-USD spent ever (settled or charged)
--   end     Unix seconds (float text, as the caller wrote it) when the period ends; absent
--           while the spend never resets
--   epoch   bumped at every roll, so settle can tell that a reservation's period is gone
--
-- Times stay the caller's float text: comparing two doubles parsed from Python's repr is
-- exact, so a period ends at exactly the instant MemoryStore says it does.

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
