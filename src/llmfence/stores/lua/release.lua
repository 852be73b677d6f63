-- release.lua: free one request's leases without settling anything.
--
-- KEYS[1 ..]   lease sets      ARGV[1]   the request id

for i = 1, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
return 1
