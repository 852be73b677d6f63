-- record_update.lua: change some fields of a record that exists, keeping key indexes right.
--
-- KEYS[1]   the record (see record_create.lua)
-- KEYS[2]   key records by user, KEYS[3] by team (only for key records)
-- ARGV[1] the record's id   ARGV[2] user id mode ('keep'|'set'|'none')   ARGV[3] user id
-- ARGV[4] team id mode      ARGV[5] team id                              ARGV[6 ..] field, value…
-- Returns the updated record's fields and values, or nil when there is no such record.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end

-- The old index entry is named by the value stored now, so it is read here, in the same
-- atomic step that writes the new one.
local function reindex(index, field, mode, value)
  if mode == 'keep' then
    return
  end
  local old = redis.call('HGET', KEYS[1], field)
  if old then
    local decoded = cjson.decode(old)
    if type(decoded) == 'string' then
      redis.call('ZREM', index, decoded .. '\0' .. ARGV[1])
    end
  end
  if mode == 'set' then
    redis.call('ZADD', index, 0, value .. '\0' .. ARGV[1])
  end
end

if #KEYS > 1 then
  reindex(KEYS[2], 'user_id', ARGV[2], ARGV[3])
  reindex(KEYS[3], 'team_id', ARGV[4], ARGV[5])
end
if #ARGV > 5 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 6))
end
return redis.call('HGETALL', KEYS[1])
