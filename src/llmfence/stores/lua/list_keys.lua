-- list_keys.lua: key records, all of them or those one index names, in creation order.
--
-- KEYS[1]   every key record's id, scored by creation order (see record_create.lua)
-- KEYS[2]   the index to look in (by user or by team), when ARGV[1] is 'index'
-- ARGV[1]   'all' for every key record, 'index' for those of one user or team
-- ARGV[2]   the user or team id to look up in KEYS[2]
-- ARGV[3]   the prefix of record key names ("{prefix}:key:"); record keys cannot be passed in
--           KEYS because which ones are wanted is known only here, and they carry the same
--           hash tag (the registry's), so they live in this cluster slot
-- Returns {id, {field, value, …}, …}. The caller still filters on the records' fields: the
-- index only narrows the search.

local ids
if ARGV[1] == 'all' then
  ids = redis.call('ZRANGE', KEYS[1], 0, -1)
else
  local found = redis.call('ZRANGEBYLEX', KEYS[2], '[' .. ARGV[2] .. '\0', '(' .. ARGV[2] .. '\1')
  local scored = {}
  for _, member in ipairs(found) do
    -- Everything after the last NUL is the key hash (a user id may itself hold a NUL).
    local id = string.match(member, '^.*%z(.*)$')
    local order = id and redis.call('ZSCORE', KEYS[1], id)
    if order then
      scored[#scored + 1] = {tonumber(order), id}
    end
  end
  table.sort(scored, function(a, b) return a[1] < b[1] end)
  ids = {}
  for i, pair in ipairs(scored) do
    ids[i] = pair[2]
  end
end

local out = {}
for _, id in ipairs(ids) do
  local fields = redis.call('HGETALL', ARGV[3] .. id)
  if #fields > 0 then
    out[#out + 1] = id
    out[#out + 1] = fields
  end
end
return out
