-- claim: take a name until it expires; the first caller gets 1, every later one 0.
-- KEYS[1]: the claim's key. ARGV[1]: this call's token. ARGV[2]: milliseconds until it expires.
-- The token makes the call repeatable: sent again after its reply was lost, it finds its own
-- token and answers 1 again, while any other caller finds a token not its own.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 1
end
return 0
