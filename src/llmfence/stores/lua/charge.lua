-- charge.lua: add spend at every budget level unconditionally (budget.lua is prepended).
--
-- KEYS[1 ..]   budget counters (see budget.lua)
-- ARGV[1] now (Unix seconds, float text)   ARGV[2] cost (nano-USD)
-- ARGV[2 + i]  period end of KEYS[i] ('' for none)
-- ARGV[2 + #KEYS + i]  '1' if clients name KEYS[i] (it expires when idle, see budget.lua)

local now = tonumber(ARGV[1])
local n = #KEYS
for i = 1, n do
  local b = load_budget(KEYS[i], now, ARGV[2 + i])
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'total', ARGV[2])
  if ARGV[2 + n + i] == '1' then
    expire_client(KEYS[i], b.ends, b.spent + tonumber(ARGV[2]), now, CLIENT_GRACE_MS)
  end
end
return 1
