-- release.lua: free one request's leases without settling anything.
--
-- KEYS[1]   the request's reservation   KEYS[2]   its tombstone   KEYS[3 ..]   lease sets
-- ARGV[1]   the request id   ARGV[2]   the tombstone's TTL (ms)
--
-- A release that comes before its admission (the admission is still queued, say behind a
-- stall) leaves a tombstone, so the late admission takes nothing (see admit.lua).

for i = 3, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
end
return 1
