-- charge.lua: add spend at every budget level unconditionally (budget.lua is prepended).
--
-- KEYS[1 ..]   budget counters (see budget.lua)
-- ARGV[1] now (Unix seconds, float text)   ARGV[2] cost (nano-USD)
-- ARGV[2 + i]  period end of KEYS[i] ('' for none)

local now = tonumber(ARGV[1])
for i = 1, #KEYS do
  load_budget(KEYS[i], now, ARGV[2 + i])
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'total', ARGV[2])
end
return 1
