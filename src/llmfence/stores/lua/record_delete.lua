-- record_delete.lua: delete a key record and its index entries.
--
-- KEYS[1]   the key record   KEYS[2] every key record's id   KEYS[3] by user   KEYS[4] by team
-- ARGV[1]   the record's id (the key hash)
-- Returns 1 if it was deleted, 0 if there was none.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local fields = {{KEYS[3], 'user_id'}, {KEYS[4], 'team_id'}}
for _, f in ipairs(fields) do
  local old = redis.call('HGET', KEYS[1], f[2])
  if old then
    local decoded = cjson.decode(old)
    if type(decoded) == 'string' then
      redis.call('ZREM', f[1], decoded .. '\0' .. ARGV[1])
    end
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
