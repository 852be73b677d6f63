-- budgets.lua: read budget counters in one consistent snapshot.
--
-- KEYS[1 ..]   budget counters (see budget.lua)
-- Returns per key {spent, total, end} ('' for a missing end); nothing is rolled or written.

local out = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'spent', 'total', 'end')
  out[#out + 1] = v[1] or '0'
  out[#out + 1] = v[2] or '0'
  out[#out + 1] = v[3] or ''
end
return out
