-- record_create.lua: store a new key, user or team record, unless its id is taken.
--
-- A record is a hash of its fields, each value JSON text written by the store; only key
-- records (KEYS[2..5] given) are indexed.
-- KEYS[1]   the record
-- KEYS[2]   every key record's id, a sorted set scored by creation order
-- KEYS[3]   the creation counter behind those scores
-- KEYS[4]   key records by user, a sorted set of "<user_id>\0<key hash>" (all score 0)
-- KEYS[5]   key records by team, likewise
-- ARGV[1] the record's id   ARGV[2] user id mode ('set'|'none')   ARGV[3] user id
-- ARGV[4] team id mode      ARGV[5] team id                      ARGV[6 ..] field, value…
-- Returns 1 if stored, 0 if the id was taken.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
if #KEYS > 1 then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
  if ARGV[2] == 'set' then
    redis.call('ZADD', KEYS[4], 0, ARGV[3] .. '\0' .. ARGV[1])
  end
  if ARGV[4] == 'set' then
    redis.call('ZADD', KEYS[5], 0, ARGV[5] .. '\0' .. ARGV[1])
  end
end
return 1
