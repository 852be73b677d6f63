-- budgets.lua: read budget counters in one consistent snapshot.
--
-- KEYS[1 ..]   budget counters (see budget.lua)
-- Returns per key {spent, total, end} ('' for a missing end); nothing is rolled or written.
-- `spent` leaves out the slices leased to app instances (lease.lua): it is spend, and a
-- slice's share of it shows once the slice is returned.

local out = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'spent', 'total', 'end', 'leased')
  if v[4] then
    out[#out + 1] = string.format('%d', tonumber(v[1] or '0') - tonumber(v[4]))
  else
    out[#out + 1] = v[1] or '0'
  end
  out[#out + 1] = v[2] or '0'
  out[#out + 1] = v[3] or ''
end
return out
