-- reset_budget.lua: start a new period for one budget counter now.
--
-- KEYS[1]   the budget counter (see budget.lua)
-- ARGV[1]   the new period's end ('' when it never ends)
-- The all-time total is kept; the epoch moves on so an older reservation settles as a new cost.

redis.call('HSET', KEYS[1], 'spent', '0')
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
-- Slices leased in the old period (lease.lua) go with it: their returns add to the total only.
redis.call('HDEL', KEYS[1], 'leased')
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'end', ARGV[1])
else
  redis.call('HDEL', KEYS[1], 'end')
end
return 1
